"""The kernel route reconciler: desired routes by prefix -> one routing table, batched.

Ownership is by route protocol number: a RouteTable writes, replaces and deletes only routes
carrying its ``proto`` in its ``table``, and a route of any other protocol at a prefix it wants
is reported as a conflict, never replaced. Design, invariants and failure handling:
docs/design/routes.md.

Typical use by the agent::

    table = RouteTable(proto=201)
    await table.adopt()                 # routes of a previous run stay; nothing is flushed
    runner = asyncio.create_task(table.run())
    table.set(prefix, KernelRoute(prefix, (node_ip,)))   # cheap; coalesced per prefix
    table.replace_all(desired)          # periodic full resync: only the difference is written
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from fabric.dataplane.gc_pause import gc_paused as _gc_paused
from fabric.dataplane.netlink import (
    RT_TABLE_MAIN,
    DumpedRoute,
    IPNetwork,
    KernelRoute,
    NetlinkError,
    RouteError,
    RouteOp,
    RouteSocket,
)

# Fewer writes than this run on the event loop (about 30 us each); more go to a thread.
INLINE_OPS = 64
# Flush this long after the first change of a burst: long enough to gather a burst of BGP
# updates into one batch, short enough not to matter for a new pod or a withdrawn node.
FLUSH_DELAY = 0.005
# Failed routes (gateway not reachable yet, device not created yet) are retried after
# RETRY_MIN, doubling up to RETRY_MAX while they keep failing.
RETRY_MIN, RETRY_MAX = 0.5, 30.0
# While run() runs, cyclic GC is paused from the first set() of a burst until no set() came
# for BURST_LINGER s and every change is written (see _GCPause: a burst of BGP updates
# arrives in reads with short gaps), but never longer than BURST_GC_MAX s, so steady churn
# still gets collected.
BURST_LINGER, BURST_GC_MAX = 0.25, 10.0

# RouteOp(route, delete, exclusive) without its Python-level __new__ (0.26 -> 0.14 us; a
# flush of 100k builds one per route)
_op = tuple.__new__


@dataclass(frozen=True, slots=True)
class FlushResult:
    """What one flush did. ``failed`` gives the reason per prefix (``errnos`` its errno; a
    conflict with another protocol's route is EEXIST); failed prefixes stay pending.
    """

    added: int = 0
    replaced: int = 0
    removed: int = 0
    failed: dict[IPNetwork, str] = field(default_factory=dict)
    errnos: dict[IPNetwork, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouteStats:
    """Counters for /metrics (``installed`` = unicast via gateways + blackholes + devices)."""

    installed: int
    blackholes: int
    devices: int
    pending: int
    failed: int
    conflicts: int
    flushes: int
    last_flush_seconds: float
    added_total: int
    replaced_total: int
    removed_total: int
    failed_total: int  # route changes the kernel refused (each attempt counts)


@dataclass(slots=True)
class _Plan:
    ops: list[RouteOp] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)  # "add" | "replace" | "remove" | "stray"
    # make-before-break: a route whose metric changes is added first; its old one is deleted
    # only once the new one is in (second write)
    old: dict[IPNetwork, KernelRoute] = field(default_factory=dict)


class RouteTable:
    """Desired routes of one (proto, table) in one netns, applied to the kernel in batches.

    Invariants: only routes with ``proto`` are ever written over or deleted; ``installed()``
    is what the kernel has (as of the last write or dump) for prefixes of ours; a prefix is
    pending from ``set``/``replace_all`` until a flush gets the kernel to match or reports it.
    One instance per (proto, table): two would see each other's routes as their own.
    """

    def __init__(
        self,
        proto: int,
        table: int = RT_TABLE_MAIN,
        netns: str | None = None,
        batch: int = 10000,
        log: logging.Logger | None = None,
    ) -> None:
        if not 0 < proto < 256:
            raise ValueError(f"route protocol {proto}: must be 1..255")
        self.proto, self.table, self.netns, self.batch = proto, table, netns, max(1, batch)
        self.log = log or logging.getLogger(__name__)
        self._sock: RouteSocket | None = None
        self._desired: dict[IPNetwork, KernelRoute] = {}
        self._installed: dict[IPNetwork, KernelRoute] = {}
        self._foreign: dict[IPNetwork, int] = {}  # prefix -> protocol of a route not ours
        self._strays: list[KernelRoute] = []  # ours, a second metric for an installed prefix
        self._dirty: set[IPNetwork] = set()
        self._failed: dict[IPNetwork, RouteError] = {}
        self._authoritative = False  # replace_all() seen: _desired is the whole table
        self._need_dump = False
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._flushes = 0
        self._generation = 0
        self._updates = 0  # update() calls with changes, kernel changed or not
        self._changed_at = 0.0  # time.monotonic() of the last generation change
        self._last_flush = 0.0
        self._totals = {"add": 0, "replace": 0, "remove": 0, "failed": 0}
        self._running = False
        self._burst: asyncio.TimerHandle | None = None  # GC paused: the check that resumes it
        self._burst_since = self._last_set = 0.0
        # (generation, blackholes, devices): stats() walks 100k installed routes only when
        # they changed, not at every status publish of an idle node
        self._counted = (-1, 0, 0)

    # ------------------------------------------------------------------ desired state

    def set(self, dst: IPNetwork, route: KernelRoute | None) -> None:
        """Want ``route`` at ``dst`` (None: no route of ours there). Cheap; the last call per
        prefix before a flush wins.
        """
        self.update({dst: route})

    def update(
        self,
        changes: Mapping[IPNetwork, KernelRoute | None]
        | Iterable[tuple[IPNetwork, KernelRoute | None]],
    ) -> None:
        """``set`` for each (dst, route) of ``changes``, in one call: a burst of 100k
        learned or withdrawn routes pays the bookkeeping (clock, wake-up, GC pause) once.
        A dict's prefixes join the pending set with the hashes it holds (no Python hash
        call, ``Prefix4.__hash__``, per prefix): ``kernel_changes`` gives one."""
        wanted = changes if isinstance(changes, dict) else dict(changes)  # the last one wins
        if not wanted:
            return
        self._updates += 1
        self._dirty.update(wanted)
        desired = self._desired
        for dst, route in wanted.items():
            if route is None:
                desired.pop(dst, None)
            else:
                # `is not` first: ipaddress's != runs its Python __eq__ (0.5 us per route)
                if route.dst is not dst and route.dst != dst:
                    raise ValueError(f"route for {route.dst} set at {dst}")
                desired[dst] = route
        self._touched()

    def _touched(self) -> None:
        if self._running:
            self._last_set = time.monotonic()
            if self._burst is None:
                self._burst_since = self._last_set
                _gc_paused.pause()
                self._burst = asyncio.get_running_loop().call_later(BURST_LINGER, self._burst_check)
        self._wake.set()

    def replace_all(self, desired: Mapping[IPNetwork, KernelRoute]) -> None:
        """The table becomes exactly ``desired``. The next flush dumps the kernel first, so
        routes of ours removed or changed behind our back are repaired, and then writes only
        the difference.
        """
        for dst, route in desired.items():
            if route.dst is not dst and route.dst != dst:
                raise ValueError(f"route for {route.dst} set at {dst}")
        self._desired = dict(desired)
        self._authoritative = self._need_dump = True
        self._wake.set()

    def installed(self) -> dict[IPNetwork, KernelRoute]:
        return dict(self._installed)

    def installed_view(self) -> Mapping[IPNetwork, KernelRoute]:
        """The installed routes, read-only and live (no copy of 100k routes): read it
        without awaiting in between."""
        return MappingProxyType(self._installed)

    @property
    def generation(self) -> int:
        """Changes each time a flush changes what is installed."""
        return self._generation

    @property
    def updates(self) -> int:
        """Changes with each ``update`` given changes, even if none reaches the kernel."""
        return self._updates

    @property
    def changed_at(self) -> float:
        """``time.monotonic()`` when ``generation`` last changed (0.0: never)."""
        return self._changed_at

    def _new_generation(self) -> None:
        self._generation += 1
        self._changed_at = time.monotonic()

    def busy(self) -> bool:
        """Changes are pending, or came within the last BURST_LINGER."""
        return bool(self._dirty) or self._burst is not None

    def pending(self) -> frozenset[IPNetwork]:
        return frozenset(self._dirty)

    def stats(self) -> RouteStats:
        gen, blackholes, devices = self._counted
        if gen != self._generation:  # counted again only when a flush or dump changed them
            blackholes = sum(r.blackhole for r in self._installed.values())
            devices = sum(r.dev is not None for r in self._installed.values())
            self._counted = (self._generation, blackholes, devices)
        return RouteStats(
            installed=len(self._installed),
            blackholes=blackholes,
            devices=devices,
            pending=len(self._dirty),
            failed=len(self._failed),
            conflicts=sum(dst in self._foreign for dst in self._failed),
            flushes=self._flushes,
            last_flush_seconds=self._last_flush,
            added_total=self._totals["add"],
            replaced_total=self._totals["replace"],
            removed_total=self._totals["remove"],
            failed_total=self._totals["failed"],
        )

    # ------------------------------------------------------------------ kernel side

    async def adopt(self) -> int:
        """Take the routes of our protocol already in the table as installed (a previous
        run's). Nothing is deleted; the first ``replace_all`` decides what stays.
        """
        async with self._lock:
            with _gc_paused():
                await self._dump()
            self.log.info("adopted %d routes with protocol %d", len(self._installed), self.proto)
            return len(self._installed)

    async def flush(self) -> FlushResult:
        """Apply pending changes in batches; failed prefixes stay pending for the next flush.

        Raises NetlinkError when the socket fails; what was applied is then re-read from the
        kernel before the next flush.
        """
        async with self._lock:
            started = time.monotonic()
            try:
                with _gc_paused():
                    return await self._flush()
            finally:
                self._flushes += 1
                self._last_flush = time.monotonic() - started

    async def run(self, delay: float = FLUSH_DELAY) -> None:
        """Flush ``delay`` after changes arrive (a burst becomes one batch) and retry failed
        routes with backoff. Runs until cancelled.
        """
        backoff = RETRY_MIN
        self._running = True
        try:
            while True:
                timeout = backoff if self._failed or self._need_dump else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                await asyncio.sleep(delay)
                self._wake.clear()
                try:
                    result = await self.flush()
                except NetlinkError as e:
                    self.log.warning("failed to flush routes: %s", e)
                    backoff = min(backoff * 2, RETRY_MAX)
                    continue
                backoff = min(backoff * 2, RETRY_MAX) if result.failed else RETRY_MIN
        finally:
            self._running = False
            self._end_burst()

    def _burst_check(self) -> None:
        now = time.monotonic()
        pending = len(self._dirty) > len(self._failed)  # failed ones wait for their retry
        idle = now - self._last_set >= BURST_LINGER and not pending and not self._lock.locked()
        if idle or now - self._burst_since >= BURST_GC_MAX:
            self._end_burst()
        else:  # set() seen within BURST_LINGER, or routes still pending or being written
            wait = max(BURST_LINGER - (now - self._last_set), FLUSH_DELAY)
            self._burst = asyncio.get_running_loop().call_later(wait, self._burst_check)

    def _end_burst(self) -> None:
        if self._burst is not None:
            self._burst.cancel()
            self._burst = None
            _gc_paused.resume()

    def close(self) -> None:
        """Close the socket; the kernel routes stay (a restart adopts them)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ------------------------------------------------------------------ internals

    async def _socket(self) -> RouteSocket:
        if self._sock is None:
            self._sock = await asyncio.to_thread(RouteSocket, self.netns)
        return self._sock

    async def _dump(self) -> None:
        sock = await self._socket()
        try:
            dumped = await asyncio.to_thread(sock.dump, self.table)
        except NetlinkError:
            self.close()
            raise
        self._absorb(dumped)

    def _absorb(self, dumped: list[DumpedRoute]) -> None:
        """Take a dump as the truth about the kernel."""
        installed: dict[IPNetwork, KernelRoute] = {}
        foreign: dict[IPNetwork, int] = {}
        strays: list[KernelRoute] = []
        desired = self._desired
        for proto, dumped_route in dumped:
            if proto != self.proto:
                foreign.setdefault(dumped_route.dst, proto)
                continue
            # an equal desired route is kept instead: a table in sync holds each route once
            same = desired.get(dumped_route.dst)
            route = same if same is not None and same == dumped_route else dumped_route
            if installed.setdefault(route.dst, route) is not route:
                strays.append(route)  # the kernel lists a prefix's routes by metric: 2nd+
        self._installed, self._foreign, self._strays = installed, foreign, strays
        self._new_generation()
        self._need_dump = False
        if self._authoritative:  # set.update(dict) reuses the dict's hashes
            self._dirty.update(installed)
            self._dirty.update(self._desired)

    async def _flush(self) -> FlushResult:
        if self._need_dump:
            await self._dump()
        counts = {"add": 0, "replace": 0, "remove": 0}
        failed: dict[IPNetwork, RouteError] = {}
        exists: list[IPNetwork] = []
        plan = self._plan(failed)
        await self._execute(plan, counts, failed, exists)
        if exists:  # a route we did not know sits there: learn whose, then try once more
            await self._dump()
            await self._execute(self._plan(failed, frozenset(exists)), counts, failed, [])
        self._failed = {dst: e for dst, e in failed.items() if dst in self._dirty}
        if self._dirty - self._failed.keys():
            self._wake.set()  # changed meanwhile, or dirtied by a dump: another flush is due
        for kind, n in counts.items():
            self._totals[kind] += n
        if any(counts.values()):
            self._new_generation()
        self._totals["failed"] += len(failed)
        if failed:
            self.log.warning("failed to apply %d routes, e.g. %s", len(failed), _sample(failed))
        return FlushResult(
            added=counts["add"],
            replaced=counts["replace"],
            removed=counts["remove"],
            failed={dst: str(e) for dst, e in self._failed.items()},
            errnos={dst: e.errno for dst, e in self._failed.items()},
        )

    def _plan(
        self, failed: dict[IPNetwork, RouteError], only: frozenset[IPNetwork] | None = None
    ) -> _Plan:
        """Turn pending prefixes (those in ``only`` if given) into writes; the planned ones
        leave the pending set (they come back on failure, or when set() changes them again
        while the write runs).
        """
        # Each lookup hashes an IPv4Network/IPv6Network afresh (~1 us): keep them few.
        plan = _Plan()
        if only is None:
            todo, self._dirty = self._dirty, set()
        else:
            todo = self._dirty & only
            self._dirty -= todo
        desired, installed, foreign = self._desired, self._installed, self._foreign
        ops, kinds = plan.ops, plan.kinds
        for dst in todo:
            want, have = desired.get(dst), installed.get(dst)
            if want is None:  # first, and by identity: KernelRoute's == is a Python call
                if have is not None:
                    ops.append(_op(RouteOp, (have, True, False)))
                    kinds.append("remove")
                continue
            if want is have or (have is not None and want == have):
                continue
            if foreign and dst in foreign:
                proto = foreign[dst]
                failed[dst] = RouteError(errno.EEXIST, f"a route with protocol {proto} exists")
                self._dirty.add(dst)
                continue
            if have is None or have.metric != want.metric:
                ops.append(_op(RouteOp, (want, False, True)))
                plan.kinds.append("add" if have is None else "replace")
                if have is not None:
                    plan.old[dst] = have
            else:
                ops.append(_op(RouteOp, (want, False, False)))
                plan.kinds.append("replace")
        if self._authoritative:
            plan.ops += [RouteOp(r, delete=True) for r in self._strays]
            plan.kinds += ["stray"] * len(self._strays)
            self._strays = []
        return plan

    async def _execute(
        self,
        plan: _Plan,
        counts: dict[str, int],
        failed: dict[IPNetwork, RouteError],
        exists: list[IPNetwork],
    ) -> None:
        errors = await self._write(plan.ops)
        olds: list[RouteOp] = []
        installed = self._installed
        if not errors and not failed and not plan.old and plan.kinds[-1:] != ["stray"]:
            # every write applied, no replaced metric, no strays (_plan puts them last):
            # the common case of a burst, booked in one plain pass
            for op, kind in zip(plan.ops, plan.kinds, strict=True):
                counts[kind] += 1
                if op.delete:
                    installed.pop(op.route.dst, None)
                else:
                    installed[op.route.dst] = op.route
            return
        for i, (op, kind) in enumerate(zip(plan.ops, plan.kinds, strict=True)):
            dst = op.route.dst
            err = errors.get(i) if errors else None
            if kind == "stray":
                if err is not None:
                    self._strays.append(op.route)
            elif err is None:
                if failed:
                    failed.pop(dst, None)
                counts[kind] += 1
                if op.delete:
                    installed.pop(dst, None)
                else:
                    installed[dst] = op.route
                    if plan.old and dst in plan.old:
                        olds.append(RouteOp(plan.old[dst], delete=True))
            else:
                self._dirty.add(dst)
                failed[dst] = err
                if err.errno == errno.EEXIST and op.exclusive:
                    exists.append(dst)
        # the old metric's route of a replaced prefix; if this delete fails, the next dump
        # finds it as a stray and a resync deletes it
        await self._write(olds)

    async def _write(self, ops: list[RouteOp]) -> dict[int, RouteError]:
        if not ops:
            return {}
        try:
            sock = await self._socket()
            if len(ops) < INLINE_OPS:
                return sock.write(ops, self.proto, self.table, self.batch)
            return await asyncio.to_thread(sock.write, ops, self.proto, self.table, self.batch)
        except NetlinkError:
            # what the kernel applied is unknown: re-read it, and redo every planned prefix
            self._dirty |= {op.route.dst for op in ops}
            self._need_dump = True
            self.close()
            raise


def _sample(failed: Mapping[IPNetwork, RouteError], n: int = 3) -> str:
    items: Iterable[tuple[IPNetwork, RouteError]] = list(failed.items())[:n]
    return ", ".join(f"{dst}: {e}" for dst, e in items)
