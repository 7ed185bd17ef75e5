"""The policy table's diff: what the kernel holds (``Held``) against what fabricd wants
(``Desired``), as one nft transaction (``Change``). Pure; split from
fabric.dataplane.policy_table (which re-exports it), design in docs/design/policy.md,
"Dataplane".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from fabric.dataplane import policy_log
from fabric.dataplane.nft import ChainDef, Hook, Listing, SetDef, Transaction

TABLE = "fabric_filter"
BASE = "forward"


@dataclass(frozen=True, slots=True)
class Desired:
    """The whole table: every set and map with its elements, every chain with its rules;
    ``keep``: chains the kernel may hold as they are, neither written nor deleted (idle
    endpoint chains, fabric.dataplane.policy_table.PolicyTable)."""

    sets: Mapping[str, SetDef]
    chains: Mapping[str, ChainDef]
    keep: tuple[str, ...] = ()  # the most recently used first


# ---------------------------------------------------------------------- diffing


@dataclass(frozen=True, slots=True)
class Held:
    """What the kernel holds (or what we last wrote): sets and, per chain, hook and rule ids."""

    sets: Mapping[str, SetDef]
    chains: Mapping[str, tuple[Hook | None, tuple[str | None, ...]]]

    @classmethod
    def of(cls, d: Desired, have: Held | None = None) -> Held:
        """What the kernel holds once ``d`` is written over ``have`` (its ``keep`` chains)."""
        chains: dict[str, tuple[Hook | None, tuple[str | None, ...]]] = {
            n: (c.hook, c.ids()) for n, c in d.chains.items()
        }
        if have is not None:
            chains.update((n, have.chains[n]) for n in d.keep if n in have.chains)
        return cls(d.sets, chains)


@dataclass(frozen=True, slots=True)
class Change:
    """One call's transaction: ``full`` when the table was (re)created."""

    full: bool = False
    elements_added: int = 0
    elements_deleted: int = 0
    chains_written: int = 0
    chains_deleted: int = 0
    sets_added: int = 0
    sets_deleted: int = 0
    script: str = field(default="", repr=False)

    @property
    def empty(self) -> bool:
        return not self.script

    @property
    def elements_only(self) -> bool:
        return not (self.full or self.chains_written or self.chains_deleted or self.sets_added
                    or self.sets_deleted)  # fmt: skip


def diff(have: Held | None, want: Desired, table: str = TABLE) -> Change:
    """The transaction making ``have`` into ``want`` (None: no table). Pure.

    Order inside it: new sets and chains are declared, set elements added and deleted,
    chains filled (new) or flushed and refilled (rule ids differ), map elements swapped,
    then stale chains and sets deleted (nothing references them by then). A set of another
    shape, or a base chain on another hook, makes it a full rewrite, still one transaction."""
    tx = Transaction(table)
    full = have is None or _incompatible(have, want)
    if full:
        tx.add_table()
        if have is not None:
            tx.delete_table()
            tx.add_table()
        have = Held({}, {})
    assert have is not None
    hs, hc = have.sets, have.chains
    n = dict.fromkeys(("ea", "ed", "cw", "cd", "sa", "sd"), 0)
    for name, s in sorted(want.sets.items()):
        if name not in hs:
            tx.add_set(s)
            n["sa"] += 1
    for name, c in sorted(want.chains.items()):
        if name not in hc:
            tx.add_chain(c)
    maps = {k: s for k, s in want.sets.items() if s.map_to}
    for name, s in sorted(want.sets.items()):
        if name not in maps:
            _elements(tx, name, hs.get(name), s, n)
    for name, c in sorted(want.chains.items(), key=lambda kv: kv[0] == BASE):
        held = hc.get(name)
        if held is not None and held[1] == c.ids():
            continue
        if held is not None:
            tx.flush_chain(name)
        tx.add_rules(name, c.rules)
        n["cw"] += 1
    for name, s in sorted(maps.items()):
        _elements(tx, name, hs.get(name), s, n)
    for name in sorted(set(hc) - set(want.chains) - set(want.keep)):
        tx.flush_chain(name)
        tx.delete_chain(name)
        n["cd"] += 1
    for name in sorted(set(hs) - set(want.sets)):
        tx.delete_set(hs[name])
        n["sd"] += 1
    return Change(full, n["ea"], n["ed"], n["cw"], n["cd"], n["sa"], n["sd"], tx.render())


def _incompatible(have: Held, want: Desired) -> bool:
    hs = have.sets
    shapes = any((h := hs.get(n)) is not None and h is not s and h.shape() != s.shape()
                 for n, s in want.sets.items())  # fmt: skip
    hooks = any(n in have.chains and have.chains[n][0] != c.hook for n, c in want.chains.items())
    return shapes or hooks


def _elements(
    tx: Transaction, name: str, old: SetDef | None, new: SetDef, n: dict[str, int]
) -> None:
    if old is not None and old.elements is new.elements:
        return
    before = old.elements if old is not None else frozenset()
    gone, added = before - new.elements, new.elements - before
    if gone:
        tx.delete_elements(name, gone)
        n["ed"] += len(gone)
    if added:
        tx.add_elements(name, added)
        n["ea"] += len(added)


def held_from(listing: Listing, known: Mapping[tuple[str, str], str]) -> Held:
    """The kernel's table as ``Held``. A rule whose expressions differ from those ``known``
    for its id (recorded when last verified) counts as foreign: its chain is rewritten."""
    chains: dict[str, tuple[Hook | None, tuple[str | None, ...]]] = {}
    for name, c in listing.chains.items():
        ids = tuple(
            None if r.id is not None and known.get((name, r.id), r.expr) != r.expr else r.id
            for r in c.rules
        )
        chains[name] = (c.hook, ids)
    return Held(policy_log.without_kernel_elements(listing.sets), chains)
