"""NetworkPolicy in fabricd: watch, compile, program ``table inet fabric_filter`` in batches.

- Inputs come from the agent's watch cache: NetworkPolicies, Namespaces and Pods
  (fabric.resources.policy_store prefixes) and the IPAM blocks (every pod's addresses,
  namespace/name and CNI labels on its allocation). Local attachments the cache does not
  show yet (an ADD in flight, etcd lagging) come from the CNI side (``admit``, the records).
- One programmer task: a change marks the table dirty; the task compiles for this node's
  endpoints (fabric.policy.compiler), renders (fabric.dataplane.policy_table) and writes the
  difference in ONE nft transaction. Changes arriving meanwhile are coalesced into the next
  batch. Every ``policy.resyncInterval`` the batch reads the kernel's table instead of
  trusting what it last wrote, and repairs only the difference.
- ``admit`` (the CNI ADD's gate) returns once the pod's map entries, chains and set
  memberships are in the kernel: at once when the last written batch already held its
  endpoint (same interface, same addresses: the IPAM watch event usually brings it before
  the ADD asks) and none is being written, after the running batch when that one holds
  it, else after a batch that starts after the call (the veth drops everything until then).
- A batch whose inputs are the last batch's (the same cache objects, the same local
  records) or give the same endpoints is skipped: no compile, no render, no transaction.
- Failure: the table keeps what it had (nft transactions are atomic); ``problem`` holds the
  reason, /readyz fails with it, and a batch that reads the kernel and repairs is retried
  after 0.5 s, doubling up to 10 s (or sooner, at the next change). etcd down: nothing changes, enforcement stays as programmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fabric.dataplane.attachment import host_ifname
from fabric.dataplane.policy_log import DeniedLog
from fabric.dataplane.policy_table import Change, Desired, PolicyTable, render
from fabric.policy.endpoints import EndpointCache, cni_labels
from fabric.policy.incremental import IncrementalCompiler
from fabric.policy.model import Compiled, Endpoint
from fabric.resources.policy_model import Namespace, NetworkPolicy, Pod
from fabric.resources.policy_store import NAMESPACES, NETWORKPOLICIES, PODS, parse_kv
from fabric.workloads.state import Phase, Record
from ipam import keys
from ipam.block import Block
from ipam.store import KV

log = logging.getLogger("fabric.agent.policy")

PREFIXES = (NETWORKPOLICIES, NAMESPACES, PODS)
DEBOUNCE = 0.005  # a batch right after another waits this long to coalesce a burst (of
# watch events; not when a CNI ADD waits for it: ADDs arriving while it runs share the next)
ADMIT_TIMEOUT = 30.0  # below the CNI request timeout (50 s)
RETRY_MIN, RETRY_MAX = 0.5, 10.0  # seconds before a failed batch is retried (doubling)


@dataclass(frozen=True, slots=True)
class Inputs:
    policies: tuple[NetworkPolicy, ...]
    namespaces: tuple[Namespace, ...]
    pods: tuple[Pod, ...]
    blocks: tuple[Block, ...]


class PolicyAgent:
    """Programs the policy table from ``read()`` (the cache's current objects)."""

    def __init__(
        self,
        node: str,
        table: PolicyTable,
        read: Callable[[], Inputs],
        records: Callable[[], Iterable[Record]],
        cut_established: bool = False,
        resync_interval: float = 60.0,
        observe: Callable[[str, float], None] | None = None,
        written: Callable[[Desired], None] | None = None,
    ) -> None:
        """``read()`` gives the inputs; returning the same ``Inputs`` object while nothing
        changed (``CacheReader``) lets a batch with nothing to do be skipped at once.
        ``written(want)``: the kernel holds ``want`` (after every batch that wrote or
        verified it; the snapshot writer, fabric.agent.snapshots)."""
        self.node, self.table, self.read, self.records = node, table, read, records
        self.cut_established = cut_established
        self.resync_interval = resync_interval
        self.observe = observe or (lambda _kind, _s: None)
        self.written = written or (lambda _want: None)
        self.problem: str | None = "not programmed yet"
        self.compiled: Compiled | None = None
        self.batches = 0
        self._pending: dict[str, tuple[Record, str]] = {}  # admitted, maybe not in the cache
        self._waiters: list[asyncio.Future[None]] = []
        self._dirty = asyncio.Event()
        self._resync = True  # the first batch reads the kernel (adoption)
        self._last = 0.0
        self.aliases: dict[str, list[str]] = {}  # endpoint key -> more host interfaces
        self._endpoints = EndpointCache(node, host_ifname)
        self._compiler = IncrementalCompiler(node)
        self.log: DeniedLog | None = None  # the denied-traffic log (fabric.agent.denied)
        self.skipped = 0  # batches skipped because nothing they depend on changed
        self._last_inputs: tuple[Any, ...] | None = None  # the last batch's inputs, local ...
        self._last_eps: list[Endpoint] = []  # ... its endpoints and aliases
        self._last_aliases: dict[str, list[str]] = {}
        self._batch_eps: dict[str, frozenset[object]] = {}  # the batch being computed: local
        self._written: dict[str, frozenset[object]] = {}  # ... and the last written one
        self._inflight: dict[str, frozenset[object]] | None = None  # the batch being written
        self._joining: list[asyncio.Future[None]] | None = None  # its waiters (run())
        self._pending_last: tuple[Any, list[Endpoint], dict[str, list[str]]] | None = None

    # ------------------------------------------------------------------ inputs

    def changed(self) -> None:
        """Something the policy depends on changed (called from the watch callback)."""
        self._dirty.set()

    async def admit(self, rec: Record, cni_labels_json: str) -> None:
        """Return once ``rec``'s endpoint (its host interface with its addresses) is in the
        kernel, written by a batch (fail closed)."""
        self._pending[rec.handle] = (rec, cni_labels_json)
        ips = frozenset(i.ip for i in rec.ips)
        if (
            ips
            and self._written.get(rec.host_ifname) == ips
            and not self._resync
            and (
                self._inflight is None  # (a batch being written may be taking it out: a re-ADD)
            )
        ):
            return  # the last written batch holds it (it came with the IPAM watch event)
        fut = asyncio.get_running_loop().create_future()
        inflight = self._inflight
        if (
            inflight is not None
            and self._joining is not None
            and inflight.get(rec.host_ifname) == ips
        ):
            self._joining.append(fut)  # the batch being written holds it: its outcome is ours
        else:
            self._waiters.append(fut)
            self._dirty.set()
        async with asyncio.timeout(ADMIT_TIMEOUT):
            await asyncio.shield(fut)

    def release(self, handle: str) -> None:
        if self._pending.pop(handle, None) is not None or self.compiled is not None:
            self._dirty.set()

    # ------------------------------------------------------------------ programming

    def endpoints(self, inputs: Inputs) -> list[Endpoint]:
        """Every endpoint in etcd, plus local attachments etcd does not show yet; the host
        interfaces of a pod's further attachments go to ``self.aliases``."""
        self.aliases = {}
        eps = self._endpoints.build(inputs.blocks, inputs.pods)
        have = {e.ifname for e in eps if e.ifname is not None}
        pod_of = self._endpoints.pod_of
        local: dict[str, tuple[Record, str]] = {
            r.handle: (r, "") for r in self.records() if r.phase is Phase.READY
        }
        local.update(self._pending)
        keys_seen = set(self._endpoints.keys)
        for rec, labels_json in local.values():
            if rec.host_ifname in have or not rec.ips:
                continue
            ns, name = rec.namespace or "default", rec.pod or rec.container_id
            if (ns, name) in keys_seen:  # another attachment of a known pod
                self.aliases.setdefault(f"{ns}/{name}", []).append(rec.host_ifname)
                have.add(rec.host_ifname)
                continue
            labels = cni_labels({"labels": labels_json} if labels_json else {})
            pod = pod_of.get((ns, name))
            if pod is not None:
                labels.update(pod.labels)
            ports = tuple(p for p in pod.ports if p.name) if pod is not None else ()
            eps.append(Endpoint(ns, name, tuple(i.ip for i in rec.ips), labels, ports,
                                self.node, rec.host_ifname))  # fmt: skip
            have.add(rec.host_ifname)
            keys_seen.add((ns, name))
        return eps

    def desired(self, skip_unchanged: bool = False) -> Desired | None:
        """The table to write; with ``skip_unchanged``, None when the last written batch
        was computed from the same inputs or came to the same endpoints."""
        inputs = self.read()
        ready = tuple(r for r in self.records() if r.phase is Phase.READY)
        local = (ready, dict(self._pending), self.log, self.cut_established)
        last = self._last_inputs
        if skip_unchanged and last is not None and last[0] is inputs and last[1:] == local:
            return None
        eps = self.endpoints(inputs)
        if (skip_unchanged and last is not None and last[3:] == local[2:]
                and _identical(last[0].policies, inputs.policies)
                and _identical(last[0].namespaces, inputs.namespaces)
                and self.aliases == self._last_aliases and _same(eps, self._last_eps)):  # fmt: skip
            self._last_inputs = (inputs, *local)
            return None
        self._batch_eps = _local_addresses(eps, self.aliases)
        compiled = self._compiler.compile(inputs.policies, inputs.namespaces, eps)
        self.compiled = compiled
        want = render(compiled, self.cut_established, self.aliases, self.log)
        self._pending_last = ((inputs, *local), eps, dict(self.aliases))
        return want

    async def program(self) -> Change:
        """One batch: compile, render, write the difference (read the kernel on resync).
        Skipped (an empty Change) when nothing it depends on changed since the last one."""
        started = time.monotonic()
        resync, self._resync = self._resync, False
        try:
            want = self.desired(skip_unchanged=not resync and self.table.programmed)
            if want is None:
                self.skipped += 1
                return Change()
            self._inflight = self._batch_eps
            change = await (self.table.sync(want) if resync else self.table.apply(want))
        except Exception as e:
            self._resync = True  # the next batch reads the kernel
            self._written, self._last_inputs = {}, None
            self.problem = f"failed to program table inet {self.table.table}: {e}"
            raise
        finally:
            self._inflight = None
        self._written = self._batch_eps
        if self._pending_last is not None:
            (self._last_inputs, self._last_eps, self._last_aliases) = self._pending_last
        self.problem = None
        self.batches += 1
        self.written(want)
        self.observe("policy_resync" if resync else "policy", time.monotonic() - started)
        if self.batches == 1:
            log.info("policy table adopted: %s", _summary(change) if not change.empty else
                     "the kernel already held it")  # fmt: skip
        elif resync and not change.empty:
            log.warning("policy resync repaired the table: %s", _summary(change))
        elif not change.empty:
            log.debug("policy batch: %s", _summary(change))
        return change

    async def run(self) -> None:
        """The programmer task, with its periodic resync; runs until cancelled."""
        resync = asyncio.create_task(self._resync_timer(), name="policy resync")
        retry = RETRY_MIN
        try:
            while True:
                await self._dirty.wait()
                idle = time.monotonic() - self._last
                if idle < DEBOUNCE and not self._waiters:  # a waiting ADD is not kept waiting:
                    await asyncio.sleep(DEBOUNCE - idle)  # ADDs meanwhile join the next batch
                self._dirty.clear()
                waiters, self._waiters = self._waiters, []
                self._joining = waiters  # an admit whose endpoint this batch holds joins them
                self._last = time.monotonic()
                try:
                    await self.program()
                except Exception as e:
                    self._joining = None
                    log.error("%s; retrying in %.1f s", self.problem, retry)
                    asyncio.get_running_loop().call_later(retry, self.resync)
                    retry = min(retry * 2, RETRY_MAX)
                    for w in waiters:
                        if not w.done():
                            w.set_exception(RuntimeError(str(e)))
                    continue
                self._joining = None
                retry = RETRY_MIN
                for w in waiters:
                    if not w.done():
                        w.set_result(None)
        finally:
            resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await resync
            for w in self._waiters:
                w.cancel()

    async def _resync_timer(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            self.resync()

    def resync(self) -> None:
        """Make the next batch read the kernel's table and repair what differs."""
        self._resync = True
        self._dirty.set()

    async def check(self) -> tuple[bool, str]:
        """For /readyz: the last batch worked and the table is in the kernel."""
        if self.problem is not None:
            return False, self.problem
        try:
            present = await self.table.nft.exists(self.table.table)
        except Exception as e:
            return False, f"failed to list nft tables: {e}"
        if not present:
            self.resync()
            return False, f"table inet {self.table.table} is missing (being rebuilt)"
        return True, "ok"


def _identical(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


def _same(a: list[Endpoint], b: list[Endpoint]) -> bool:
    """The same endpoints (unchanged ones are the same objects: EndpointCache)."""
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b, strict=True))


def _local_addresses(
    eps: Iterable[Endpoint], aliases: Mapping[str, list[str]]
) -> dict[str, frozenset[object]]:
    """Host interface -> addresses of every local endpoint (and its further attachments)."""
    out: dict[str, frozenset[object]] = {}
    for e in eps:
        if e.ifname is not None:
            out[e.ifname] = frozenset(e.ips)
            for alias in aliases.get(e.key, ()):
                out.setdefault(alias, frozenset())  # its own addresses are not known here
    return out


class ObjectIndex:
    """Parsed policy objects, re-parsed only when a key's revision changes."""

    def __init__(self) -> None:
        self._parsed: dict[str, tuple[int, object]] = {}

    def objects(self, kvs: Mapping[str, KV]) -> list[object]:
        for k in [k for k in self._parsed if k not in kvs]:
            del self._parsed[k]
        out = []
        for k, kv in kvs.items():
            have = self._parsed.get(k)
            if have is None or have[0] != kv.mod:
                try:
                    have = (kv.mod, parse_kv(kv))
                except Exception as e:  # stored objects were validated: another writer's
                    log.warning("ignoring %s that does not parse: %s", k, e)
                    have = (kv.mod, None)
                self._parsed[k] = have
            if have[1] is not None:
                out.append(have[1])
        return out


class CacheReader:
    """``read_cache`` with memory, for fabricd: the objects of a policy prefix are collected
    again only after ``changed`` named that prefix (a policy change re-reads the policies, not
    the 5,000 Pods), the blocks only after a block change, and while nothing changed the
    same ``Inputs`` object is returned (PolicyAgent then skips the batch at once).
    ``changed`` must be called for every change of the cache's data."""

    def __init__(
        self,
        data: Callable[[], Mapping[str, Mapping[str, KV]]],
        blocks: Callable[[Mapping[str, KV]], list[Block]],
    ) -> None:
        self.data, self.blocks = data, blocks
        self._objects = {p: ObjectIndex() for p in PREFIXES}
        self._stale = {*PREFIXES, keys.BLOCKS}
        self._last = Inputs((), (), (), ())

    def changed(self, prefix: str) -> None:
        self._stale.add(prefix)

    def __call__(self) -> Inputs:
        if not self._stale:
            return self._last
        stale, self._stale = self._stale, set()
        data, last = self.data(), self._last
        kinds: list[tuple[object, ...]] = [last.policies, last.namespaces, last.pods]
        for i, (prefix, kind) in enumerate(
            ((NETWORKPOLICIES, NetworkPolicy), (NAMESPACES, Namespace), (PODS, Pod))
        ):
            if prefix in stale:
                objs = self._objects[prefix].objects(data.get(prefix, {}))
                kinds[i] = tuple(o for o in objs if isinstance(o, kind))
        blocks = last.blocks
        if keys.BLOCKS in stale:
            blocks = tuple(self.blocks(data.get(keys.BLOCKS, {})))
        self._last = Inputs(kinds[0], kinds[1], kinds[2], blocks)  # type: ignore[arg-type]
        return self._last


def read_cache(
    data: Mapping[str, Mapping[str, KV]],
    objects: ObjectIndex,
    blocks: Callable[[Mapping[str, KV]], list[Block]],
) -> Inputs:
    """The policy inputs from the agent's cache (prefix -> key -> KV)."""
    objs = objects.objects({k: kv for p in PREFIXES for k, kv in data.get(p, {}).items()})
    return Inputs(
        tuple(o for o in objs if isinstance(o, NetworkPolicy)),
        tuple(o for o in objs if isinstance(o, Namespace)),
        tuple(o for o in objs if isinstance(o, Pod)),
        tuple(blocks(data.get(keys.BLOCKS, {}))),
    )


def _summary(c: Change) -> str:
    return (f"{'full write, ' if c.full else ''}{c.elements_added} elements added, "
            f"{c.elements_deleted} deleted, {c.chains_written} chains written, "
            f"{c.chains_deleted} deleted, {len(c.script)} bytes")  # fmt: skip
