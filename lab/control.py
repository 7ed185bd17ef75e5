"""``LabControl``: the processes of a lab that is up: fabricd in hosts (start, stop by
recorded PID with any signal, readiness), routers restarted, hosts' links down and up,
``fabricctl`` against the lab's etcd. Every process is recorded in ``state.json`` right
after it starts, so ``down()`` stops it."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lab import procs, routers
from lab.plan import NodePlan
from lab.state import ProcRecord
from lab.topology import Role
from lab.view import LabError, LabView

BIN = Path(sys.executable).parent


class LabControl(LabView):
    def _spawn(self, node: NodePlan, what: str, argv: list[str]) -> None:
        child, rec = procs.spawn(
            argv, node.netns, self._node_dir(node.name) / f"{what}.out", node.name, what
        )
        self._children.append(child)
        self.state.add_proc(rec)

    def _router_ready(self, node: NodePlan) -> bool:
        dead = [r for r in self.state.procs if r.node == node.name and not procs.matches(r)]
        if dead:
            logs = [self._node_dir(node.name) / f"{r.what}.out" for r in dead]
            tail = " | ".join(p.read_text(errors="replace")[-500:] for p in logs if p.exists())
            raise LabError(f"{[r.what for r in dead]} in {node.name} exited: {tail}")
        return routers.ready(node.role, self._node_dir(node.name))

    def fabricctl(
        self, args: Sequence[str], node: str | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``fabricctl`` against the lab's etcd from inside a host's namespace."""
        host = node or self.nodes(Role.NODE)[0]
        argv = [str(BIN / "fabricctl"), *self.etcd_args, *args]
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

    def restart_router(self, node: str, tries: int = 3) -> None:
        """Stop a router's processes (by recorded PID) and start them again. A router
        daemon started right after its predecessor stopped was seen to exit at once, with
        no output (FRR's bgpd, BIRD; rare; most likely the empty command line of a process
        in its exec, which procs.matches now reads again): then stop what is left and start
        again, up to ``tries`` times."""
        n = self.node(node)
        if not n.role.is_router:
            raise LabError(f"{node} is not a router")
        for attempt in range(1, tries + 1):
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
            try:
                self.wait_for(functools.partial(self._router_ready, n), 30,
                              what=f"{node} to answer")  # fmt: skip
                return
            except LabError as e:
                if attempt == tries:
                    raise
                self.progress(f"{node}: {e}; starting it again ({attempt + 1}/{tries})")
                time.sleep(1.0)

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
