"""The node agent: the composition root that runs everything a node does.

Start-up order, event sources and reconcilers: docs/design/agent.md ("Start-up order":
config, kernel routes adopted, etcd registration, local pods, full resync, BGP, then the
health server, the CNI socket and the event loop; each step finishes before the next).

Learned routes adopted from the kernel at start (a restart) stay installed until the RIB
has converged: every established session has sent End-of-RIB, or the graceful-restart
time has passed. Only then are adopted routes nobody announced any more removed. So a
restart of fabricd (or of ExaBGP) never takes a route away that is still valid.

Stop (``stop()``; SIGTERM): stop taking CNI requests (those in flight finish), stop ExaBGP
(sessions close without a NOTIFICATION, so graceful-restart helpers keep our routes), leave
kernel routes in place, do not revoke the node lease (a restart within its TTL keeps the
node known).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from bgp.import_policy import ImportPolicy
from bgp.model import (
    EndOfRib,
    Event,
    IPAddress,
    IPNetwork,
    NodeInfo,
    PeerState,
    PeerUpdate,
    Session,
    SessionState,
    SpeakerRestarted,
)
from bgp.rib import Rib
from bgp.speaker import Speaker
from fabric.agent import systemd
from fabric.agent.announce import AnnounceGate
from fabric.agent.config import AgentConfig
from fabric.agent.denied import DeniedTraffic
from fabric.agent.diagnostics import refresh_policy_counters, route_lookup
from fabric.agent.health import HealthServer
from fabric.agent.intent import BlockIndex, Intent, borrowed_ips, compute, decode
from fabric.agent.kernel_routes import Gateways, desired_routes, kernel_changes
from fabric.agent.metrics import Metrics
from fabric.agent.policy import PREFIXES as POLICY_PREFIXES
from fabric.agent.policy import CacheReader, PolicyAgent
from fabric.agent.probes import Probes
from fabric.agent.registration import Registration
from fabric.agent.sessions import Convergence, required_peers_up
from fabric.agent.snapshots import SnapshotWriter
from fabric.agent.startup import StartClock
from fabric.agent.status import NodeView, StatusPublisher, node_view
from fabric.agent.watch import Cache
from fabric.dataplane import policy_snapshot
from fabric.dataplane.nat import NatTable
from fabric.dataplane.netlink import KernelRoute, NetlinkError, ensure_rt_proto_name
from fabric.dataplane.netlink.sysctls import write_sysctls
from fabric.dataplane.pods import Dataplane
from fabric.dataplane.policy_table import PolicyTable
from fabric.dataplane.route_table import RouteTable
from fabric.workloads.deps import Deps
from fabric.workloads.pending import PendingDir
from fabric.workloads.pod_ipam import PodIPAM
from fabric.workloads.server import CNIServer, answer
from fabric.workloads.state import StateDir
from fabric.workloads.verbs import Workloads
from ipam import keys
from ipam.allocator import Allocator
from ipam.batch import BatchingAllocator
from ipam.errors import IPAMError
from ipam.resources import Node, loads
from ipam.selector import parse as parse_selector
from ipam.store import Store
from ipam.tls import TLSConfig

log = logging.getLogger("fabric.agent.agent")

RECONCILE_DEBOUNCE = 0.01  # coalesces a burst of watch events into one reconcile
STATUS_INTERVAL = 2.0
RECONFIGURE_WAIT = 1.0  # seconds a reconcile waits for ExaBGP to confirm a reload
HOST_SYSCTLS = (
    ("net.ipv4.conf.all.ignore_routes_with_linkdown", "1", True),
    ("net.ipv6.conf.all.ignore_routes_with_linkdown", "1", False),
)


def _check_selector(selector: str) -> None:
    parse_selector(selector)


class Agent:
    def __init__(self, cfg: AgentConfig, phases: dict[str, float] | None = None) -> None:
        """``phases``: start-up marks so far (fabric.agent.daemon), continued by ``start``."""
        self.cfg = cfg
        self.clock = StartClock(phases)
        self.metrics = Metrics()
        e = cfg.etcd
        tls = TLSConfig(e.ca_file, e.cert_file, e.key_file) if e.use_tls else None
        self.store = Store(cfg.etcd.endpoints, cfg.etcd.prefix, tls, deadline=cfg.etcd.timeout)
        self.local = NodeInfo(name=cfg.node_name, ipv4=cfg.addresses.ipv4, ipv6=cfg.addresses.ipv6,
                              as_number=cfg.as_number, labels=dict(cfg.labels),
                              rr_cluster_id=cfg.route_reflector_cluster_id)  # fmt: skip
        self.interfaces = tuple(
            i for i in (cfg.addresses.ipv4, cfg.addresses.ipv6, *cfg.interfaces) if i is not None
        )
        self.node = Node(
            name=cfg.node_name,
            labels=dict(cfg.labels),
            addresses=tuple(str(i) for i in self.interfaces),
            as_number=cfg.as_number,
            route_reflector_cluster_id=cfg.route_reflector_cluster_id,
        )
        self.registration = Registration(
            self.store, self.node, cfg.lease_ttl, self.metrics.etcd_error
        )
        self.cache = Cache(self.store, [keys.POOLS, keys.CONFIG_BGP, keys.PEERS, keys.NODES,
                                        keys.node_affinities(cfg.node_name), keys.BLOCKS,
                                        *POLICY_PREFIXES],
                           self._changed, cfg.resync_interval, self.metrics.etcd_error)  # fmt: skip
        self.blocks = BlockIndex()
        self.rib = Rib(
            ImportPolicy(
                allowed=(),
                own=frozenset(),
                allow_default=False,
                local_as=cfg.as_number or 0,
                router_id=self.local.router_id,
                own_addresses=frozenset(),
            ),
            self._rejected,
        )
        self.routes = RouteTable(cfg.routes.protocol, cfg.routes.table)
        self.nat = NatTable()
        self.dataplane = Dataplane(log.getChild("dataplane"))
        self.speaker = Speaker(
            Path(cfg.run_dir) / "bgp", self._on_bgp_event, cfg.bgp.exabgp, log.getChild("speaker")
        )
        self.policy_inputs = CacheReader(lambda: self.cache.data, self.blocks.blocks)
        self.snapshots = SnapshotWriter(policy_snapshot.path_in(cfg.cni.state_dir),
                                        policy_snapshot.TABLE, cfg.node_name)  # fmt: skip
        self.policy = PolicyAgent(
            cfg.node_name,
            PolicyTable(),
            self.policy_inputs,  # told of every change in _changed
            lambda: self.workloads.records.values(),  # noqa: PLW0108 (made below, replaced by recover)
            cfg.policy.cut_established,
            cfg.policy.resync_interval,
            self.metrics.observe_reconcile,
            self.snapshots.wrote,
        )
        self.denied = DeniedTraffic(
            cfg.node_name,
            cfg.policy,
            self.policy,
            lambda k, v: self.store.put(k, v, self.registration.lease),
        )
        self.probes = Probes(
            self.store, self.speaker, self.metrics, self._required_peers_up, self.policy.check
        )
        alloc = Allocator(self.store)
        announce = AnnounceGate(lambda: self.intent, self.speaker.covered_since, self.speaker.wait_covered,
                                cfg.cni.announce_wait, cfg.cni.announce_settle, self.metrics, log)  # fmt: skip
        self.workloads = Workloads(
            Deps(
                node=cfg.node_name,
                ipam=PodIPAM(alloc, BatchingAllocator(alloc), cfg.node_name),
                dataplane=self.dataplane,
                routes=self.routes,
                state=StateDir(Path(cfg.cni.state_dir), log.getChild("workloads")),
                datastore_ok=self.probes.etcd_reachable,
                pending=PendingDir(Path(cfg.cni.state_dir), log.getChild("workloads")),
                policy=self.policy,
                announce=announce,
            ),
            log.getChild("workloads"),
        )
        self.cni = CNIServer(
            Path(cfg.cni.socket),
            functools.partial(answer, self.workloads, self.metrics.cni_request),
        )
        self.health = HealthServer(
            cfg.health.listen, self.probes.live, self.probes.ready, self.metrics.registry,
            route_lookup=functools.partial(route_lookup, cfg.node_name, cfg.routes.protocol),
            before_metrics=functools.partial(refresh_policy_counters, self.policy.table,
                                             self.metrics, lambda: self.policy.compiled),
        )  # fmt: skip
        self.status = StatusPublisher(self._status_view, self.routes, self.metrics, self.store,
                                      self.registration, self.rib.best_view)  # fmt: skip
        self.intent: Intent | None = None
        self.convergence = Convergence({}, 0.0)  # replaced at start, with the adopted routes
        self._dirty = asyncio.Event()
        self._changed_prefixes: set[str] = set()  # watched prefixes changed since the last pass
        self._borrowed: tuple[IPAddress, ...] = ()  # as of the last pass
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []  # run forever: one that ends is a failure
        self._jobs: set[asyncio.Task[Any]] = set()  # one-off work, held until it ends
        self._gateways = Gateways()

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        cfg = self.cfg
        log.info("fabricd starting as node %s", cfg.node_name)
        ensure_rt_proto_name(cfg.routes.protocol, cfg.routes.protocol_name)
        try:
            # ECMP over several uplinks: never use a next hop whose link is down (a ToR
            # that lost power), instead of waiting out the BGP hold time.
            write_sysctls(HOST_SYSCTLS, only_if_differs=True)
        except (OSError, NetlinkError) as e:
            log.warning("failed to set host sysctls %s: %s", HOST_SYSCTLS, e)
        n = await self.routes.adopt()
        adopted = {
            dst: r
            for dst, r in self.routes.installed().items()
            if not r.blackhole and r.dev is None
        }
        log.info("adopted %d kernel routes with protocol %d", n, cfg.routes.protocol)
        self.clock.mark("kernel routes")
        await self.registration.register()
        await self.cache.load()
        self.clock.mark("etcd")
        await self.workloads.recover()  # local pods' host routes, before the first resync
        # DELs recorded while fabricd was down: before the first resync and the first ADD
        left = await self.workloads.pending.finish()
        if left:
            log.warning("%d recorded DELs could not be finished yet; retried", left)
        deadline = time.monotonic() + cfg.bgp.graceful_restart_time
        self.convergence = Convergence(adopted, deadline)
        intent = self._compute()
        await self._apply(intent, first=True)
        try:  # adopt the policy table (kept in the kernel across restarts) before any ADD
            await self.policy.program()
        except Exception:
            log.error("%s; /readyz fails until a batch works", self.policy.problem)
        self.clock.mark("policy" if self.policy.problem is None else "policy failed")
        # the adverts go in with the start: ExaBGP may bring a session up before start()
        # returns, and its End-of-RIB must follow our routes (the ToR drops what it kept)
        await self.speaker.start(
            list(intent.sessions), self.local.router_id, adverts=intent.adverts
        )
        self.clock.mark("bgp")
        await self.health.start()
        await self.cni.start()
        self._tasks = [
            asyncio.create_task(self.cache.run(), name="cache"),
            asyncio.create_task(self.registration.keep_alive(), name="lease"),
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
            asyncio.create_task(self._converge_loop(), name="converge"),
            asyncio.create_task(self._kernel_resync_loop(), name="kernel resync"),
            asyncio.create_task(self.routes.run(), name="routes"),
            asyncio.create_task(self.policy.run(), name="policy"),
            asyncio.create_task(self.denied.run(), name="denied log"),
            asyncio.create_task(self.snapshots.run(), name="policy snapshot"),
            asyncio.create_task(self.status.run(STATUS_INTERVAL), name="status"),
            asyncio.create_task(self.workloads.pending.loop(), name="recorded DELs"),
        ]
        interval = systemd.watchdog_interval()
        if cfg.watchdog and interval:
            self._tasks.append(
                asyncio.create_task(systemd.watchdog_loop(interval), name="watchdog")
            )
        systemd.ready()
        self.clock.mark("ready")
        self.metrics.set_start_phases(self.clock.since_start())
        log.info("fabricd ready: %d sessions, %d announcements; start-up %s", len(intent.sessions),
                 len(intent.adverts), self.clock.summary())  # fmt: skip

    async def run(self) -> None:
        """Start, then run until ``stop()``; a failing background task stops the agent."""
        await self.start()
        stop = asyncio.create_task(self._stopping.wait())
        done, _ = await asyncio.wait([stop, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is stop:
                continue
            # Every background task runs forever: one that ended, however, is a failure
            # (exit non-zero, so systemd's Restart=on-failure brings fabricd back).
            cause = None if t.cancelled() else t.exception()
            why = "was cancelled" if t.cancelled() else f"failed: {cause}" if cause else "ended"
            log.error("background task %s %s; stopping", t.get_name(), why)
            await self.shutdown()
            raise RuntimeError(f"background task {t.get_name()} {why}") from cause
        await self.shutdown()

    def stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        systemd.stopping()
        log.info("fabricd stopping; kernel routes stay in place")
        await self.cni.stop()  # first: no new CNI work; requests in flight finish
        for t in (*self._tasks, *self._jobs):
            t.cancel()
        for t in (*self._tasks, *self._jobs):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.routes.flush()
        self.snapshots.flush()  # the table as it is now, for a start that finds none
        await self.speaker.stop()
        await self.health.stop()
        await self.dataplane.close()
        with contextlib.suppress(Exception):
            await self.store.close()

    # ----------------------------------------------------------------- reconcile

    def _changed(self, prefix: str) -> None:
        if prefix in POLICY_PREFIXES or prefix == keys.BLOCKS:
            self.policy_inputs.changed(prefix)
            self.policy.changed()
            if prefix != keys.BLOCKS:
                return  # the routing intent does not read policy objects
        if prefix == keys.NODES and keys.node(self.cfg.node_name) not in self.cache.items(
            keys.NODES
        ):
            self._spawn(self._reregister(), "re-register")
        self._changed_prefixes.add(prefix)
        self._dirty.set()

    def _only_addresses_changed(self, changed: set[str]) -> bool:
        """Only blocks changed, and not the addresses this node borrows from others' blocks:
        an address assigned or released anywhere in the cluster (every pod ADD and DEL)
        changes its block, but blocks matter to the intent only through those borrowed
        addresses, so the whole pass (0.4-0.6 ms of loop CPU) can be skipped."""
        if changed != {keys.BLOCKS} or self.intent is None:
            return False
        blocks = self.blocks.blocks(self.cache.data.get(keys.BLOCKS, {}))
        return tuple(borrowed_ips(blocks, self.cfg.node_name)) == self._borrowed

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run one-off work in the background. The loop holds tasks only weakly: the agent
        keeps each one until it ends (a bare create_task can be collected mid-run), logs a
        failure, and cancels what is left at shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._jobs.add(task)
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[Any]) -> None:
        self._jobs.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.error("background job %s failed: %s", task.get_name(), e, exc_info=e)

    async def _reregister(self) -> None:
        with contextlib.suppress(IPAMError):
            await self.registration.ensure()

    def _compute(self) -> Intent:
        mine = self.cache.items(keys.NODES).get(keys.node(self.cfg.node_name))
        if mine is not None:  # labels set with `fabricctl node label` count for selectors
            with contextlib.suppress(ValueError, IPAMError):
                doc = Node.from_json(self.cfg.node_name, loads(mine.value))
                self.local = replace(self.local, labels=dict(doc.labels))
        inputs = decode(self.local, self.interfaces, self.cache.data, self.blocks, _check_selector)
        self._borrowed = inputs.borrowed
        return compute(inputs, lambda sel, labels: bool(parse_selector(sel).matches(labels)))

    async def _reconcile_loop(self) -> None:
        """Reconcile at once when idle (a new block is announced without delay); changes
        arriving during or just after a pass are coalesced into the next one."""
        last, failed = 0.0, False
        while True:
            await self._dirty.wait()
            idle = time.monotonic() - last
            if idle < RECONCILE_DEBOUNCE:
                await asyncio.sleep(RECONCILE_DEBOUNCE - idle)
            self._dirty.clear()
            changed, self._changed_prefixes = self._changed_prefixes, set()
            if not failed and self._only_addresses_changed(changed):
                continue
            started = last = time.monotonic()
            failed = False
            try:
                await self._apply(self._compute())
            except Exception:
                failed = True
                log.exception("reconcile failed; retrying at the next change or resync")
            self.metrics.observe_reconcile("announcements", time.monotonic() - started)

    async def _apply(self, intent: Intent, first: bool = False) -> None:
        old = self.intent
        self.intent = intent
        if old is None or old.policy != intent.policy:
            self._route_changes(self.rib.set_policy(intent.policy))
        if old is None or old.limits != intent.limits:
            self._route_changes(self.rib.set_limits(dict(intent.limits)))
        if old is None or old.sessions != intent.sessions:
            self.rib.set_restart_times({s.peer_ip: s.restart_time for s in intent.sessions})
        old_bh = old.blackholes if old is not None else frozenset()
        for dst in old_bh - intent.blackholes:
            self.routes.set(dst, None)
        for dst in intent.blackholes - old_bh:
            self.routes.set(dst, KernelRoute(dst=dst, blackhole=True))
        if first:
            # Own blocks are blackholed, everything else learned is adopted until converged,
            # local pods keep their host routes (from the CNI state dir); stale dev routes go.
            self.routes.replace_all(self._desired_routes())
            await self.routes.flush()
        if old is not None and old.adverts != intent.adverts:
            self.speaker.set_announcements(intent.adverts)
        if old is not None and old.sessions != intent.sessions:
            log.info("BGP sessions changed: reconfiguring the speaker")
            # ExaBGP may skip a reload while routes are queued; the speaker keeps retrying
            # in the background, so wait only briefly rather than hold every reconcile.
            await self.speaker.reconfigure(list(intent.sessions), timeout=RECONFIGURE_WAIT)
        if old is None or (old.nat_cidrs, old.pool_cidrs) != (intent.nat_cidrs, intent.pool_cidrs):
            try:
                await self.nat.apply(intent.nat_cidrs, intent.pool_cidrs)
            except Exception as e:  # nft missing or refused: routes must still work
                log.error("failed to program NAT for natOutgoing pools: %s", e)

    # ----------------------------------------------------------------- BGP events

    def _rejected(self, peer: IPAddress, prefix: IPNetwork, reason: str) -> None:
        self.metrics.prefixes_rejected(str(peer))
        log.info("rejected %s from %s: %s", prefix, peer, reason)

    def _on_bgp_event(self, ev: Event) -> None:
        if isinstance(ev, SpeakerRestarted):
            self.metrics.exabgp_restart()
            self.convergence.speaker_restarted()
            log.warning("ExaBGP restarted (%d restarts); learned routes kept as stale", ev.restarts)
        elif isinstance(ev, EndOfRib):
            self.convergence.end_of_rib(ev.peer)
        elif isinstance(ev, PeerState) and ev.state != SessionState.ESTABLISHED:
            self.convergence.session_down(ev.peer)
        self._route_changes(self.rib.apply(ev, time.monotonic()))
        if isinstance(ev, PeerUpdate | EndOfRib) and not self.convergence.converged:
            self._check_converged()

    def _route_changes(self, changes: dict[IPNetwork, frozenset[IPAddress] | None]) -> None:
        if changes:
            own = self.intent.blackholes if self.intent is not None else frozenset()
            keeps, local = self.convergence.kept(), self.workloads.routed
            self.routes.update(kernel_changes(changes, own, local, keeps, self._gateways))

    def _sessions(self) -> tuple[Session, ...]:
        return self.intent.sessions if self.intent is not None else ()

    def _established(self) -> set[IPAddress]:
        return {ip for ip, st in self.speaker.sessions_status().items()
                if st.state == SessionState.ESTABLISHED}  # fmt: skip

    def _check_converged(self) -> None:
        planned = [s.peer_ip for s in self._sessions()]
        stale = self.convergence.check(
            time.monotonic(), planned, self._established(), self.rib.best
        )
        if stale is not None:
            for dst in stale:
                self.routes.set(dst, None)
            log.info("RIB converged; removing %d adopted routes nobody announces", len(stale))

    def _desired_routes(self) -> dict[IPNetwork, KernelRoute]:
        own = self.intent.blackholes if self.intent is not None else frozenset()
        return desired_routes(self.convergence.adopted, self.rib.best(), own,
                              self.workloads.routes(), self._gateways)  # fmt: skip

    async def _kernel_resync_loop(self) -> None:
        """Every routes.resyncInterval: diff the kernel against the whole desired table and
        repair only the difference (routes changed or removed behind our back)."""
        while True:
            await asyncio.sleep(self.cfg.routes.resync_interval)
            with self.metrics.time_reconcile("full_resync"):
                self.routes.replace_all(self._desired_routes())
                result = await self.routes.flush()
            if result.added or result.replaced or result.removed:
                log.warning(
                    "kernel resync repaired routes: %d added, %d replaced, %d removed",
                    result.added, result.replaced, result.removed,
                )  # fmt: skip

    async def _converge_loop(self) -> None:
        while not self.convergence.converged:
            await asyncio.sleep(0.5)
            self._check_converged()
        while True:
            await asyncio.sleep(1.0)
            self._route_changes(self.rib.expire(time.monotonic()))

    # ----------------------------------------------------------------- health

    def _required_peers_up(self) -> tuple[bool, str]:
        required = [s.peer_ip for s in self._sessions() if s.required]
        return required_peers_up(self.cfg.bgp.required_peers, required, self._established())

    def _status_view(self) -> NodeView:
        blocks = len(self.intent.blackholes) if self.intent is not None else None
        return node_view(self.cfg.node_name, self._sessions(), self.speaker, self.rib,
                         self.convergence.converged, blocks, self._required_peers_up(),
                         len(self.workloads.routed))  # fmt: skip
