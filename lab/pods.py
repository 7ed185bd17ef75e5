"""Pods in a lab, made the way a container runtime makes them: a network namespace, then the
installed ``fabric`` CNI plugin exec'd inside the host's namespace with the CNI_* environment
and the network config on stdin. Used by the demo, the end-to-end tests and the benchmarks.

Pod namespaces are recorded with the lab (``Lab.add_netns``) so ``lab.down()`` removes them.
A ``Probe`` pings between pods continuously (every 100 ms by default) and counts losses;
``Flows`` runs probes on several pod pairs at once.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from lab.netns import exists as netns_exists
from lab.runner import Lab
from lab.view import LabError

NETWORK = "fabric"
SETTLE = 1.1  # seconds for the last echo of a stopped probe to come back or time out (-W 1)
_ids = itertools.count()


@dataclass(frozen=True, slots=True)
class Pod:
    node: str
    name: str  # container id
    netns: str  # path, /run/netns/<lab prefix>p...
    ip: str
    result: dict[str, Any] = field(hash=False, compare=False)

    @property
    def netns_name(self) -> str:
        return Path(self.netns).name


class PodError(LabError):
    """A CNI call failed; ``code`` is the CNI error code (0 if the plugin gave none)."""

    def __init__(self, msg: str, code: int = 0) -> None:
        super().__init__(msg)
        self.code = code


def socket_of(lab: Lab, node: str) -> str:
    return str(yaml.safe_load(lab.fabricd_config_path(node).read_text())["cni"]["socket"])


def state_dir(lab: Lab, node: str) -> Path:
    """fabricd's cni.stateDir in ``node`` (its records, and ``pending-del/``)."""
    return Path(yaml.safe_load(lab.fabricd_config_path(node).read_text())["cni"]["stateDir"])


def install_args(lab: Lab, node: str) -> list[str]:
    """``fabricctl cni install`` arguments for ``node`` (its own bin and conf dirs)."""
    d = cni_dir(lab, node)
    return ["cni", "install", "--bin-dir", str(d / "bin"), "--conf-dir", str(d / "net.d"),
            "--socket", socket_of(lab, node), "--state-dir", str(state_dir(lab, node)),
            "--network-name", NETWORK]  # fmt: skip


def live_handles(lab: Lab, nodes: list[str] | None = None) -> dict[str, list[str]]:
    """The handles of the attachments each host's state dir records (for
    ``fabricctl ipam check --live-handles``)."""
    out = {}
    for node in nodes or lab.nodes("node"):
        d = state_dir(lab, node)
        recs = [json.loads(p.read_text()) for p in d.glob("*.json")] if d.is_dir() else []
        out[node] = sorted(str(r["handle"]) for r in recs)
    return out


def cni_dir(lab: Lab, node: str) -> Path:
    return lab.dir / node / "cni"


def install(lab: Lab, nodes: list[str] | None = None) -> None:
    """``fabricctl cni install`` on each host, into ``<labdir>/<node>/cni/{bin,net.d}``."""
    for node in nodes or lab.nodes("node"):
        r = lab.fabricctl(install_args(lab, node), node)
        if r.returncode != 0:
            raise LabError(f"failed to install the CNI plugin on {node}: {r.stderr.strip()}")


def netconf(version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    """The fabric entry of the installed conflist, as libcni hands it to the plugin."""
    return {"cniVersion": version, "name": NETWORK, "type": "fabric", "mtu": 1500,
            "ipam": {"type": "fabric-ipam"}, **extra}  # fmt: skip


def cni(lab: Lab, node: str, verb: str, cid: str, netns: str, conf: dict[str, Any] | None = None,
        ifname: str = "eth0", timeout: float = 90.0, args: str = "",
        namespace: str = "default", pod: str = "") -> tuple[int, Any]:  # fmt: skip
    """Run the installed plugin like a runtime: (exit code, stdout JSON or None). ``args``
    is appended to CNI_ARGS (e.g. ``";IP=10.244.200.5"``); ``namespace`` and ``pod`` (default:
    the container id) are K8S_POD_NAMESPACE and K8S_POD_NAME."""
    bin_dir = cni_dir(lab, node) / "bin"
    env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
           "CNI_PATH": f"{bin_dir}:/usr/lib/cni",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};"
                       f"K8S_POD_NAME={pod or cid}{args}"}  # fmt: skip
    argv = ["env", "-i", *(f"{k}={v}" for k, v in env.items()), str(bin_dir / "fabric")]
    r = lab.exec(node, argv, timeout=timeout, input=json.dumps(conf or netconf()))
    try:
        doc = json.loads(r.stdout) if r.stdout.strip() else None
    except ValueError:
        doc = None
    return r.returncode, doc


