"""Maintenance: garbage collection, integrity checks, node and pool removal, usage reports.

GC rules (each is a reason a leak can exist, and how it is closed):

- an allocation of node N whose handle is not among N's live handles (a pod deleted without
  DEL, a crashed runtime) is released by ``gc_node``;
- an empty affine block is released only once it stayed empty for ``empty_grace`` seconds,
  observed twice (first observation stamps the affinity with the block's revision; the
  second releases it only if the block did not change since), and never the node's last
  block, so a node does not ping-pong blocks;
- a deleted node's allocations are released and its affinities dropped (``release_node``);
  blocks where other nodes still hold borrowed addresses are orphaned, not deleted;
- a pendingDeletion affinity (a release interrupted between its two steps) is finished.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ipam import keys
from ipam.allocator import Allocator, within
from ipam.block import Block, IPNetwork
from ipam.blocks import Affinity, AffinityState, Handle, node_of
from ipam.errors import ConflictError, InUseError, NotFoundError
from ipam.pool import Pool
from ipam.resources import dumps
from ipam.retry import cas_retry
from ipam.store import Cmp, Op

# Calico waits 15 min before it calls an allocation leaked; for empty blocks the grace only
# has to outlast a burst of pod churn, so the default is shorter.
EMPTY_BLOCK_GRACE = 300.0


@dataclass
class GCResult:
    released: dict[str, list[str]] = field(default_factory=dict)  # handle -> IPs
    released_blocks: list[str] = field(default_factory=list)
    finished_deletions: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"released": self.released, "releasedBlocks": self.released_blocks,
                "finishedDeletions": self.finished_deletions}  # fmt: skip


@dataclass
class CheckReport:
    """What ``ipam check`` found; ``release --from-report`` consumes the JSON form."""

    blocks: int = 0
    ips_in_use: int = 0
    ips_without_handle: list[dict[str, Any]] = field(default_factory=list)
    handles_without_ips: list[dict[str, Any]] = field(default_factory=list)
    affinities_of_missing_nodes: list[dict[str, Any]] = field(default_factory=list)
    blocks_outside_pools: list[dict[str, Any]] = field(default_factory=list)
    stuck_affinities: list[dict[str, Any]] = field(default_factory=list)
    leaked: list[dict[str, Any]] = field(default_factory=list)

    PROBLEM_FIELDS = ("ips_without_handle", "handles_without_ips", "affinities_of_missing_nodes",
                      "blocks_outside_pools", "stuck_affinities", "leaked")  # fmt: skip

    @property
    def problems(self) -> int:
        return sum(len(getattr(self, f)) for f in self.PROBLEM_FIELDS)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": "IPAMCheckReport", "blocks": self.blocks,
                             "ipsInUse": self.ips_in_use, "problems": self.problems}  # fmt: skip
        for f in self.PROBLEM_FIELDS:
            d[_camel(f)] = getattr(self, f)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CheckReport:
        if d.get("kind") != "IPAMCheckReport":
            raise ValueError("not an IPAM check report (kind must be IPAMCheckReport)")
        r = cls(blocks=int(d.get("blocks", 0)), ips_in_use=int(d.get("ipsInUse", 0)))
        need = {"ips_without_handle": ("ip",), "leaked": ("ip",), "handles_without_ips": ("handle",),
                "affinities_of_missing_nodes": ("node",), "stuck_affinities": ("node",),
                "blocks_outside_pools": ("cidr",)}  # fmt: skip
        for f in cls.PROBLEM_FIELDS:
            items = d.get(_camel(f)) or []
            if not isinstance(items, list):
                raise ValueError(f"{_camel(f)}: must be a list")
            for i, e in enumerate(items):
                if not isinstance(e, dict) or any(k not in e for k in need[f]):
                    raise ValueError(
                        f"{_camel(f)}[{i}]: must be an object with {', '.join(need[f])}"
                    )
                if "ip" in need[f]:
                    try:
                        ipaddress.ip_address(e["ip"])
                    except ValueError as err:
                        raise ValueError(
                            f"{_camel(f)}[{i}].ip: {e['ip']!r} is not an IP address"
                        ) from err
            setattr(r, f, list(items))
        return r


def _camel(s: str) -> str:
    head, *rest = s.split("_")
    return head + "".join(w.capitalize() for w in rest)


@dataclass(frozen=True, slots=True)
class BlockUsage:
    cidr: IPNetwork
    node: str | None
    state: str
    total: int
    in_use: int


@dataclass(frozen=True, slots=True)
class PoolUsage:
    pool: Pool
    total: int
    in_use: int
    blocks: tuple[BlockUsage, ...]


@dataclass(frozen=True, slots=True)
class Borrowed:
    ip: str
    borrowing_node: str
    block: str
    block_owner: str
    handle: str


class Maintenance:
    """GC, checks and bulk removals, built on the allocator's single-step operations."""

    def __init__(self, allocator: Allocator) -> None:
        self.alloc = allocator
        self.blocks = allocator.blocks
        self.resources = allocator.resources

    async def _all(self) -> tuple[dict[IPNetwork, tuple[int, Block]], list[Affinity]]:
        blocks, _ = await self.blocks.list_blocks()
        return blocks, await self.blocks.affinities()

    # GC --------------------------------------------------------------------------------

    async def gc_node(self, node: str, live_handles: Iterable[str],
                      empty_grace: float = EMPTY_BLOCK_GRACE) -> GCResult:  # fmt: skip
        """Release every allocation of ``node`` whose handle is not live; then empty blocks."""
        live = set(live_handles)
        result = GCResult()
        blocks, _ = await self.blocks.list_blocks()
        dead: set[str] = set()
        for _, blk in blocks.values():
            for _, attr in blk.allocated():
                if attr.secondary.get("node") == node and attr.handle not in live:
                    dead.add(attr.handle)
        for h in sorted(dead):
            ips = await self.alloc.release_handle(h)
            if not ips:
                ips = await self._release_orphans(h, blocks)
            result.released[h] = [str(i) for i in ips]
        await self._gc_blocks(node, empty_grace, result)
        return result

    async def _release_orphans(
        self, handle: str, blocks: Mapping[IPNetwork, tuple[int, Block]]
    ) -> list[Any]:
        """Allocations of ``handle`` whose handle record is missing (released by IP)."""
        ips = {blk.ip(o): None for _, blk in blocks.values() for o in blk.ordinals_of(handle)}
        released, _ = await self.alloc.release_ips(ips)
        return released

    async def _gc_blocks(self, node: str, grace: float, result: GCResult) -> None:
        await self.alloc.resume_claims(node)  # finish or drop claims a crash left pending
        affs = await self.blocks.affinities(node)
        got = await self.blocks.get_blocks([a.cidr for a in affs])
        live_blocks = [a for a in affs if a.state is AffinityState.CONFIRMED]
        for a in affs:
            rev_blk = got.get(a.cidr)
            if a.state is AffinityState.PENDING_DELETION:
                await self._finish_deletion(a, rev_blk, result)
                continue
            if a.state is not AffinityState.CONFIRMED or rev_blk is None or not rev_blk[1].empty:
                continue
            if len(live_blocks) <= 1:
                break  # never the node's last block
            rev, _ = rev_blk
            if a.empty_block_rev != rev:
                await self.blocks.mark_empty(a, rev)  # first observation
            elif a.empty_since is not None and time.time() - a.empty_since >= grace:
                try:
                    await self.blocks.release_affinity(a, rev, rev_blk[1])
                except (ConflictError, InUseError):
                    continue  # it was used in the meantime: keep it
                live_blocks.remove(a)
                result.released_blocks.append(str(a.cidr))

    async def _finish_deletion(
        self, a: Affinity, rev_blk: tuple[int, Block] | None, result: GCResult
    ) -> None:
        try:
            if rev_blk is None or rev_blk[1].empty:
                await self.blocks.delete_block(a.cidr, rev_blk[0] if rev_blk else 0, [a])
            else:  # allocated into before the release finished: keep it, confirmed again
                await self.blocks.confirm(a)
            result.finished_deletions.append(str(a.cidr))
        except ConflictError:
            pass

    async def release_node(self, node: str) -> GCResult:
        """Release everything of a deleted node: its allocations, then its affinities."""
        result = await self.gc_node(node, live_handles=(), empty_grace=0)
        for a in await self.blocks.affinities(node):

            async def drop(_: int, a: Affinity = a) -> None:
                got = await self.blocks.get_block(a.cidr)
                if got is None or got[1].empty:
                    await self.blocks.delete_block(a.cidr, got[0] if got else 0, [a])
                elif node_of(got[1]) == node:
                    await self.blocks.orphan(a, got[0], got[1])
                else:
                    await self.blocks.drop_pending(a)

            await cas_retry(f"release block {a.cidr} of node {node}", drop)
            result.released_blocks.append(str(a.cidr))
        self.alloc.invalidate()
        return result

    # check -----------------------------------------------------------------------------

    async def check(self, live: Mapping[str, Iterable[str]] | None = None,
                    stuck_after: float = 60.0) -> CheckReport:  # fmt: skip
        """Integrity of the IPAM data. ``live`` (node -> live handles) also reports leaks."""
        blocks, affs = await self._all()
        handles = {h.id: h for h in await self.blocks.list_handles()}
        pools = await self.resources.list_pools()
        nodes = {n.name for n in await self.resources.list_nodes()}
        rep = CheckReport(blocks=len(blocks))
        held: dict[str, dict[str, int]] = {}
        live_sets = {n: set(h) for n, h in (live or {}).items()}
        for cidr, (_, blk) in sorted(
            blocks.items(), key=lambda kv: (kv[0].version, int(kv[0].network_address))
        ):
            rep.ips_in_use += blk.in_use
            if not any(within(cidr, p.cidr) for p in pools):
                rep.blocks_outside_pools.append({"cidr": str(cidr), "inUse": blk.in_use})
            for o, attr in blk.allocated():
                held.setdefault(attr.handle, {}).setdefault(str(cidr), 0)
                held[attr.handle][str(cidr)] += 1
                h = handles.get(attr.handle)
                entry = {"ip": str(blk.ip(o)), "block": str(cidr), "handle": attr.handle,
                         "sequence": blk.seq_for.get(o), "node": attr.secondary.get("node")}  # fmt: skip
                if h is None or str(cidr) not in h.blocks:
                    rep.ips_without_handle.append(entry)
                node = attr.secondary.get("node")
                if node in live_sets and attr.handle not in live_sets[node]:
                    rep.leaked.append(entry)
        for hid, h in sorted(handles.items()):
            for c, n in h.blocks.items():
                if held.get(hid, {}).get(c, 0) != n:
                    rep.handles_without_ips.append({"handle": hid, "block": c, "expected": n,
                                                    "found": held.get(hid, {}).get(c, 0)})  # fmt: skip
        for a in affs:
            if a.node not in nodes:
                rep.affinities_of_missing_nodes.append(
                    {"node": a.node, "cidr": str(a.cidr), "state": str(a.state)}
                )
            elif a.state is not AffinityState.CONFIRMED:
                rep.stuck_affinities.append(
                    {"node": a.node, "cidr": str(a.cidr), "state": str(a.state)}
                )
        return rep

    async def release_from_report(self, rep: CheckReport) -> dict[str, int]:
        """Repair what a check found. Each item is re-validated against current data."""
        counts = {"ips": 0, "handles": 0, "nodes": 0, "blocks": 0}
        by_ip = {
            ipaddress.ip_address(e["ip"]): e.get("sequence")
            for e in rep.ips_without_handle + rep.leaked
        }
        released, _ = await self.alloc.release_ips(by_ip)
        counts["ips"] = len(released)
        for e in rep.handles_without_ips:
            counts["handles"] += await self._repair_handle(e["handle"])
        for node in sorted({e["node"] for e in rep.affinities_of_missing_nodes}):
            if await self.resources.get_node(node) is None:
                await self.release_node(node)
                counts["nodes"] += 1
        for e in rep.stuck_affinities:
            res = GCResult()
            await self._gc_blocks(e["node"], EMPTY_BLOCK_GRACE, res)
            counts["blocks"] += len(res.finished_deletions)
        return counts

    async def _repair_handle(self, hid: str) -> int:
        """Rewrite a handle record from the blocks (or delete it if it holds nothing)."""

        async def attempt(_: int) -> int:
            h = await self.blocks.get_handle(hid)
            if h is None:
                return 0
            got = await self.blocks.get_blocks([ipaddress.ip_network(c) for c in h.blocks])
            fixed = Handle(
                hid,
                {
                    str(c): len(b.ordinals_of(hid))
                    for c, (_, b) in got.items()
                    if b.ordinals_of(hid)
                },
            )
            cmps = [Cmp.mod(keys.handle(hid), h.rev)] + [
                Cmp.mod(keys.block(c), r) for c, (r, _) in got.items()
            ]
            key = keys.handle(hid)
            op = Op.put(key, dumps(fixed.to_json())) if fixed.blocks else Op.delete(key)
            r = await self.alloc.store.txn(cmps, [op])
            if not r.succeeded:
                raise ConflictError(f"handle {hid} changed")
            return 1

        return await cas_retry(f"repair handle {hid}", attempt)

    # pools -----------------------------------------------------------------------------

    async def delete_pool(self, name: str, force: bool = False) -> int:
        """Delete a pool and its (empty) blocks. Refused while addresses are in use unless
        ``force``, which releases them first. Returns how many addresses were released."""
        _, pool = await self.resources.get_pool(name)
        # Disable first: every allocation commit compares the pool's revision, so from here on
        # nothing new lands in the pool and the in-use count below can only shrink.
        if not pool.disabled:
            await self.resources.set_pool_disabled(name, True)
        blocks, _ = await self.blocks.list_blocks()
        mine = {c: rb for c, rb in blocks.items() if within(c, pool.cidr)}
        in_use = sum(b.in_use for _, b in mine.values())
        if in_use and not force:
            if not pool.disabled:
                await self.resources.set_pool_disabled(name, False)
            raise InUseError(
                f"IPPool {name} still has {in_use} addresses in use; disable it, "
                "or delete with --force to release them"
            )
        released = 0
        for cidr in mine:
            handles = set()
            got = await self.blocks.get_block(cidr)
            if got:
                handles = got[1].handles()
            for h in sorted(handles):
                released += len(await self.alloc.release_handle(h))
            got = await self.blocks.get_block(cidr)
            if got is not None and not got[1].empty:
                ips = {got[1].ip(o): None for o, _ in got[1].allocated()}
                released += len((await self.alloc.release_ips(ips))[0])

            async def drop(_: int, cidr: IPNetwork = cidr) -> None:
                cur = await self.blocks.get_block(cidr)
                owners = [a for a in await self.blocks.affinities() if a.cidr == cidr]
                if cur is None and not owners:
                    return
                if cur is not None and not cur[1].empty:
                    raise ConflictError(f"block {cidr} got an address while being deleted")
                await self.blocks.delete_block(cidr, cur[0] if cur else 0, owners)

            await cas_retry(f"delete block {cidr}", drop)
        if not await self.alloc.store.delete(keys.pool(name)):
            raise NotFoundError(f"IPPool {name} not found")
        self.alloc.invalidate()
        return released

    # usage -----------------------------------------------------------------------------

    async def usage(self) -> tuple[list[PoolUsage], list[Borrowed]]:
        blocks, affs = await self._all()
        pools = await self.resources.list_pools()
        state = {a.cidr: str(a.state) for a in affs}
        out = []
        borrowed = []
        for p in pools:
            bus = []
            for cidr, (_, blk) in sorted(blocks.items(), key=lambda kv: int(kv[0].network_address)):
                if not within(cidr, p.cidr):
                    continue
                owner = node_of(blk)
                bus.append(BlockUsage(cidr, owner, state.get(cidr, "none"), blk.size, blk.in_use))
                for o, attr in blk.allocated():
                    n = attr.secondary.get("node", "")
                    if n and n != owner:
                        borrowed.append(
                            Borrowed(str(blk.ip(o)), n, str(cidr), owner or "", attr.handle)
                        )
            out.append(PoolUsage(p, p.cidr.num_addresses, sum(b.in_use for b in bus), tuple(bus)))
        return out, borrowed

    async def lookup(self, ip: Any) -> tuple[IPNetwork, Block, int] | None:
        """The block holding ``ip`` and its ordinal, if that block exists."""
        cidr = await self.alloc.block_of(ip)
        if cidr is None:
            return None
        got = await self.blocks.get_block(cidr)
        if got is None:
            return None
        return cidr, got[1], got[1].ordinal(ip)
