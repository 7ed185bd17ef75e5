"""The upstream NetworkPolicy model in a lab: namespaces x, y, z with pods a, b, c each,
served and probed the way Kubernetes' e2e suite does (test/e2e/network/netpol), but through
the fabric's own CNI plugin and fabricctl.

``World(lab).build()`` attaches the nine pods through the installed ``fabric`` CNI plugin
(``K8S_POD_NAMESPACE``/``K8S_POD_NAME`` in ``CNI_ARGS``, as a kubelet sends them), spread
over every host of the lab, applies their ``Namespace`` and ``Pod`` objects (labels
``ns: x`` / ``pod: a``, one container per served port named ``serve-80-tcp`` etc.) and
starts ``lab/netpol_agent.py`` in each pod: TCP and UDP servers on 80 and 81 (SCTP too when
the kernel has it) and a prober. ``probe`` runs one matrix (every source pod probing every
target at once, 1 s timeout); ``validate`` polls it until it equals the expected
``Reachability`` or 10 s pass, as upstream does, and returns a ``Result`` whose
``table()`` is the upstream-style truth table (expected, observed, comparison).

Pod-to-itself cells are never compared (upstream's ``ignoreLoopback``). IPv6 cells exist
only between pods of one host: the lab's routers carry IPv4 only, so IPv6 pod traffic
never leaves a host.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lab import pods
from lab.runner import Lab
from lab.view import LabError

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
PORTS = (80, 81)
AGENT = Path(__file__).resolve().parent / "netpol_agent.py"
AGENT_PYTHON = "/usr/bin/python3"
POOL6 = ("pods6", "fd00:244::/56", "122")
PROBE_TIMEOUT = 1.0
POLL_TIMEOUT = 10.0
BIN = Path(sys.executable).parent


def sctp_available() -> bool:
    """True when this kernel can open SCTP sockets (module built in or loadable)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, 132).close()
    except OSError:
        return False
    return True


def placement(hosts: Sequence[str]) -> dict[str, str]:
    """Pod key -> host: x/a, y/b and z/c on the first host (so IPv6 cells exist between
    namespaces), the other six round-robin over the other hosts: every namespace spans
    hosts and racks. Four hosts: node2 x/b y/c, node3 x/c z/a, node4 y/a z/b."""
    out = {}
    rest = list(hosts[1:]) or list(hosts)
    k = 0
    for i, ns in enumerate(NAMESPACES):
        for j, name in enumerate(POD_NAMES):
            if i == j:
                out[f"{ns}/{name}"] = hosts[0]
            else:
                out[f"{ns}/{name}"] = rest[k % len(rest)]
                k += 1
    return out


def namespace_doc(ns: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": dict(labels or {"ns": ns})}}  # fmt: skip


def pod_doc(ns: str, name: str, labels: Mapping[str, str] | None = None,
            protocols: Sequence[str] = ("TCP", "UDP")) -> dict[str, Any]:  # fmt: skip
    """The Pod object as upstream's model builds it: one container per (port, protocol),
    ``cont-80-tcp`` serving the port named ``serve-80-tcp``."""
    containers = [
        {
            "name": f"cont-{port}-{proto.lower()}",
            "image": "agnhost",
            "ports": [
                {"name": f"serve-{port}-{proto.lower()}", "containerPort": port, "protocol": proto}
            ],
        }
        for proto in protocols
        for port in PORTS
    ]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": dict(labels or {"pod": name})},
            "spec": {"containers": containers}}  # fmt: skip


