"""``Lab``: bring a topology up from network namespaces and tear it down. Its queries are
``LabView``'s (lab/view.py), its process control (fabricd, routers, links) ``LabControl``'s
(lab/control.py).

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
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lab import netns, procs, render, routers, tls
from lab.control import LabControl
from lab.etcd import EtcdCluster
from lab.plan import MGMT_BRIDGE, NodePlan, Plan, build
from lab.state import LabState, check_name, lab_dir
from lab.topology import Role, Topology, load
from lab.view import LabError

ROUTER_FORWARDING = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.conf.all.rp_filter": "0",
    "net.ipv4.conf.default.rp_filter": "0",
}


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


class Lab(LabControl):
    """A topology run from network namespaces. Use as a context manager: up, then down."""

    def __init__(
        self,
        topology: str | Path | Mapping[str, Any] | Topology,
        name: str | None = None,
        progress: Callable[[str], None] | None = None,
        tls: bool = False,
    ) -> None:
        self.tls = tls
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
        lab = cls(state.info["topology"], name=name, progress=progress,
                  tls=bool(state.info.get("tls")))  # fmt: skip
        lab._state = state
        return lab

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

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
        self._state.info = {"topology": dict(self.topology.raw), "tls": self.tls}
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
        if self.tls:
            self.progress("making a CA, etcd's server and the clients' certificates")
            hosts = [str(n.mgmt.ip) for n in self.plan.nodes.values()
                     if n.role == Role.ETCD and n.mgmt is not None]  # fmt: skip
            tls.make(self.dir / "pki", hosts, cn=f"fabric-lab {self.name}")
        self._write_configs()
        self._start_processes()
        self._wait_ready(timeout)
        state.phase = "up"
        state.save()
        self.progress(f"lab {self.name} is up ({time.monotonic() - started:.1f} s)")

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
                (d / "fabricd.yaml").write_text(
                    render.fabricd_yaml(node, self.plan, d / "run", self.pki)
                )
        docs = render.fabric_resources(self.plan)
        (self.dir / "fabric-resources.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))

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
                    tls=self.pki,
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
