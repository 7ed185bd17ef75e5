"""``Lab``: bring a topology up from network namespaces, query it, tear it down.

Contract:
- ``up()`` creates the namespaces, wires, addresses, configs and processes of the plan,
  recording each namespace before it exists and each process right after it starts
  (``state.json`` in the lab directory). It returns once etcd is healthy and every
  router answers on its control socket; BGP convergence is the caller's ``wait_for``.
  If anything fails, what was created is torn down and the error re-raised.
- ``down()`` (also ``teardown(dir)``, with no topology needed) stops recorded processes
  whose PID still matches, then any process left inside the lab's namespaces, deletes
  the namespaces and the lab directory. Idempotent; safe after a SIGKILLed ``up``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lab import netns, procs, render, routers
from lab.etcd import EtcdCluster
from lab.plan import MGMT_BRIDGE, NodePlan, Plan, build
from lab.state import LabState, ProcRecord, check_name, lab_dir
from lab.topology import Role, Topology, load

T = TypeVar("T")
BIN = Path(sys.executable).parent
ROUTER_FORWARDING = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}


class LabError(RuntimeError):
    """A lab could not be brought up, queried or torn down."""


def _node_commands(node: NodePlan) -> list[str]:
    cmds = ["link set lo up"]
    if node.role == Role.BRIDGE:
        cmds += [f"link add {MGMT_BRIDGE} type bridge", f"link set {MGMT_BRIDGE} up"]
        for port in node.bridge_ports:
            cmds += [f"link set {port} master {MGMT_BRIDGE}", f"link set {port} up"]
        return cmds
    if node.mgmt is not None:
        cmds += [f"addr add {node.mgmt} dev eth0", "link set eth0 up"]
    for ifname, addr in node.ifaces.items():
        if addr is not None:
            cmds.append(f"addr add {addr} dev {ifname}")
        cmds.append(f"link set {ifname} up")
    if node.loopback is not None:
        cmds.append(f"addr add {node.loopback}/32 dev lo")
    if len(node.default_via) == 1:
        cmds.append(f"route add default via {node.default_via[0]}")
    elif node.default_via:
        cmds.append("route add default " + " ".join(f"nexthop via {g}" for g in node.default_via))
    return cmds


def teardown(directory: Path, timeout: float = 5.0) -> bool:
    """Remove everything recorded in ``directory``; returns False if there was no lab."""
    try:
        state = LabState.load(directory)
    except FileNotFoundError:
        if directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
        return False
    procs.terminate([r.pid for r in state.procs if procs.matches(r)], timeout)
    for ns in state.namespaces:
        procs.terminate(procs.netns_pids(ns), timeout)
    errors = []
    for ns in state.namespaces:
        try:
            netns.delete(ns)
        except netns.NetnsError as e:
            errors.append(str(e))
    if errors:
        raise LabError(f"failed to tear down lab {state.name}: {'; '.join(errors)}")
    shutil.rmtree(directory, ignore_errors=True)
    return True


class Lab:
    """A topology run from network namespaces. Use as a context manager: up, then down."""

    def __init__(
        self,
        topology: str | Path | Mapping[str, Any] | Topology,
        name: str | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.topology = topology if isinstance(topology, Topology) else load(topology)
        self.name = check_name(name or self.topology.name)
        self.plan: Plan = build(self.topology, self.name)
        self.dir = lab_dir(self.name)
        self.progress = progress or (lambda _msg: None)
        self.etcd: EtcdCluster | None = None
        self._state: LabState | None = None
        # Popen objects of processes started by this object, reaped at down().
        self._children: list[subprocess.Popen[bytes]] = []

    @classmethod
    def attach(cls, name: str, progress: Callable[[str], None] | None = None) -> Lab:
        """The Lab object of a lab that is already up (from its recorded topology)."""
        try:
            state = LabState.load(lab_dir(name))
        except FileNotFoundError:
            raise LabError(f"lab {name} is not up") from None
        lab = cls(state.info["topology"], name=name, progress=progress)
        lab._state = state
        return lab

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    @property
    def state(self) -> LabState:
        if self._state is None:
            try:
                self._state = LabState.load(self.dir)
            except FileNotFoundError:
                raise LabError(f"lab {self.name} is not up") from None
        return self._state

    def up(self, timeout: float = 60.0) -> Lab:
        """Create the lab; see the module docstring for the contract."""
        if (self.dir / "state.json").exists():
            raise LabError(f"lab {self.name} already exists; run `python -m lab down {self.name}`")
        taken = [ns for ns in self.plan.namespaces if netns.exists(ns)]
        if taken:
            raise LabError(f"namespaces {taken} already exist; not touching them")
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, mode=0o755)
        self._state = LabState(name=self.name, prefix=self.plan.prefix, dir=self.dir)
        self._state.info = {"topology": dict(self.topology.raw)}
        self._state.save()
        try:
            self._build(timeout)
        except BaseException:
            self.progress("up failed; tearing down")
            self.down()
            raise
        return self

    def _build(self, timeout: float) -> None:
        state = self.state
        started = time.monotonic()
        self.progress(f"creating {len(self.plan.namespaces)} namespaces ({self.plan.prefix}*)")
        for ns in self.plan.namespaces:
            state.namespaces.append(ns)
        state.save()  # write-ahead: recorded before created
        for ns in self.plan.namespaces:
            netns.add(ns)
        self.progress(f"wiring {len(self.plan.wires)} veth pairs")
        netns.batch(
            None, [netns.veth_command(w.a_ns, w.a_if, w.b_ns, w.b_if) for w in self.plan.wires]
        )
        self.progress("addressing interfaces and routes")
        mgmt_ports = [w.b_if for w in self.plan.wires if w.b_ns == self.plan.mgmt_ns]
        netns.batch(
            self.plan.mgmt_ns,
            [
                "link set lo up",
                f"link add {MGMT_BRIDGE} type bridge",
                f"link set {MGMT_BRIDGE} up",
                *(
                    c
                    for p in mgmt_ports
                    for c in (f"link set {p} master {MGMT_BRIDGE}", f"link set {p} up")
                ),
            ],
        )
        for node in self.plan.nodes.values():
            netns.batch(node.netns, _node_commands(node))
            if node.role.is_router or node.role == Role.NODE:
                netns.sysctls(node.netns, ROUTER_FORWARDING)
        self._write_configs()
        self._start_processes()
        self._wait_ready(timeout)
        state.phase = "up"
        state.save()
        self.progress(f"lab {self.name} is up ({time.monotonic() - started:.1f} s)")

    def _node_dir(self, node: str) -> Path:
        return self.dir / node

    def _write_configs(self) -> None:
        mgmt = self.topology.mgmt_subnet
        (self.dir / "topology.clab.yml").write_text(yaml.safe_dump(dict(self.topology.raw)))
        for node in self.plan.nodes.values():
            d = self._node_dir(node.name)
            d.mkdir(mode=0o755, exist_ok=True)
            if node.role == Role.FRR:
                (d / "zebra.conf").write_text(render.frr_zebra(node, d))
                (d / "bgpd.conf").write_text(render.frr_bgpd(node, mgmt, d))
                routers.prepare_frr_dir(d)
            elif node.role == Role.BIRD:
                (d / "bird.conf").write_text(render.bird(node, mgmt, d))
            elif node.role == Role.NODE:
                (d / "fabricd.yaml").write_text(render.fabricd_yaml(node, self.plan, d / "run"))
        docs = render.fabric_resources(self.plan)
        (self.dir / "fabric-resources.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))

    def _spawn(self, node: NodePlan, what: str, argv: list[str]) -> None:
        child, rec = procs.spawn(
            argv, node.netns, self._node_dir(node.name) / f"{what}.out", node.name, what
        )
        self._children.append(child)
        self.state.add_proc(rec)

    def _start_processes(self) -> None:
        for node in self.plan.nodes.values():
            if node.role == Role.ETCD and node.mgmt is not None:
                self.progress(f"starting etcd ({node.etcd_members} member(s)) in {node.name}")
                self.etcd = EtcdCluster(
                    size=node.etcd_members,
                    host=str(node.mgmt.ip),
                    base_dir=self._node_dir(node.name),
                    netns=node.netns,
                    token=f"fabric-lab-{self.name}",
                )
                for m in self.etcd.members:
                    m.start(self.etcd.initial_cluster, self.etcd.token)
                    assert m.proc is not None
                    self._children.append(m.proc)
                    argv = [str(a) for a in m.proc.args]  # type: ignore[union-attr]
                    if argv[:3] == ["ip", "netns", "exec"]:
                        argv = argv[4:]
                    self.state.add_proc(
                        procs.record(m.proc.pid, argv, node.netns, node.name, f"etcd-{m.name}")
                    )
        for node in self.plan.nodes.values():
            d = self._node_dir(node.name)
            if node.role == Role.FRR:
                self.progress(f"starting FRR (zebra, bgpd) in {node.name}")
                for what, argv in routers.frr_commands(d):
                    self._spawn(node, what, argv)
            elif node.role == Role.BIRD:
                self.progress(f"starting BIRD in {node.name}")
                self._spawn(node, "bird", routers.bird_command(d))

    def _wait_ready(self, timeout: float) -> None:
        if self.etcd is not None:
            self.progress("waiting for etcd")
            self.etcd.wait_healthy(timeout)
        for node in self.plan.nodes.values():
            if node.role.is_router:
                self.progress(f"waiting for {node.role} in {node.name}")
                self.wait_for(
                    functools.partial(self._router_ready, node),
                    timeout,
                    what=f"{node.role} in {node.name} to answer",
                )

    def _router_ready(self, node: NodePlan) -> bool:
        dead = [r for r in self.state.procs if r.node == node.name and not procs.matches(r)]
        if dead:
            logs = [self._node_dir(node.name) / f"{r.what}.out" for r in dead]
            tail = " | ".join(p.read_text(errors="replace")[-500:] for p in logs if p.exists())
            raise LabError(f"{[r.what for r in dead]} in {node.name} exited: {tail}")
        return routers.ready(node.role, self._node_dir(node.name))

    def down(self) -> bool:
        """Tear the lab down (idempotent); returns False when nothing was there."""
        self.progress(f"tearing down lab {self.name}")
        self._state = None
        self.etcd = None
        try:
            return teardown(self.dir)
        finally:
            for child in self._children:
                if child.poll() is None:  # not ours any more to kill; just reap
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        child.wait(5)
            self._children = [c for c in self._children if c.returncode is None]

    # ----------------------------------------------------------------- the fabric

    def fabricctl(
        self, args: Sequence[str], node: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``fabricctl`` against the lab's etcd from inside a host's namespace."""
        host = node or self.nodes(Role.NODE)[0]
        argv = [str(BIN / "fabricctl"), "--etcd-endpoints", ",".join(self.etcd_endpoints), *args]
        return self.exec(host, argv, timeout=timeout)

    def configure_fabric(self) -> None:
        """Write the lab's BGP configuration, BGP peers and IP pool into etcd (idempotent)."""
        r = self.fabricctl(["apply", "-f", str(self.dir / "fabric-resources.yaml")])
        if r.returncode != 0:
            raise LabError(
                f"failed to configure the fabric: {r.stderr.strip() or r.stdout.strip()}"
            )

    def start_fabricd(self, node: str) -> None:
        """Start fabricd in a linux node from its generated ``<labdir>/<node>/fabricd.yaml``."""
        n = self.node(node)
        if n.role != Role.NODE:
            raise LabError(f"{node} is not a host node")
        if self.fabricd_running(node):
            raise LabError(f"fabricd already runs in {node}")
        self.state.procs = [
            r for r in self.state.procs if not (r.node == node and r.what == "fabricd")
        ]
        self._spawn(
            n,
            "fabricd",
            [
                sys.executable,
                "-m",
                "fabric.agent.daemon",
                "--config",
                str(self.fabricd_config_path(node)),
            ],
        )

    def fabricd_record(self, node: str) -> ProcRecord | None:
        for r in self.state.procs:
            if r.node == node and r.what == "fabricd" and procs.matches(r):
                return r
        return None

    def fabricd_running(self, node: str) -> bool:
        return self.fabricd_record(node) is not None

    def fabricd_pid(self, node: str) -> int:
        rec = self.fabricd_record(node)
        if rec is None:
            raise LabError(f"fabricd is not running in {node}")
        return int(rec.pid)

    def stop_fabricd(self, node: str, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        """Signal fabricd in ``node`` (by its recorded PID) and wait until it is gone."""
        rec = self.fabricd_record(node)
        if rec is None:
            return
        os.kill(rec.pid, sig)
        end = time.monotonic() + timeout
        while procs.alive(rec.pid):
            procs.reap(rec.pid)
            if time.monotonic() > end:
                raise LabError(f"fabricd in {node} did not exit within {timeout:.0f} s of {sig}")
            time.sleep(0.05)

    def restart_router(self, node: str) -> None:
        """Stop a router's processes (by recorded PID) and start them again."""
        n = self.node(node)
        if not n.role.is_router:
            raise LabError(f"{node} is not a router")
        mine = [r for r in self.state.procs if r.node == node]
        procs.terminate([r.pid for r in mine if procs.matches(r)], 10)
        self.state.procs = [r for r in self.state.procs if r.node != node]
        self.state.save()
        d = self._node_dir(node)
        if n.role == Role.FRR:
            for what, argv in routers.frr_commands(d):
                self._spawn(n, what, argv)
        else:
            self._spawn(n, "bird", routers.bird_command(d))
        self.wait_for(functools.partial(self._router_ready, n), 30, what=f"{node} to answer")

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

    def start_fabric(self, timeout: float = 60.0) -> None:
        """Configure the datastore, start fabricd on every host, wait until all are ready."""
        self.configure_fabric()
        hosts = self.nodes(Role.NODE)
        for h in hosts:
            self.progress(f"starting fabricd in {h}")
            self.start_fabricd(h)
        for h in hosts:
            self.wait_for(
                functools.partial(self._fabricd_ready, h), timeout, what=f"fabricd in {h} ready"
            )

    def _fabricd_ready(self, node: str) -> bool:
        if not self.fabricd_running(node):
            log = self._node_dir(node) / "fabricd.out"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise LabError(f"fabricd in {node} exited: {tail}")
        return self.health(node, "/readyz")[0] == 200

    def set_links(self, node: str, state: str) -> None:
        """Every interface of ``node`` (management and data) ``up`` or ``down``, as when it
        is powered off and on. Up also puts its default route back: the kernel removed it
        with the link, and a real host's network configuration would restore it."""
        n = self.node(node)
        cmds = [f"ip link set {i} {state}" for i in (["eth0"] if n.mgmt else []) + sorted(n.ifaces)]
        gws = n.default_via
        if state == "up" and gws:
            hops = f"via {gws[0]}" if len(gws) == 1 else " ".join(f"nexthop via {g}" for g in gws)
            cmds.append(f"ip route replace default {hops}")
        self.exec(node, "; ".join(cmds), check=True)

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

    # ----------------------------------------------------------------- queries
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