def as_list(docs: Iterable[Mapping[str, Any]]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": list(docs)})


# ---------------------------------------------------------------------- expectations


def _matches(pattern: str, key: str) -> bool:
    """``*``, ``x/*``, ``*/a`` or ``x/a`` against a pod key ``x/a``."""
    if pattern == "*":
        return True
    pns, _, pname = pattern.partition("/")
    ns, _, name = key.partition("/")
    return pns in ("*", ns) and pname in ("*", name)


@dataclass
class Reachability:
    """An expected matrix: everything allowed, then each ``expect`` in order overrides the
    cells whose source and destination match its patterns (upstream's ExpectPeer)."""

    pods: tuple[str, ...]
    cells: dict[tuple[str, str], bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cells = {(a, b): True for a in self.pods for b in self.pods}

    def expect(self, src: str, dst: str, ok: bool) -> Reachability:
        for a, b in self.cells:
            if _matches(src, a) and _matches(dst, b):
                self.cells[(a, b)] = ok
        return self


Cell = tuple[str, str]


@dataclass
class Result:
    what: str  # "TCP/80 IPv4"
    pods: tuple[str, ...]
    compared: tuple[Cell, ...]
    expected: dict[Cell, bool]
    observed: dict[Cell, tuple[bool, str]]
    elapsed: float
    rounds: int

    @property
    def wrong(self) -> list[Cell]:
        return [c for c in self.compared if self.observed[c][0] != self.expected[c]]

    @property
    def ok(self) -> bool:
        return not self.wrong

    def table(self) -> str:
        """Expected, observed and comparison grids, upstream style: ``.`` connected, ``X``
        blocked; in the comparison ``.`` as expected, ``X`` wrong; ``-`` not compared."""
        compared = set(self.compared)

        def grid(title: str, mark: Any) -> list[str]:
            w = max(len(p) for p in self.pods) + 1
            lines = [title, "-".ljust(w) + " ".join(p.ljust(w) for p in self.pods)]
            for a in self.pods:
                row = [(mark((a, b)) if (a, b) in compared else "-").ljust(w) for b in self.pods]
                lines.append(a.ljust(w) + " ".join(row))
            return lines

        out = [f"{self.what}: {len(self.wrong)} wrong of {len(self.compared)} cells "
               f"after {self.rounds} rounds, {self.elapsed:.1f} s"]  # fmt: skip
        out += grid("expected:", lambda c: "." if self.expected[c] else "X")
        out += grid("observed:", lambda c: "." if self.observed[c][0] else "X")
        out += grid(
            "comparison:", lambda c: "." if self.observed[c][0] == self.expected[c] else "X"
        )
        for c in self.wrong:
            out.append(f"  {c[0]} -> {c[1]}: expected {'allowed' if self.expected[c] else 'blocked'}"
                       f", got {self.observed[c][1]}")  # fmt: skip
        return "\n".join(out)


# ---------------------------------------------------------------------- the pods


@dataclass
class PolicyPod:
    key: str  # "x/a"
    host: str
    pod: pods.Pod
    ips: dict[int, str]  # family -> address
    agent: subprocess.Popen[str] | None = None

    def send(self, cmd: Mapping[str, Any]) -> None:
        assert self.agent is not None and self.agent.stdin is not None
        self.agent.stdin.write(json.dumps(cmd) + "\n")
        self.agent.stdin.flush()

    def receive(self) -> dict[str, Any]:
        assert self.agent is not None and self.agent.stdout is not None
        line = self.agent.stdout.readline()
        if not line:
            raise LabError(f"the agent of pod {self.key} exited ({self.agent.poll()})")
        doc: dict[str, Any] = json.loads(line)
        return doc

    def ready(self) -> None:
        """Wait for the agent's first line (its servers are bound)."""
        hello = self.receive()
        if not hello.get("ready"):
            raise LabError(f"the agent of pod {self.key} did not start: {hello}")

    def stop(self) -> None:
        """End the agent: end of its stdin, then SIGKILL by PID after 5 s."""
        if self.agent is None:
            return
        if self.agent.poll() is None:
            assert self.agent.stdin is not None
            self.agent.stdin.close()
            try:
                self.agent.wait(5)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait(5)
        if self.agent.stdout is not None:
            self.agent.stdout.close()


def reach(src: PolicyPod, ip: str, ports: Sequence[int], protocol: str = "TCP",
          timeout: float = PROBE_TIMEOUT) -> dict[int, bool]:  # fmt: skip
    """One probe from ``src`` to each port of ``ip`` at once: port -> connected."""
    src.send({"probe": [[str(p), ip, p, protocol] for p in ports], "timeout": timeout})
    got = src.receive()["results"]
    return {int(k): bool(v[0]) for k, v in got.items()}


def attach(lab: Lab, host: str, key: str, conf: dict[str, Any] | None = None,
           sctp: bool = False) -> PolicyPod:  # fmt: skip
    """Pod ``key`` ("ns/name") on ``host`` through the installed CNI plugin, with the
    Kubernetes arguments a kubelet sends, and its agent started (call ``ready()``)."""
    ns, name = key.split("/")
    pod = pods.add(lab, host, f"{ns}-{name}",
                   args=f";K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}", conf=conf)  # fmt: skip
    ips: dict[int, str] = {}
    for entry in pod.result.get("ips", []):
        ip = ipaddress.ip_interface(entry["address"]).ip
        ips[ip.version] = str(ip)
    argv = ["ip", "netns", "exec", pod.netns_name, AGENT_PYTHON, "-I", "-S", str(AGENT),
            "--ports", ",".join(map(str, PORTS)), *(["--sctp"] if sctp else [])]  # fmt: skip
    agent = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    return PolicyPod(key, host, pod, ips, agent)


class World:
    """Nine pods of the upstream model in a running fabric lab (fabricd on every host)."""

    def __init__(self, lab: Lab, ipv6: bool = True, sctp: bool | None = None) -> None:
        self.lab = lab
        self.ipv6 = ipv6
        self.sctp = sctp_available() if sctp is None else sctp
        self.pods: dict[str, PolicyPod] = {}
        self.host = lab.nodes("node")[0]
        self.eps = ",".join(lab.etcd_endpoints)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f"{ns}/{p}" for ns in NAMESPACES for p in POD_NAMES)

    @property
    def protocols(self) -> tuple[str, ...]:
        return ("TCP", "UDP", "SCTP") if self.sctp else ("TCP", "UDP")

    # ------------------------------------------------------------------ fabricctl
    def ctl(self, args: Sequence[str], stdin: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        argv = [str(BIN / "fabricctl"), "--etcd-endpoints", self.eps, *args]
        r = self.lab.exec(self.host, argv, timeout=60, input=stdin)
        if check and r.returncode != 0:
            raise LabError(f"fabricctl {' '.join(args)} failed: {(r.stderr or r.stdout).strip()}")
        return r

    def apply(self, docs: Iterable[Mapping[str, Any]]) -> None:
        self.ctl(["apply", "-f", "-"], as_list(docs))

    def delete(self, docs: Iterable[Mapping[str, Any]]) -> None:
        self.ctl(["delete", "-f", "-"], as_list(docs))

    def label(self, kind: str, target: str, changes: Mapping[str, str | None]) -> None:
        """``fabricctl label pod|namespace TARGET k=v k-`` (None removes the key)."""
        args = [f"{k}-" if v is None else f"{k}={v}" for k, v in changes.items()]
        self.ctl(["label", kind, target, *args])

    def baseline(self) -> list[dict[str, Any]]:
        """The Namespace and Pod objects of the model with their original labels."""
        docs = [namespace_doc(ns) for ns in NAMESPACES]
        for key in self.keys:
            ns, name = key.split("/")
            docs.append(pod_doc(ns, name, protocols=self.protocols))
        return docs

    # ------------------------------------------------------------------ build
    def build(self) -> World:
        lab = self.lab
        hosts = lab.nodes("node")
        pods.install(lab)
        conf = pods.netconf()
        if self.ipv6:
            name, cidr, size = POOL6
            self.ctl(["pool", "add", name, "--cidr", cidr, "--block-size", size])
            # The lab turns on IPv4 forwarding only; a dual-stack host needs IPv6 too.
            for h in hosts:
                lab.exec(h, ["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"], check=True)
            conf = pods.netconf(ipam={"type": "fabric-ipam", "assignIPv6": True})
        self.apply(self.baseline())  # objects first: labels known before the ADD
        for key, host in placement(hosts).items():
            self.pods[key] = attach(lab, host, key, conf, self.sctp)
        for p in self.pods.values():
            p.ready()
        return self

    def close(self) -> None:
        """Stop the agents (by their PIDs); the pods go with the lab."""
        for p in self.pods.values():
            p.stop()

    # ------------------------------------------------------------------ probing
    def ip(self, key: str, family: int = 4) -> str:
        return self.pods[key].ips[family]

    def cells(self, family: int = 4) -> tuple[Cell, ...]:
        """The compared cells: every ordered pair of two different pods (IPv6: of one host,
        both with an IPv6 address)."""
        out = []
        for a in self.keys:
            for b in self.keys:
                if a == b:
                    continue
                pa, pb = self.pods[a], self.pods[b]
                if family == 6 and not (6 in pa.ips and 6 in pb.ips and pa.host == pb.host):
                    continue
                out.append((a, b))
        return tuple(out)

    def probe(self, cells: Iterable[Cell], port: int, protocol: str,
              family: int = 4, timeout: float = PROBE_TIMEOUT) -> dict[Cell, tuple[bool, str]]:  # fmt: skip
        """Probe ``cells`` at once: each source pod's agent probes its targets in parallel."""
        by_src: dict[str, list[list[Any]]] = {}
        for a, b in cells:
            by_src.setdefault(a, []).append([b, self.ip(b, family), port, protocol])
        for a, targets in by_src.items():
            self.pods[a].send({"probe": targets, "timeout": timeout})
        out: dict[Cell, tuple[bool, str]] = {}
        for a in by_src:
            for b, (ok, why) in self.pods[a].receive()["results"].items():
                out[(a, b)] = (bool(ok), str(why))
        return out

    def validate(self, expect: Reachability, port: int, protocol: str, family: int = 4,
                 timeout: float = POLL_TIMEOUT) -> Result:  # fmt: skip
        """Probe until every compared cell is as expected or ``timeout`` s pass (cells that
        match are not probed again, as upstream polls each pair)."""
        cells = self.cells(family)
        started = time.monotonic()
        observed = self.probe(cells, port, protocol, family)
        rounds = 1
        while True:
            wrong = [c for c in cells if observed[c][0] != expect.cells[c]]
            if not wrong or time.monotonic() - started > timeout:
                break
            time.sleep(0.2)
            observed.update(self.probe(wrong, port, protocol, family))
            rounds += 1
        what = f"{protocol}/{port} IPv{family}"
        return Result(what, self.keys, cells, dict(expect.cells), observed,
                      time.monotonic() - started, rounds)  # fmt: skip

    def reachability(self) -> Reachability:
        return Reachability(self.keys)


_TEMPLATE = re.compile(r"\{([a-z0-9]+:[a-z]/[a-z])\}")


def substitute(doc: Any, values: Mapping[str, str]) -> Any:
    """``doc`` with every string ``{key}`` template filled from ``values`` (pod addresses)."""
    if isinstance(doc, str):
        return _TEMPLATE.sub(lambda m: values[m.group(1)], doc)
    if isinstance(doc, list):
        return [substitute(x, values) for x in doc]
    if isinstance(doc, dict):
        return {k: substitute(v, values) for k, v in doc.items()}
    return doc


def address_values(world: World) -> dict[str, str]:
    """Template values: ``ip4:x/a`` (the pod's IPv4), ``wide4:x/a`` (the /4 around it, as
    upstream's makeLargeCIDRForIP), and the same with 6."""
    out = {}
    for key, p in world.pods.items():
        for fam, ip in p.ips.items():
            bits = 32 if fam == 4 else 128
            out[f"ip{fam}:{key}"] = ip
            out[f"host{fam}:{key}"] = f"{ip}/{bits}"
            out[f"wide{fam}:{key}"] = str(ipaddress.ip_network(f"{ip}/4", strict=False))
    return out


def iter_cells(results: Iterable[Result]) -> Iterator[tuple[int, int]]:
    """(compared, correct) per result."""
    for r in results:
        yield len(r.compared), len(r.compared) - len(r.wrong)