def _free_name(lab: Lab, node: str) -> str:
    """The next ``pod<n>-<node>`` whose namespace does not exist yet (a process attached to
    a lab another process made pods in starts counting at 0 again)."""
    while True:
        cid = f"pod{next(_ids)}-{node}"
        if not netns_exists(f"{lab.plan.prefix}p{cid[:40]}"):
            return cid


def add(lab: Lab, node: str, name: str | None = None, args: str = "",
        namespace: str = "default", conf: dict[str, Any] | None = None) -> Pod:  # fmt: skip
    """A new pod on ``node``: a fresh namespace and a CNI ADD (``args``, ``conf``: see
    ``cni``; ``namespace``: K8S_POD_NAMESPACE)."""
    cid = name or _free_name(lab, node)
    netns = lab.add_netns(f"{lab.plan.prefix}p{cid[:40]}")
    code, doc = cni(lab, node, "ADD", cid, netns, conf=conf, args=args, namespace=namespace)
    if code != 0:
        c = int(doc.get("code", 0)) if isinstance(doc, dict) else 0
        raise PodError(f"CNI ADD of {cid} on {node} failed: {why(doc)}", c)
    ip = str(doc["ips"][0]["address"].split("/")[0])
    return Pod(node, cid, netns, ip, doc)


def delete(lab: Lab, pod: Pod) -> None:
    code, doc = cni(lab, pod.node, "DEL", pod.name, pod.netns)
    if code != 0:
        raise PodError(f"CNI DEL of {pod.name} failed: {why(doc)}")


def why(doc: Any) -> str:
    """A CNI error document as one line: ``error 11: msg (details)``."""
    if not isinstance(doc, dict):
        return f"no CNI error document ({doc!r})"
    details = f" ({doc['details']})" if doc.get("details") else ""
    return f"error {doc.get('code')}: {doc.get('msg')}{details}"


def ping(lab: Lab, pod: Pod, ip: str, count: int = 1, wait: float = 1.0) -> bool:
    """Ping ``ip`` from inside ``pod`` (run in its node's namespace)."""
    r = lab.exec(pod.node, ["ip", "netns", "exec", pod.netns_name, "ping", "-c", str(count),
                            "-W", str(wait), "-i", "0.2", ip], timeout=count + wait + 10)  # fmt: skip
    return r.returncode == 0


