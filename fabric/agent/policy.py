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
- ``admit`` (the CNI ADD's gate) returns once a batch that started after the call has been
  written: the pod's map entries, chains and set memberships are in the kernel.
- Failure: the table keeps what it had (nft transactions are atomic); ``problem`` holds the
  reason, /readyz fails with it, and a batch that reads the kernel and repairs is retried
  after 0.5 s, doubling up to 10 s (or sooner, at the next change). etcd down: nothing changes, enforcement stays as programmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from fabric.dataplane.attachment import host_ifname
from fabric.dataplane.policy_log import DeniedLog
from fabric.dataplane.policy_table import Change, Desired, PolicyTable, render
from fabric.policy.compiler import compile as compile_policies
from fabric.policy.endpoints import allocations, build_endpoints, cni_labels
from fabric.policy.model import Compiled, Endpoint
from fabric.resources.policy_model import Namespace, NetworkPolicy, Pod
from fabric.resources.policy_store import NAMESPACES, NETWORKPOLICIES, PODS, parse_kv
from fabric.workloads.state import Phase, Record
from ipam import keys
from ipam.block import Block
from ipam.store import KV

log = logging.getLogger("fabric.agent.policy")

PREFIXES = (NETWORKPOLICIES, NAMESPACES, PODS)
DEBOUNCE = 0.005  # a batch right after another waits this long to coalesce a burst
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
    ) -> None:
        self.node, self.table, self.read, self.records = node, table, read, records
        self.cut_established = cut_established
        self.resync_interval = resync_interval
        self.observe = observe or (lambda _kind, _s: None)
        self.problem: str | None = "not programmed yet"
        self.compiled: Compiled | None = None
        self.batches = 0
        self._pending: dict[str, tuple[Record, str]] = {}  # admitted, maybe not in the cache
        self._waiters: list[asyncio.Future[None]] = []
        self._dirty = asyncio.Event()
        self._resync = True  # the first batch reads the kernel (adoption)
        self._last = 0.0
        self.aliases: dict[str, list[str]] = {}  # endpoint key -> more host interfaces
        self.log: DeniedLog | None = None  # the denied-traffic log (fabric.agent.denied)

    # ------------------------------------------------------------------ inputs

    def changed(self) -> None:
        """Something the policy depends on changed (called from the watch callback)."""
        self._dirty.set()

    async def admit(self, rec: Record, cni_labels_json: str) -> None:
        """Return once a batch containing ``rec``'s endpoint is written (fail closed)."""
        self._pending[rec.handle] = (rec, cni_labels_json)
        fut = asyncio.get_running_loop().create_future()
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
        eps = build_endpoints(allocations(inputs.blocks), inputs.pods, self.node, host_ifname)
        have = {e.ifname for e in eps if e.ifname is not None}
        pod_of = {(p.namespace, p.name): p for p in inputs.pods}
        local: dict[str, tuple[Record, str]] = {
            r.handle: (r, "") for r in self.records() if r.phase is Phase.READY
        }
        local.update(self._pending)
        keys_seen = {e.key for e in eps}
        for rec, labels_json in local.values():
            if rec.host_ifname in have or not rec.ips:
                continue
            ns, name = rec.namespace or "default", rec.pod or rec.container_id
            if f"{ns}/{name}" in keys_seen:  # another attachment of a known pod
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
            keys_seen.add(f"{ns}/{name}")
        return eps

    def desired(self) -> Desired:
        inputs = self.read()
        compiled = compile_policies(inputs.policies, inputs.namespaces,
                                    self.endpoints(inputs), self.node)  # fmt: skip
        self.compiled = compiled
        return render(compiled, self.cut_established, self.aliases, self.log)

    async def program(self) -> Change:
        """One batch: compile, render, write the difference (read the kernel on resync)."""
        started = time.monotonic()
        resync, self._resync = self._resync, False
        try:
            want = self.desired()
            change = await (self.table.sync(want) if resync else self.table.apply(want))
        except Exception as e:
            self._resync = True  # the next batch reads the kernel
            self.problem = f"failed to program table inet {self.table.table}: {e}"
            raise
        self.problem = None
        self.batches += 1
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
                if idle < DEBOUNCE:
                    await asyncio.sleep(DEBOUNCE - idle)
                self._dirty.clear()
                waiters, self._waiters = self._waiters, []
                self._last = time.monotonic()
                try:
                    await self.program()
                except Exception as e:
                    log.error("%s; retrying in %.1f s", self.problem, retry)
                    asyncio.get_running_loop().call_later(retry, self.resync)
                    retry = min(retry * 2, RETRY_MAX)
                    for w in waiters:
                        if not w.done():
                            w.set_exception(RuntimeError(str(e)))
                    continue
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
