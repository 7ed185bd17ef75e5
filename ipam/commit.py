"""What each allocator commit compares and writes, apart from how the allocator decides it.

The allocator (``ipam.allocator``) reads, chooses and retries; the functions here build the
one transaction of each commit path from what was read. A commit that relied on settings
(pools, reservations, the IPAM config) compares them through ``settings_compares``, the one
helper every assignment path uses (``docs/design/ipam.md``, invariant 10): when a path built
its own list, ``assign_ip`` forgot the reservations and handed out a reserved address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ipam import keys
from ipam.block import Block, IPAddr, IPNetwork
from ipam.blocks import Handle
from ipam.pool import Pool
from ipam.resources import Settings, dumps
from ipam.store import KV, Cmp, Op

Txn = tuple[list[Cmp], list[Op]]


@dataclass(frozen=True, slots=True)
class AssignedIP:
    ip: IPAddr
    block: IPNetwork
    pool: str
    seq: int
    borrowed: bool = False
    handle: str = ""

    @property
    def host_prefix(self) -> IPNetwork:
        return ipaddress.ip_network((self.ip, self.ip.max_prefixlen))


@dataclass
class Choice:
    """A block chosen for a request, its revision as read, and the ordinals assigned there
    (``block`` is the block after the assignment, in memory)."""

    rev: int
    block: Block
    ordinals: list[int]
    pool: Pool
    borrowed: bool


def settings_compares(s: Settings, pools: Iterable[str]) -> list[Cmp]:
    """The compares of a commit that relied on settings ``s``: the reservations, the IPAM
    config and each pool in ``pools`` (names) are still as read."""
    cmps = [
        Cmp.prefix_unchanged_since(keys.RESERVATIONS, s.reservations_rev),
        Cmp.mod(keys.CONFIG_IPAM, s.config_rev),
    ]
    cmps += [Cmp.mod(keys.pool(p), s.pools[p][0]) for p in sorted(set(pools))]
    return cmps


def held_by(handle_id: str, choices: Iterable[Choice]) -> Handle:
    """The handle document of a new assignment: every block of ``choices`` with its count."""
    handle = Handle(handle_id)
    for c in choices:
        handle = handle.plus(c.block.cidr, len(c.ordinals))
    return handle


def assignment_txn(s: Settings, handle_id: str, choices: list[Choice]) -> tuple[Txn, list[Op]]:
    """A new handle and its blocks, all or nothing. The failure branch reads back every
    block and the handle (to tell a lost race from a handle that already exists)."""
    hkey = keys.handle(handle_id)
    cmps = [Cmp.absent(hkey), *settings_compares(s, (c.pool.name for c in choices))]
    cmps += [Cmp.mod(keys.block(c.block.cidr), c.rev) for c in choices]
    ops = [Op.put(keys.block(c.block.cidr), c.block.dumps()) for c in choices]
    ops.append(Op.put(hkey, dumps(held_by(handle_id, choices).to_json())))
    fail = [Op.get(keys.block(c.block.cidr)) for c in choices] + [Op.get(hkey)]
    return (cmps, ops), fail


def addresses(c: Choice, seq: int, handle_id: str) -> list[AssignedIP]:
    """What a committed choice gave ``handle_id`` (``seq``: the block's sequence number)."""
    return [AssignedIP(c.block.ip(o), c.block.cidr, c.pool.name, seq, c.borrowed, handle_id)
            for o in c.ordinals]  # fmt: skip


def specific_txn(s: Settings, pool: Pool, rev: int, new: Block, handle_id: str,
                 hkv: KV | None) -> Txn:  # fmt: skip
    """One specific address (``assign_ip``): the block, the handle as read (or absent) plus
    one address in this block, and the settings the address was checked against."""
    hkey = keys.handle(handle_id)
    handle = Handle.from_kv(hkv) if hkv else Handle(handle_id)
    cmps = [Cmp.mod(keys.block(new.cidr), rev), Cmp.mod(hkey, hkv.mod if hkv else 0),
            *settings_compares(s, [pool.name])]  # fmt: skip
    ops = [Op.put(keys.block(new.cidr), new.dumps()),
           Op.put(hkey, dumps(handle.plus(new.cidr, 1).to_json()))]  # fmt: skip
    return cmps, ops


def release_handle_txn(
    h: Handle, got: Mapping[IPNetwork, tuple[int, Block]]
) -> tuple[Txn, list[IPAddr], dict[IPNetwork, Block]]:
    """Release every address of ``h``: the handle goes, each of its blocks (as read in
    ``got``; compared absent when gone) loses the handle's addresses. Returns the
    transaction, the freed addresses and the blocks after it."""
    cmps = [Cmp.mod(keys.handle(h.id), h.rev)]
    ops = [Op.delete(keys.handle(h.id))]
    freed: list[IPAddr] = []
    news: dict[IPNetwork, Block] = {}
    for cidr in (ipaddress.ip_network(c) for c in h.blocks):
        rev_blk = got.get(cidr)
        cmps.append(Cmp.mod(keys.block(cidr), rev_blk[0] if rev_blk else 0))
        if rev_blk is None:
            continue
        new, ords = rev_blk[1].release_handle(h.id)
        if ords:
            ops.append(Op.put(keys.block(cidr), new.dumps()))
            news[cidr] = new
            freed.extend(new.ip(o) for o in ords)
    return (cmps, ops), freed, news


def release_txn(rev: int, new: Block, counts: Mapping[str, int],
                handle_kvs: Iterable[Sequence[KV]]) -> Txn:  # fmt: skip
    """Addresses released in one block (``new``, read at ``rev``): each handle that held
    ``counts[handle]`` of them, as read in ``handle_kvs``, shrinks or goes."""
    cmps = [Cmp.mod(keys.block(new.cidr), rev)]
    ops = [Op.put(keys.block(new.cidr), new.dumps())]
    for hid, kvs in zip(counts, handle_kvs, strict=True):
        hkey = keys.handle(hid)
        if not kvs:
            cmps.append(Cmp.absent(hkey))
            continue
        h = Handle.from_kv(kvs[0]).plus(new.cidr, -counts[hid])
        cmps.append(Cmp.mod(hkey, kvs[0].mod))
        ops.append(Op.put(hkey, dumps(h.to_json())) if h.blocks else Op.delete(hkey))
    return cmps, ops
