"""Pure algebra of one allocation block: no I/O, every operation returns a new block.

A block is the unit of compare-and-swap in the datastore. It holds, per ordinal (the offset of
an address inside the block), either nothing or the index of an attribute record naming the
handle that owns the address. Invariants, checked by the property tests:

- an ordinal is either in ``unallocated`` or has an allocation, never both, never neither;
- ``len(unallocated) + in_use == size``;
- the free list is FIFO: assignment pops the head, release appends to the tail, so the
  address that has been free longest is reused first (a reuse delay for stale peers);
- every write bumps ``seq``; each allocation remembers the ``seq`` it was made at, so a release
  that carries an older sequence number never frees an address that was reused since.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ipam.errors import AlreadyAllocatedError, ValidationError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

# Ordinals a caller must never hand out (reserved ranges, requested-elsewhere addresses).
Excluded = Callable[[int], bool]


def no_exclusions(_: int) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class Attribute:
    """Who owns an allocation: the handle and free-form secondary attributes (pod, node...)."""

    handle: str
    secondary: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"handle": self.handle, "secondary": dict(self.secondary)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Attribute:
        return cls(handle=str(d["handle"]), secondary=dict(d.get("secondary") or {}))


@dataclass(frozen=True, slots=True)
class Block:
    cidr: IPNetwork
    affinity: str | None
    allocations: tuple[int | None, ...]
    unallocated: tuple[int, ...]
    attributes: tuple[Attribute, ...] = ()
    seq: int = 0
    seq_for: Mapping[int, int] = field(default_factory=dict)
    deleted: bool = False

    # construction -----------------------------------------------------------------------

    @classmethod
    def new(cls, cidr: IPNetwork, affinity: str | None) -> Block:
        size = cidr.num_addresses
        return cls(
            cidr=cidr,
            affinity=affinity,
            allocations=(None,) * size,
            unallocated=tuple(range(size)),
        )

    # queries ----------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self.allocations)

    @property
    def in_use(self) -> int:
        return self.size - len(self.unallocated)

    @property
    def empty(self) -> bool:
        return len(self.unallocated) == self.size

    def free_count(self, excluded: Excluded = no_exclusions) -> int:
        if excluded is no_exclusions:
            return len(self.unallocated)
        return sum(1 for o in self.unallocated if not excluded(o))

    def ip(self, ordinal: int) -> IPAddr:
        return self.cidr.network_address + ordinal

    def ordinal(self, ip: IPAddr) -> int:
        if ip not in self.cidr:
            raise ValidationError("ip", f"{ip} is not in block {self.cidr}")
        return int(ip) - int(self.cidr.network_address)

    def owner(self, ordinal: int) -> Attribute | None:
        idx = self.allocations[ordinal]
        return None if idx is None else self.attributes[idx]

    def ordinals_of(self, handle: str) -> list[int]:
        return [
            o
            for o, idx in enumerate(self.allocations)
            if idx is not None and self.attributes[idx].handle == handle
        ]

    def allocated(self) -> Iterable[tuple[int, Attribute]]:
        for o, idx in enumerate(self.allocations):
            if idx is not None:
                yield o, self.attributes[idx]

    def handles(self) -> set[str]:
        return {a.handle for _, a in self.allocated()}

    # operations -------------------------------------------------------------------------

    def assign(
        self,
        count: int,
        attr: Attribute,
        excluded: Excluded = no_exclusions,
    ) -> tuple[Block, list[int]]:
        """Take up to ``count`` free ordinals for ``attr`` from the head of the free list.

        Excluded ordinals keep their place in the free list. Returns fewer ordinals than
        asked when the block runs out; the caller decides whether that is an error.
        """
        taken: list[int] = []
        for o in self.unallocated:
            if len(taken) == count:
                break
            if not excluded(o):
                taken.append(o)
        if not taken:
            return self, []
        return self._with_allocated(taken, attr), taken

    def assign_specific(self, ordinal: int, attr: Attribute) -> Block:
        """Allocate exactly ``ordinal`` to ``attr``.

        Idempotent for the same handle; raises AlreadyAllocatedError for another handle.
        """
        owner = self.owner(ordinal)
        if owner is not None:
            if owner.handle == attr.handle:
                return self
            raise AlreadyAllocatedError(
                f"{self.ip(ordinal)} is already allocated to {owner.handle}"
            )
        return self._with_allocated([ordinal], attr)

    def release(self, ordinals: Mapping[int, int | None]) -> tuple[Block, list[int], list[int]]:
        """Free ordinals; each maps to the sequence number the caller saw, or None for "any".

        Returns (block, released, stale). Releasing a free ordinal is a no-op (neither list);
        a sequence mismatch leaves the ordinal allocated and reports it as stale.
        """
        released: list[int] = []
        stale: list[int] = []
        for o, want_seq in ordinals.items():
            if self.allocations[o] is None:
                continue
            if want_seq is not None and self.seq_for.get(o) != want_seq:
                stale.append(o)
                continue
            released.append(o)
        if not released:
            return self, [], stale
        return self._with_released(released), released, stale

    def release_handle(self, handle: str) -> tuple[Block, list[int]]:
        """Free every ordinal owned by ``handle``. Idempotent."""
        ordinals = self.ordinals_of(handle)
        if not ordinals:
            return self, []
        return self._with_released(ordinals), ordinals

    def with_affinity(self, affinity: str | None) -> Block:
        return replace(self, affinity=affinity, seq=self.seq + 1)

    def mark_deleted(self) -> Block:
        return replace(self, deleted=True, seq=self.seq + 1)

    # internals --------------------------------------------------------------------------

    def _with_allocated(self, ordinals: list[int], attr: Attribute) -> Block:
        attrs = list(self.attributes)
        idx = next((i for i, a in enumerate(attrs) if a.handle == attr.handle and a == attr), -1)
        if idx < 0:
            attrs.append(attr)
            idx = len(attrs) - 1
        allocs = list(self.allocations)
        seq = self.seq + 1
        seq_for = dict(self.seq_for)
        for o in ordinals:
            allocs[o] = idx
            seq_for[o] = seq
        taken = set(ordinals)
        return replace(
            self,
            allocations=tuple(allocs),
            unallocated=tuple(o for o in self.unallocated if o not in taken),
            attributes=tuple(attrs),
            seq=seq,
            seq_for=seq_for,
        )

    def _with_released(self, ordinals: list[int]) -> Block:
        allocs = list(self.allocations)
        seq_for = dict(self.seq_for)
        for o in ordinals:
            allocs[o] = None
            seq_for.pop(o, None)
        allocs_t, attrs_t = _compact(allocs, self.attributes)
        return replace(
            self,
            allocations=allocs_t,
            unallocated=(*self.unallocated, *ordinals),
            attributes=attrs_t,
            seq=self.seq + 1,
            seq_for=seq_for,
        )

    # serialisation ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "cidr": str(self.cidr),
            "affinity": self.affinity,
            "allocations": list(self.allocations),
            "unallocated": list(self.unallocated),
            "attributes": [a.to_json() for a in self.attributes],
            "sequenceNumber": self.seq,
            "sequenceNumberForAllocation": {str(k): v for k, v in self.seq_for.items()},
            "deleted": self.deleted,
        }

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Block:
        return cls(
            cidr=ipaddress.ip_network(d["cidr"]),
            affinity=d.get("affinity"),
            allocations=tuple(d["allocations"]),
            unallocated=tuple(d["unallocated"]),
            attributes=tuple(Attribute.from_json(a) for a in d.get("attributes") or ()),
            seq=int(d.get("sequenceNumber", 0)),
            seq_for={
                int(k): int(v) for k, v in (d.get("sequenceNumberForAllocation") or {}).items()
            },
            deleted=bool(d.get("deleted", False)),
        )

    @classmethod
    def loads(cls, raw: bytes) -> Block:
        return cls.from_json(json.loads(raw))


def _compact(
    allocs: list[int | None], attributes: tuple[Attribute, ...]
) -> tuple[tuple[int | None, ...], tuple[Attribute, ...]]:
    """Drop attribute records no allocation points at, renumbering the references."""
    used = sorted({i for i in allocs if i is not None})
    if len(used) == len(attributes):
        return tuple(allocs), attributes
    remap = {old: new for new, old in enumerate(used)}
    return (
        tuple(None if i is None else remap[i] for i in allocs),
        tuple(attributes[i] for i in used),
    )
