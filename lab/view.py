"""``LabView``: what a lab that is up answers (its nodes, addresses, namespaces, commands run
inside them, BGP session states, fabricd's health and kernel routes), read from its plan and
``state.json``. ``LabControl`` (lab/control.py) adds starting and stopping processes, ``Lab``
(lab/runner.py) building and tearing down."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from lab import netns, procs, render, routers, tls
from lab.etcd import EtcdCluster
from lab.plan import NodePlan, Plan
from lab.state import LabState
from lab.tls import PKI
from lab.topology import Role, Topology

T = TypeVar("T")


class LabError(RuntimeError):
    """A lab could not be brought up, queried or torn down."""


class LabView:
    """The queries of a lab; ``Lab`` sets the attributes."""

    topology: Topology
    name: str
    plan: Plan
    dir: Path
    progress: Callable[[str], None]
    etcd: EtcdCluster | None
    _state: LabState | None
    _children: list[subprocess.Popen[bytes]]
    tls: bool  # etcd requires TLS and client certificates (made in <labdir>/pki)

    @property
    def state(self) -> LabState:
        if self._state is None:
            try:
                self._state = LabState.load(self.dir)
            except FileNotFoundError:
                raise LabError(f"lab {self.name} is not up") from None
        return self._state

    def _node_dir(self, node: str) -> Path:
        return self.dir / node

    def node(self, name: str) -> NodePlan:
        try:
            return self.plan.nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r} in lab {self.name}") from None

    def netns(self, node: str) -> str:
        return self.node(node).netns

    def address(self, node: str) -> str:
        """The node address (first data interface, else loopback, else mgmt) as a string."""
        addr = self.node(node).address
        if addr is None:
            raise LabError(f"node {node} has no address")
        return str(addr)

    def addresses(self, node: str) -> dict[str, str]:
        """Every address of ``node`` by interface (``eth0`` is management, ``lo`` loopback)."""
        n = self.node(node)
        out = {"eth0": str(n.mgmt)} if n.mgmt else {}
        out.update({k: str(v) for k, v in n.ifaces.items() if v is not None})
        if n.loopback is not None:
            out["lo"] = f"{n.loopback}/32"
        return out

    def nodes(self, role: Role | str | None = None) -> list[str]:
        return [n.name for n in self.plan.nodes.values() if role is None or n.role == role]

    @property
    def etcd_endpoints(self) -> list[str]:
        return list(self.plan.etcd_endpoints)

    @property
    def pki(self) -> PKI | None:
        """The lab's certificates when its etcd requires TLS."""
        return tls.at(self.dir / "pki") if self.tls else None

    @property
    def etcd_args(self) -> list[str]:
        """fabricctl's options to reach the lab's etcd (with the client certificate)."""
        scheme = "https" if self.tls else "http"
        args = ["--etcd-endpoints", ",".join(f"{scheme}://{e}" for e in self.etcd_endpoints)]
        if (p := self.pki) is not None:
            args += ["--etcd-cacert", str(p.ca), "--etcd-cert", str(p.client_cert),
                     "--etcd-key", str(p.client_key)]  # fmt: skip
        return args

    def add_netns(self, name: str) -> str:
        """Create namespace ``name`` (e.g. a pod's) that ``down()`` deletes: recorded in the
        state before it is created. It must carry the lab's prefix. Returns its path."""
        if not name.startswith(self.plan.prefix):
            raise LabError(f"namespace {name!r} must start with {self.plan.prefix!r}")
        if name not in self.state.namespaces:
            self.state.namespaces.append(name)
            self.state.save()
        netns.add(name)
        return str(netns.NETNS_DIR / name)

    def fabricd_config_path(self, node: str) -> Path:
        return self._node_dir(self.node(node).name) / "fabricd.yaml"

    def exec(
        self,
        node: str,
        cmd: Sequence[str] | str,
        timeout: float = 30.0,
        check: bool = False,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` (argv, or a shell line) inside ``node``'s namespace, ``input`` on its
        stdin."""
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        r = netns.run_in(self.netns(node), argv, timeout, input)
        if check and r.returncode != 0:
            raise LabError(f"failed to run {shlex.join(argv)} in {node}: {r.stderr.strip()}")
        return r

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        interval: float = 0.2,
        what: str = "condition",
    ) -> T:
        """Poll ``predicate`` until it returns a truthy value, which is returned.

        Raises TimeoutError naming ``what`` after ``timeout`` seconds. LabError raised by
        the predicate propagates at once (something died); other exceptions count as
        "not yet" and the last one is chained to the timeout.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                value = predicate()
                if value:
                    return value
            except LabError:
                raise
            except Exception as e:
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}") from last
            time.sleep(interval)

    def bgp_sessions(self, router: str) -> dict[str, str]:
        """BGP session states of a router keyed by neighbor node name (dynamic peers by
        address for FRR, by protocol name for BIRD)."""
        n = self.node(router)
        d = self._node_dir(router)
        by_addr = {str(nb.address): nb.name for nb in n.neighbors}
        if n.role == Role.FRR:
            return {by_addr.get(k, k): v for k, v in routers.frr_sessions(d).items()}
        if n.role == Role.BIRD:
            by_proto = {f"r_{nb.name.replace('-', '_')}": nb.name for nb in n.neighbors}
            return {by_proto.get(k, k): v for k, v in routers.bird_sessions(d).items()}
        raise LabError(f"node {router} is not a router")

    def established(self, router: str) -> bool:
        """True when every static BGP neighbor of ``router`` (other routers) is Established."""
        sessions = self.bgp_sessions(router)
        return all(sessions.get(nb.name) == "Established" for nb in self.node(router).neighbors)

    def status(self) -> list[dict[str, Any]]:
        """One row per node: role, namespace (and whether it exists), AS, addresses and
        each started process with its liveness."""
        return [
            {
                "node": n.name,
                "role": str(n.role),
                "netns": n.netns,
                "netns_exists": netns.exists(n.netns),
                "asn": n.asn if n.role in (Role.NODE, Role.FRR, Role.BIRD) else None,
                "addresses": self.addresses(n.name),
                "processes": self.processes(n.name),
            }
            for n in self.plan.nodes.values()
        ]

    def processes(self, node: str) -> dict[str, bool]:
        """Each process the lab started in ``node`` and whether it is still alive."""
        try:
            recs = self.state.procs
        except LabError:
            return {}
        return {r.what: procs.matches(r) for r in recs if r.node == node}

    def health(self, node: str, path: str = "/readyz") -> tuple[int, str]:
        """GET ``path`` from fabricd's health server inside ``node``: (status, body); 0 if down."""
        code = (
            "import sys,urllib.request,urllib.error\n"
            "try:\n r=urllib.request.urlopen('http://127.0.0.1:9099'+sys.argv[1]+'?verbose',timeout=3)\n"
            " print(r.status);print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code);print(e.read().decode())\n"
            "except OSError as e:\n print(0);print(e)\n"
        )
        r = self.exec(node, ["/usr/bin/python3", "-IS", "-c", code, path], timeout=10)
        first, _, rest = r.stdout.partition("\n")
        return (int(first) if first.strip().isdigit() else 0), rest

    def kernel_routes(self, node: str, proto: int | str = render.ROUTE_PROTOCOL) -> dict[str, str]:
        """Routes of ``proto`` in ``node``'s main table: destination -> rest of the line."""
        r = self.exec(node, ["ip", "-4", "route", "show", "proto", str(proto)], check=True)
        r6 = self.exec(node, ["ip", "-6", "route", "show", "proto", str(proto)], check=True)
        out = {}
        for line in (r.stdout + r6.stdout).splitlines():
            if line.startswith((" ", "\t")) or not line.strip():
                continue
            parts = line.split(None, 1)
            if parts[0] == "blackhole":
                out[parts[1].split()[0]] = "blackhole"
            else:
                out[parts[0]] = parts[1] if len(parts) > 1 else ""
        return out