class Probe:
    """Continuous pings from ``src`` to ``dst_ip`` every ``interval`` s (one ``ping``
    process in the pod, reply wait 1 s). ``stop()`` returns (sent, lost, lost_seqs);
    ``lost_window()`` is the span of consecutive losses in seconds."""

    def __init__(self, lab: Lab, src: Pod, dst_ip: str, interval: float = 0.1) -> None:
        self.interval = interval
        argv = ["ip", "netns", "exec", src.netns_name, "ping", "-n", "-D", "-O", "-W", "1",
                "-i", str(interval), dst_ip]  # fmt: skip
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.netns(src.node), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._lines: list[str] = []
        self._t = threading.Thread(target=self._read, daemon=True)
        self._t.start()
        self.started = time.monotonic()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line)

    def replies(self) -> int:
        return sum(1 for ln in self._lines if "bytes from" in ln)

    def times(self, seqs: list[int]) -> list[float]:
        """When each of ``seqs`` was sent (epoch seconds, from ``ping -D``): the time on a
        line of that sequence number, else the nearest earlier one's plus the interval(s)."""
        at: dict[int, float] = {}
        for ln in self._lines:
            if ln.startswith("[") and "icmp_seq=" in ln:
                seq = int(ln.split("icmp_seq=")[1].split()[0])
                at.setdefault(seq, float(ln[1 : ln.index("]")]))
        known = sorted(at)
        out = []
        for s in seqs:
            if s in at:
                out.append(at[s])
                continue
            prev = [k for k in known if k < s]
            base = prev[-1] if prev else (known[0] if known else s)
            out.append(at.get(base, 0.0) + (s - base) * self.interval)
        return out

    def stop(self, settle: float = SETTLE) -> tuple[int, int, list[int]]:
        """Stop pinging after ``settle`` s (the last echo comes back or times out); (sent,
        lost, sequence numbers lost). ``stop_all`` stops several with one wait."""
        time.sleep(settle)
        self._proc.terminate()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(5)
        self._t.join(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        got: set[int] = set()
        lost: set[int] = set()
        for ln in self._lines:
            if "icmp_seq=" not in ln:
                continue
            seq = int(ln.split("icmp_seq=")[1].split()[0])
            (got if "bytes from" in ln else lost).add(seq)
        sent = max(got | lost, default=0)
        missing = sorted(set(range(1, sent + 1)) - got)
        return sent, len(missing), missing

    def lost_window(self, missing: list[int]) -> float:
        """Longest run of consecutive losses, in seconds."""
        best = run = 0
        prev = None
        for s in missing:
            run = run + 1 if prev is not None and s == prev + 1 else 1
            best = max(best, run)
            prev = s
        return best * self.interval


def stop_all(probes: list[Probe]) -> list[tuple[int, int, list[int]]]:
    """Stop every probe with a single settling wait: ``[p.stop() for p in probes]`` without
    waiting ``SETTLE`` once per probe."""
    time.sleep(SETTLE)
    return [p.stop(settle=0.0) for p in probes]


class Loss(NamedTuple):
    """One probe's result: pings sent, lost, and the longest run of losses in seconds."""

    sent: int
    lost: int
    window: float


class Flows:
    """Probes on several pod pairs, used as a context manager: started together, each
    answered ``ready`` times before the body runs (or ``PodError`` after ``timeout`` s), all
    stopped with one settling wait at exit or by ``stop()``, which returns
    ``{"node/pod->node/pod": Loss}`` (the same dict on later calls)."""

    def __init__(self, lab: Lab, pairs: list[tuple[Pod, Pod]], ready: int = 3,
                 timeout: float = 15.0) -> None:  # fmt: skip
        self.lab, self.pairs, self.ready, self.timeout = lab, pairs, ready, timeout
        self.probes: list[Probe] = []
        self.result: dict[str, Loss] | None = None

    def __enter__(self) -> Flows:
        self.probes = [Probe(self.lab, a, b.ip) for a, b in self.pairs]
        end = time.monotonic() + self.timeout
        while not all(p.replies() >= self.ready for p in self.probes):
            if time.monotonic() > end:
                self.stop()
                silent = [f"{a.name}->{b.name}" for (a, b), p in zip(self.pairs, self.probes,
                          strict=True) if p.replies() < self.ready]  # fmt: skip
                raise PodError(f"probes not answered within {self.timeout:.0f} s: {silent}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> dict[str, Loss]:
        if self.result is None:
            got = stop_all(self.probes)
            self.result = {
                f"{a.node}/{a.name}->{b.node}/{b.name}": Loss(sent, lost, p.lost_window(miss))
                for (a, b), p, (sent, lost, miss) in zip(self.pairs, self.probes, got, strict=True)
            }
        return self.result

    def lossy(self) -> dict[str, Loss]:
        """The flows that lost pings (after ``stop()``)."""
        return {k: v for k, v in self.stop().items() if v.lost}
