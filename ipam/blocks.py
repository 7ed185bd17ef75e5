"""One datastore step per function for blocks, affinities and handles (no retry loops here).

Affinity state machine (only ``confirmed`` blocks are routed)::

    (absent) --claim--> pending --confirm--> confirmed --release--> pendingDeletion --> (absent)

``claim`` creates the pending affinity and the block in one transaction, only if neither
exists; ``confirm`` flips it in a second one. A process that dies between the two leaves a
pending affinity that the node's next allocation (or GC) finishes. Release marks the block
deleted and the affinity pendingDeletion first (so it is withdrawn and never allocated from),
then deletes both, each step comparing the revisions it read.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ipam import keys
from ipam.block import Block, IPNetwork
from ipam.errors import ConflictError, InUseError
from ipam.pool import Pool
from ipam.resources import dumps, loads
from ipam.store import KV, Cmp, Op, Store


class AffinityState(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    PENDING_DELETION = "pendingDeletion"


@dataclass(frozen=True, slots=True)
class Affinity:
    node: str
    cidr: IPNetwork
    state: AffinityState
    rev: int = 0
    # Set by GC when it first sees the block empty: the block's revision and the time then.
    empty_since: float | None = None
    empty_block_rev: int | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"state": str(self.state)}
        if self.empty_since is not None:
            d["emptySince"] = self.empty_since
            d["emptyBlockRevision"] = self.empty_block_rev
        return d

    @classmethod
    def from_kv(cls, kv: KV) -> Affinity:
        node, cidr = keys.parse_affinity(kv.key)
        d = loads(kv.value)
        return cls(
            node=node,
            cidr=cidr,
            state=AffinityState(d.get("state", "pending")),
            rev=kv.mod,
            empty_since=d.get("emptySince"),
            empty_block_rev=d.get("emptyBlockRevision"),
        )


@dataclass(frozen=True, slots=True)
class Handle:
    """Secondary index: handle -> {block cidr: addresses held there}."""

    id: str
    blocks: Mapping[str, int] = field(default_factory=dict)
    rev: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"block": dict(self.blocks)}

    def plus(self, cidr: IPNetwork, n: int) -> Handle:
        b = dict(self.blocks)
        b[str(cidr)] = b.get(str(cidr), 0) + n
        if b[str(cidr)] <= 0:
            del b[str(cidr)]
        return Handle(self.id, b, self.rev)

    @classmethod
    def from_kv(cls, kv: KV) -> Handle:
        d = loads(kv.value)
        return cls(
            kv.key[len(keys.HANDLES) :], {str(k): int(v) for k, v in d["block"].items()}, kv.mod
        )


def affinity_label(node: str) -> str:
    return f"host:{node}"


def node_of(block: Block) -> str | None:
    a = block.affinity
    return a[len("host:") :] if a and a.startswith("host:") else None


def candidate_blocks(pool: Pool, node: str) -> Iterator[IPNetwork]:
    """Every block of ``pool`` once, in an order fixed by the node's name.

    The order is (offset + i * stride) mod n, with offset and an odd stride from a hash of the
    node name: n is a power of two, so an odd stride visits every block. Deterministic, so a
    retry converges on the same block; different per node, so nodes rarely contend; lazy, so
    an IPv6 pool with 2^58 blocks costs nothing.
    """
    n = pool.block_count
    h = hashlib.sha256(f"{node}/{pool.name}".encode()).digest()
    offset = int.from_bytes(h[:8], "big") % n
    stride = (int.from_bytes(h[8:16], "big") | 1) % n or 1
    for i in range(n):
        yield pool.block_at((offset + i * stride) % n)


class BlockStore:
    """Typed single-step access to blocks, affinities and handles."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def get_block(self, cidr: IPNetwork) -> tuple[int, Block] | None:
        kv = await self.store.get(keys.block(cidr))
        return (kv.mod, Block.loads(kv.value)) if kv else None

    async def get_blocks(self, cidrs: list[IPNetwork]) -> dict[IPNetwork, tuple[int, Block]]:
        """Several blocks in one round trip; absent ones are left out."""
        if not cidrs:
            return {}
        r = await self.store.txn([], [Op.get(keys.block(c)) for c in cidrs])
        out = {}
        for kvs in r.gets:
            for kv in kvs:
                b = Block.loads(kv.value)
                out[b.cidr] = (kv.mod, b)
        return out

    async def list_blocks(self) -> tuple[dict[IPNetwork, tuple[int, Block]], int]:
        kvs, rev = await self.store.list(keys.BLOCKS)
        out = {}
        for kv in kvs:
            b = Block.loads(kv.value)
            out[b.cidr] = (kv.mod, b)
        return out, rev

    async def existing_block_cidrs(self) -> set[IPNetwork]:
        kvs, _ = await self.store.list(keys.BLOCKS, keys_only=True)
        return {keys.cidr_of(kv.key[len(keys.BLOCKS) :]) for kv in kvs}

    async def affinities(self, node: str | None = None) -> list[Affinity]:
        prefix = keys.node_affinities(node) if node else keys.AFFINITIES
        kvs, _ = await self.store.list(prefix)
        return [Affinity.from_kv(kv) for kv in kvs]

    async def get_handle(self, handle_id: str) -> Handle | None:
        kv = await self.store.get(keys.handle(handle_id))
        return Handle.from_kv(kv) if kv else None

    async def list_handles(self) -> list[Handle]:
        kvs, _ = await self.store.list(keys.HANDLES)
        return [Handle.from_kv(kv) for kv in kvs]

    # affinity lifecycle ----------------------------------------------------------------

    async def claim(self, node: str, cidr: IPNetwork) -> tuple[int, Affinity, Block] | None:
        """Create a pending affinity and the block for ``node``; None if either exists."""
        block = Block.new(cidr, affinity_label(node))
        aff = Affinity(node, cidr, AffinityState.PENDING)
        r = await self.store.txn(
            [Cmp.absent(keys.affinity(node, cidr)), Cmp.absent(keys.block(cidr))],
            [Op.put(keys.affinity(node, cidr), dumps(aff.to_json())),
             Op.put(keys.block(cidr), block.dumps())],
        )  # fmt: skip
        if not r.succeeded:
            return None
        return r.revision, Affinity(node, cidr, AffinityState.PENDING, r.revision), block

    async def confirm(self, aff: Affinity) -> Affinity:
        new = Affinity(aff.node, aff.cidr, AffinityState.CONFIRMED)
        r = await self.store.txn(
            [Cmp.mod(keys.affinity(aff.node, aff.cidr), aff.rev)],
            [Op.put(keys.affinity(aff.node, aff.cidr), dumps(new.to_json()))],
        )
        if not r.succeeded:
            raise ConflictError(f"affinity {aff.node}/{aff.cidr} changed before confirmation")
        return Affinity(aff.node, aff.cidr, AffinityState.CONFIRMED, r.revision)

    async def drop_pending(self, aff: Affinity) -> None:
        """Remove a pending affinity whose block is not ours (lost a race, or never made)."""
        await self.store.txn([Cmp.mod(keys.affinity(aff.node, aff.cidr), aff.rev)],
                             [Op.delete(keys.affinity(aff.node, aff.cidr))])  # fmt: skip

    async def mark_empty(self, aff: Affinity, block_rev: int) -> None:
        new = Affinity(
            aff.node, aff.cidr, aff.state, empty_since=time.time(), empty_block_rev=block_rev
        )
        await self.store.txn([Cmp.mod(keys.affinity(aff.node, aff.cidr), aff.rev)],
                             [Op.put(keys.affinity(aff.node, aff.cidr), dumps(new.to_json()))])  # fmt: skip

    async def release_affinity(self, aff: Affinity, block_rev: int, block: Block | None) -> None:
        """Two steps: mark pendingDeletion (block soft-deleted), then delete both.

        Refuses (InUseError) when the block has allocations. A block other nodes borrowed
        from cannot be released; use ``orphan``.
        """
        if block is not None and not block.empty:
            raise InUseError(
                f"block {aff.cidr} of node {aff.node} still has {block.in_use} addresses"
            )
        akey, bkey = keys.affinity(aff.node, aff.cidr), keys.block(aff.cidr)
        marked = Affinity(aff.node, aff.cidr, AffinityState.PENDING_DELETION)
        step1 = [Op.put(akey, dumps(marked.to_json()))]
        if block is not None:
            step1.append(Op.put(bkey, block.mark_deleted().dumps()))
        r = await self.store.txn([Cmp.mod(akey, aff.rev), Cmp.mod(bkey, block_rev)], step1)
        if not r.succeeded:
            raise ConflictError(f"block {aff.cidr} changed while releasing its affinity")
        rev = r.revision
        r = await self.store.txn(
            [Cmp.mod(akey, rev), Cmp.mod(bkey, rev if block is not None else 0)],
            [Op.delete(akey), Op.delete(bkey)],
        )
        if not r.succeeded:
            raise ConflictError(f"block {aff.cidr} changed during release")

    async def orphan(self, aff: Affinity, block_rev: int, block: Block) -> None:
        """Drop ``aff`` but keep its block (other nodes hold addresses there): affinity -> none."""
        akey, bkey = keys.affinity(aff.node, aff.cidr), keys.block(aff.cidr)
        r = await self.store.txn(
            [Cmp.mod(akey, aff.rev), Cmp.mod(bkey, block_rev)],
            [Op.delete(akey), Op.put(bkey, block.with_affinity(None).dumps())],
        )
        if not r.succeeded:
            raise ConflictError(f"block {aff.cidr} changed while orphaning it")

    async def delete_block(self, cidr: IPNetwork, block_rev: int, affs: list[Affinity]) -> None:
        ops = [Op.delete(keys.block(cidr))] + [Op.delete(keys.affinity(a.node, cidr)) for a in affs]
        cmps = [Cmp.mod(keys.block(cidr), block_rev)] + [
            Cmp.mod(keys.affinity(a.node, cidr), a.rev) for a in affs
        ]
        r = await self.store.txn(cmps, ops)
        if not r.succeeded:
            raise ConflictError(f"block {cidr} changed while deleting it")
