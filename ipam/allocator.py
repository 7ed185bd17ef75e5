"""The allocator: assignment and release of addresses by handle, with the CAS retry loop.

The common case is one round trip: the allocator caches the blocks it has read (with their
mod revisions) and the settings (pools, reservations, IPAM config); an assignment changes a
cached block in memory and commits it in one transaction that also creates the handle and
compares the revisions of every block, pool and reservation it relied on. If anything moved,
the transaction's failure branch brings back the current values and the loop retries.

Order of preference for a node (as Calico's): its own confirmed blocks, then a new block
claimed for it (deterministic per-node order), then, unless strictAffinity, an address
borrowed from any other block of an eligible pool.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping, MutableMapping

from ipam import keys
from ipam.block import Attribute, Block, Excluded, IPAddr, IPNetwork, no_exclusions
from ipam.blocks import AffinityState, BlockStore, candidate_blocks, node_of
from ipam.commit import (
    AssignedIP,
    Choice,
    addresses,
    assignment_txn,
    release_handle_txn,
    release_txn,
    specific_txn,
)
from ipam.errors import (
    AlreadyAllocatedError,
    ConflictError,
    ExhaustedError,
    ValidationError,
)
from ipam.pool import Pool
from ipam.request import AssignRequest, check_handle, validate_request
from ipam.resources import Resources, Settings
from ipam.retry import MAX_RETRIES, cas_retry
from ipam.store import Op, Store

# Settings are re-read at most this often; every commit compares their revisions anyway, so a
# stale cache costs one retry, never a wrong allocation.
SETTINGS_TTL = 5.0

# Blocks a caller has changed in memory but not committed yet (a batch planning request after
# request on its own result), by CIDR with the revision they were read at. Planning reads a
# block from here before the cache, and never lets a fresh read of etcd replace it: etcd's
# copy does not hold the staged assignments, so planning on it hands out their addresses
# again.
Staged = MutableMapping[IPNetwork, tuple[int, Block]]


def within(inner: IPNetwork, outer: IPNetwork) -> bool:
    """``inner`` lies inside ``outer`` (False across address families)."""
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


class Allocator:
    """Assign and release addresses. One instance per process; safe for concurrent tasks."""

    def __init__(self, store: Store, retries: int = MAX_RETRIES) -> None:
        self.store = store
        self.resources = Resources(store)
        self.blocks = BlockStore(store)
        self.retries = retries
        self._settings: Settings | None = None
        self._settings_at = 0.0
        self._cache: dict[IPNetwork, tuple[int, Block]] = {}
        self._affine: dict[str, set[IPNetwork]] = {}
        self._labels: dict[str, Mapping[str, str]] = {}
        # Per-block facts derived from one Settings object; dropped when another is used.
        self._memo_for: Settings | None = None
        self._excl_memo: dict[IPNetwork, Excluded] = {}
        self._pool_memo: dict[IPNetwork, Pool | None] = {}
        self.conflicts = 0  # lost compare-and-swaps, for metrics and the benchmark

    # settings and caches ---------------------------------------------------------------

    async def settings(self, fresh: bool = False) -> Settings:
        if fresh or self._settings is None or time.monotonic() - self._settings_at > SETTINGS_TTL:
            self._settings = await self.resources.settings()
            self._settings_at = time.monotonic()
        return self._settings

    def invalidate(self) -> None:
        self._settings = None
        self._cache.clear()
        self._affine.clear()
        self._labels.clear()

    async def _node_labels(self, req: AssignRequest) -> Mapping[str, str]:
        if req.node_labels is not None:
            return req.node_labels
        if req.node not in self._labels:
            node = await self.resources.get_node(req.node)
            self._labels[req.node] = node.labels if node else {}
        return self._labels[req.node]

    def _use_memo(self, s: Settings) -> None:
        """Start fresh memos when ``s`` is not the settings they were derived from. Holding
        ``s`` itself (not its id) means a new Settings can never hit an old entry."""
        if s is not self._memo_for:
            self._memo_for = s
            self._excl_memo.clear()
            self._pool_memo.clear()

    def _excluded(self, s: Settings, cidr: IPNetwork) -> Excluded:
        """Ordinals of ``cidr`` that reservations forbid, as a predicate (memoised per settings)."""
        self._use_memo(s)
        got = self._excl_memo.get(cidr)
        if got is not None:
            return got
        out: set[int] = set()
        base = int(cidr.network_address)
        for res in s.reservations:
            for r in res.cidrs:
                if r.version == cidr.version and r.overlaps(cidr):
                    lo = max(int(r.network_address), base) - base
                    hi = min(int(r.broadcast_address), int(cidr.broadcast_address)) - base
                    out.update(range(lo, hi + 1))
        pred: Excluded = frozenset(out).__contains__ if out else no_exclusions
        self._excl_memo[cidr] = pred
        return pred

    def _eligible(
        self, s: Settings, version: int, wanted: tuple[str, ...], labels: Mapping[str, str]
    ) -> list[Pool]:
        pools = [p for _, p in s.pools.values() if p.version == version]
        if wanted:
            chosen = []
            for w in wanted:
                match = [p for p in pools if p.name == w or str(p.cidr) == w]
                if not match:
                    raise ValidationError(
                        f"ipam.ipv{version}_pools", f"no IPv{version} pool named {w!r}"
                    )
                chosen.extend(match)
            pools = chosen
        else:
            pools = [p for p in pools if p.selects(labels)]
        return [p for p in pools if not p.disabled]

    def _pool_of(self, s: Settings, cidr: IPNetwork) -> Pool | None:
        """The pool ``cidr`` lies in under settings ``s`` (memoised per settings)."""
        self._use_memo(s)
        if cidr in self._pool_memo:
            return self._pool_memo[cidr]
        found = next((p for _, p in s.pools.values() if within(cidr, p.cidr)), None)
        self._pool_memo[cidr] = found
        return found

    # node's blocks ---------------------------------------------------------------------

    async def resume_claims(self, node: str) -> None:
        """Re-read the node's affinities and blocks; finish pending claims left by a crash."""
        affs = await self.blocks.affinities(node)
        confirmed: set[IPNetwork] = set()
        for a in affs:
            if a.state is AffinityState.CONFIRMED:
                confirmed.add(a.cidr)
        got = await self.blocks.get_blocks([a.cidr for a in affs])
        for a in affs:
            if a.state is not AffinityState.PENDING:
                continue
            b = got.get(a.cidr)
            if b is not None and node_of(b[1]) == node:
                try:
                    await self.blocks.confirm(a)
                    confirmed.add(a.cidr)
                except ConflictError:
                    pass
            elif b is None or node_of(b[1]) != node:
                await self.blocks.drop_pending(a)
        self._cache.update(got)
        self._affine[node] = confirmed

    def _pick_affine(self, s: Settings, node: str, pools: list[Pool], count: int,
                     taken: set[IPNetwork], staged: Staged) -> Choice | None:  # fmt: skip
        for cidr in self._affine.get(node, ()):
            if cidr in taken:
                continue
            cached = staged.get(cidr) or self._cache.get(cidr)
            if cached is None:
                continue
            rev, blk = cached
            if blk.deleted or len(blk.unallocated) < count or node_of(blk) != node:
                continue
            pool = self._pool_of(s, cidr)
            if pool in pools and blk.free_count(self._excluded(s, cidr)) >= count:
                return Choice(rev, blk, [], pool, False)
        return None

    async def _claim(self, s: Settings, node: str, pools: list[Pool]) -> Choice | None:
        if s.config.max_blocks_per_host:
            mine = await self.blocks.affinities(node)
            if len(mine) >= s.config.max_blocks_per_host:
                return None
        existing = await self.blocks.existing_block_cidrs()
        for pool in pools:
            for cidr in candidate_blocks(pool, node):
                if cidr in existing:
                    continue
                if Block.new(cidr, None).free_count(self._excluded(s, cidr)) == 0:
                    continue  # fully reserved: never worth a block
                claimed = await self.blocks.claim(node, cidr)
                if claimed is None:
                    existing.add(cidr)  # lost the race for it: move on
                    continue
                rev, aff, blk = claimed
                await self.blocks.confirm(aff)
                self._cache[cidr] = (rev, blk)
                self._affine.setdefault(node, set()).add(cidr)
                return Choice(rev, blk, [], pool, False)
        return None

    async def _borrow(self, s: Settings, node: str, pools: list[Pool], count: int,
                      taken: set[IPNetwork], staged: Staged) -> Choice | None:  # fmt: skip
        all_blocks, _ = await self.blocks.list_blocks()
        self._cache.update(all_blocks)
        seen = {cidr: staged.get(cidr) or got for cidr, got in all_blocks.items()}
        for cidr, (rev, blk) in sorted(seen.items(), key=lambda kv: -kv[1][1].free_count()):
            if cidr in taken or blk.deleted:
                continue
            pool = next((p for p in pools if within(cidr, p.cidr)), None)
            if pool is None:
                continue
            if blk.free_count(self._excluded(s, cidr)) >= count:
                return Choice(rev, blk, [], pool, node_of(blk) != node)
        return None

    async def _choose(self, s: Settings, req: AssignRequest, version: int, count: int,
                      labels: Mapping[str, str], taken: set[IPNetwork],
                      staged: Staged) -> Choice:  # fmt: skip
        wanted = req.pools_v4 if version == 4 else req.pools_v6
        pools = self._eligible(s, version, wanted, labels)
        if not pools:
            raise ExhaustedError(f"no enabled IPv{version} pool can serve node {req.node}")
        if req.node not in self._affine:
            await self.resume_claims(req.node)
        choice = self._pick_affine(s, req.node, pools, count, taken, staged)
        if choice is None:
            await self.resume_claims(req.node)
            choice = self._pick_affine(s, req.node, pools, count, taken, staged)
        if choice is None:
            choice = await self._claim(s, req.node, pools)
        if choice is None and not s.config.strict_affinity:
            choice = await self._borrow(s, req.node, pools, count, taken, staged)
        if choice is None:
            why = " (strictAffinity forbids borrowing)" if s.config.strict_affinity else ""
            limit = s.config.max_blocks_per_host
            lim = f"; per-host block limit {limit}" if limit else ""
            raise ExhaustedError(f"no free IPv{version} address for node {req.node}{why}{lim}")
        return choice

    # assignment ------------------------------------------------------------------------

    async def auto_assign(self, req: AssignRequest) -> list[AssignedIP]:
        """Assign addresses to ``req.handle``. Idempotent: a handle that already holds
        addresses gets those back (a second CNI ADD never takes a second IP)."""
        validate_request(req)

        async def attempt(n: int) -> list[AssignedIP]:
            s = await self.settings(fresh=n > 0 and n % 10 == 0)
            return await self._commit_new(s, req.handle, await self.plan(s, req))

        return await cas_retry(f"assign addresses to {req.handle}", attempt, self.retries)

    async def plan(
        self, s: Settings, req: AssignRequest, staged: Staged | None = None
    ) -> list[Choice]:
        """Choose blocks for ``req`` and assign in memory (nothing written yet), on top of
        ``staged`` (blocks the caller changed and will commit together with this result).

        The cache of committed blocks is not changed by the assignment: the caller commits
        (or, batching, stages) the result.
        """
        on = {} if staged is None else staged
        attr = Attribute(req.handle, {"node": req.node, **req.attrs})
        labels = await self._node_labels(req)
        choices: list[Choice] = []
        taken: set[IPNetwork] = set()
        for version, count in ((4, req.num_v4), (6, req.num_v6)):
            if count:
                c = await self._choose(s, req, version, count, labels, taken, on)
                c.block, c.ordinals = c.block.assign(count, attr, self._excluded(s, c.block.cidr))
                choices.append(c)
                taken.add(c.block.cidr)
        return choices

    async def _commit_new(
        self, s: Settings, handle_id: str, choices: list[Choice]
    ) -> list[AssignedIP]:
        (cmps, ops), fail = assignment_txn(s, handle_id, choices)
        r = await self.store.txn(cmps, ops, fail)
        if r.succeeded:
            out = []
            for c in choices:
                self._cache[c.block.cidr] = (r.revision, c.block)
                out += addresses(c, c.block.seq, handle_id)
            return out
        *block_gets, handle_get = r.gets
        if handle_get:
            return await self._existing(handle_id, choices)
        self.conflicts += 1
        explained = False
        for c, kvs in zip(choices, block_gets, strict=True):
            if kvs:
                if kvs[0].mod != c.rev:
                    explained = True
                self._cache[c.block.cidr] = (kvs[0].mod, Block.loads(kvs[0].value))
            else:
                explained = True
                self._cache.pop(c.block.cidr, None)
                for aff in self._affine.values():
                    aff.discard(c.block.cidr)
        if not explained:
            self._settings = None  # a pool, reservation or the config moved
        raise ConflictError(f"blocks for {handle_id} changed concurrently")

    async def _existing(self, handle_id: str, choices: list[Choice]) -> list[AssignedIP]:
        held = await self.ips_by_handle(handle_id)
        want = {4: 0, 6: 0}
        for c in choices:
            want[c.block.cidr.version] += len(c.ordinals)
        have = {
            4: sum(1 for a in held if a.ip.version == 4),
            6: sum(1 for a in held if a.ip.version == 6),
        }
        if held and all(have[v] >= want[v] for v in (4, 6)):
            return held
        raise AlreadyAllocatedError(
            f"handle {handle_id} already holds {[str(a.ip) for a in held]}; release it first"
        )

    async def assign_ip(self, handle_id: str, ip: IPAddr, node: str,
                        attrs: Mapping[str, str] | None = None) -> AssignedIP:  # fmt: skip
        """Assign exactly ``ip`` (sticky identities, CNI ``IP=``). Idempotent for the same
        handle; AlreadyAllocatedError if another handle holds it; refused if reserved or
        outside every enabled pool."""
        check_handle(handle_id)
        attr = Attribute(handle_id, {"node": node, **(attrs or {})})

        async def attempt(n: int) -> AssignedIP:
            s = await self.settings(fresh=n > 0)
            pool = self._pool_of(s, ipaddress.ip_network((ip, ip.max_prefixlen)))
            if pool is None or pool.disabled:
                raise ValidationError("ip", f"{ip} is not in any enabled IP pool")
            for res in s.reservations:
                if any(ip in c for c in res.cidrs):
                    raise ValidationError("ip", f"{ip} is reserved by IPReservation {res.name}")
            cidr = ipaddress.ip_network((ip, pool.block_size), strict=False)
            got = await self.blocks.get_block(cidr)
            if got is None:
                claimed = await self.blocks.claim(node, cidr)
                if claimed is None:
                    raise ConflictError(f"block {cidr} appeared concurrently")
                rev, aff, blk = claimed
                await self.blocks.confirm(aff)
                self._affine.setdefault(node, set()).add(cidr)
                got = (rev, blk)
            rev, blk = got
            if blk.deleted:
                raise ConflictError(f"block {cidr} is being released")
            new = blk.assign_specific(blk.ordinal(ip), attr)
            hkv = await self.store.get(keys.handle(handle_id))
            if new is blk:
                return AssignedIP(ip, cidr, pool.name, blk.seq_for.get(blk.ordinal(ip), 0),
                                  node_of(blk) != node, handle_id)  # fmt: skip
            r = await self.store.txn(*specific_txn(s, pool, rev, new, handle_id, hkv))
            if not r.succeeded:
                self.conflicts += 1
                raise ConflictError(f"block {cidr} changed concurrently")
            self._cache[cidr] = (r.revision, new)
            return AssignedIP(ip, cidr, pool.name, new.seq, node_of(blk) != node, handle_id)

        return await cas_retry(f"assign {ip} to {handle_id}", attempt, self.retries)

    # lookups ---------------------------------------------------------------------------

    async def ips_by_handle(self, handle_id: str) -> list[AssignedIP]:
        h = await self.blocks.get_handle(handle_id)
        if h is None:
            return []
        s = await self.settings()
        got = await self.blocks.get_blocks([ipaddress.ip_network(c) for c in h.blocks])
        out = []
        for cidr, (_, blk) in got.items():
            pool = self._pool_of(s, cidr)
            for o in blk.ordinals_of(handle_id):
                owner = blk.owner(o)
                node = owner.secondary.get("node") if owner else None
                out.append(AssignedIP(blk.ip(o), cidr, pool.name if pool else "", blk.seq_for.get(o, 0),
                                      node_of(blk) != node, handle_id))  # fmt: skip
        return sorted(out, key=lambda a: (a.ip.version, int(a.ip)))

    async def block_of(self, ip: IPAddr) -> IPNetwork | None:
        s = await self.settings()
        pool = self._pool_of(s, ipaddress.ip_network((ip, ip.max_prefixlen)))
        if pool is not None:
            return ipaddress.ip_network((ip, pool.block_size), strict=False)
        for cidr in await self.blocks.existing_block_cidrs():
            if ip in cidr:
                return cidr
        return None

    # release ---------------------------------------------------------------------------

    async def release_handle(self, handle_id: str) -> list[IPAddr]:
        """Release every address of ``handle_id`` in one transaction. Idempotent."""

        async def attempt(_: int) -> list[IPAddr]:
            h = await self.blocks.get_handle(handle_id)
            if h is None:
                return []
            got = await self.blocks.get_blocks([ipaddress.ip_network(c) for c in h.blocks])
            txn, freed, news = release_handle_txn(h, got)
            r = await self.store.txn(*txn)
            if not r.succeeded:
                self.conflicts += 1
                raise ConflictError(f"handle {handle_id} or its blocks changed concurrently")
            for cidr, new in news.items():
                self._cache[cidr] = (r.revision, new)
            return freed

        return await cas_retry(f"release handle {handle_id}", attempt, self.retries)

    async def release_ips(
        self, ips: Mapping[IPAddr, int | None]
    ) -> tuple[list[IPAddr], list[IPAddr]]:
        """Release addresses; each maps to the sequence number the caller saw, or None.

        Returns (released, stale). A free address is a no-op; a stale sequence number never
        frees an address that was reused since. Handles are updated in the same transaction.
        """
        by_block: dict[IPNetwork, dict[IPAddr, int | None]] = {}
        for ip, seq in ips.items():
            cidr = await self.block_of(ip)
            if cidr is not None:
                by_block.setdefault(cidr, {})[ip] = seq
        released: list[IPAddr] = []
        stale: list[IPAddr] = []
        for cidr, want in by_block.items():

            async def attempt(
                _: int, c: IPNetwork = cidr, w: dict[IPAddr, int | None] = want
            ) -> tuple[list[IPAddr], list[IPAddr]]:
                return await self._release_in(c, w)

            rel, st = await cas_retry(f"release addresses in {cidr}", attempt, self.retries)
            released += rel
            stale += st
        return released, stale

    async def _release_in(
        self, cidr: IPNetwork, want: Mapping[IPAddr, int | None]
    ) -> tuple[list[IPAddr], list[IPAddr]]:
        got = await self.blocks.get_block(cidr)
        if got is None:
            return [], []
        rev, blk = got
        owners = {blk.ordinal(ip): blk.owner(blk.ordinal(ip)) for ip in want}
        new, rel, st = blk.release({blk.ordinal(ip): seq for ip, seq in want.items()})
        if not rel:
            return [], [blk.ip(o) for o in st]
        counts: dict[str, int] = {}
        for o in rel:
            a = owners[o]
            if a is not None:
                counts[a.handle] = counts.get(a.handle, 0) + 1
        r = await self.store.txn([], [Op.get(keys.handle(h)) for h in counts])
        r2 = await self.store.txn(*release_txn(rev, new, counts, r.gets))
        if not r2.succeeded:
            self.conflicts += 1
            raise ConflictError(f"block {cidr} changed concurrently")
        self._cache[cidr] = (r2.revision, new)
        return [new.ip(o) for o in rel], [new.ip(o) for o in st]

    async def release_affinity(self, node: str, cidr: IPNetwork) -> None:
        """Release ``node``'s affinity for an empty block (and delete the block)."""

        async def attempt(_: int) -> None:
            affs = [a for a in await self.blocks.affinities(node) if a.cidr == cidr]
            if not affs:
                return
            got = await self.blocks.get_block(cidr)
            await self.blocks.release_affinity(
                affs[0], got[0] if got else 0, got[1] if got else None
            )

        await cas_retry(f"release affinity of {node} for {cidr}", attempt, self.retries)
        self._cache.pop(cidr, None)
        self._affine.get(node, set()).discard(cidr)
