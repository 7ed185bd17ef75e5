"""Candidate routes of one prefix and its best path (ECMP), for ``bgp.rib``. Pure.

A prefix's *entry* is one flat tuple: its best path, then its candidates per peer in arrival
order, ``(best, peer, announce, peer, announce, ...)``. Replaced, never mutated; ``()`` means
"no route". The best path is the set of next hops of the routes with the shortest AS path,
one shared frozenset per distinct set, computed when the entry is built.

One flat tuple costs ~64 bytes, where a tuple of pairs took ~104 and a ``{peer: announce}``
dict ~280 (100k prefixes: 5 and 18 MB of fabricd's peak). The best path inside it saves the
RIB a second 100k-entry table (~5 MB) and, per withdrawn prefix, a dict operation on it: in
a random order across 100k entries each one is a likely cache miss.
"""

from __future__ import annotations

from typing import Any

from bgp.model import Announce, IPAddress

Paths = tuple[Any, ...]  # (peer, announce, peer, announce, ...)
Entry = tuple[Any, ...]  # (best, peer, announce, ...), or () for no route


# Next-hop sets are few (one per peer or ECMP combination) but referenced by every prefix:
# share one object per distinct set (100,000 routes via one router keep one frozenset).
_HOPSETS: dict[frozenset[IPAddress], frozenset[IPAddress]] = {}
_SINGLE: dict[IPAddress, frozenset[IPAddress]] = {}  # next hop -> its set of one, shared


def with_path(entry: Entry | None, peer: IPAddress, ann: Announce) -> Entry:
    """``entry`` (None: no route yet) with ``peer``'s route replaced (in its place) or
    added (last), its best path recomputed."""
    if entry is None:
        return (select((peer, ann)), peer, ann)
    for i in range(1, len(entry), 2):
        if (p := entry[i]) is peer or p == peer:
            paths = (*entry[1:i], peer, ann, *entry[i + 2 :])
            break
    else:
        paths = (*entry[1:], peer, ann)
    return (select(paths), *paths)


def without(entry: Entry, peer: IPAddress) -> Entry | None:
    """``entry`` without ``peer``'s route, its best path recomputed (``()``: no route left);
    None if it had none."""
    for i in range(1, len(entry), 2):
        if (p := entry[i]) is peer or p == peer:
            paths = entry[1:i] + entry[i + 2 :]
            return (select(paths), *paths) if paths else ()
    return None


def select(paths: Paths) -> frozenset[IPAddress] | None:
    """The ECMP set of candidates ``paths`` (no best path in front): next hops of the
    routes with the shortest AS path."""
    if not paths:
        return None
    if len(paths) == 2:  # the common case: one set per next hop, found without building one
        hop = paths[1].next_hop
        single = _SINGLE.get(hop)
        if single is None:
            if len(_SINGLE) > 4096:
                _SINGLE.clear()
            single = _SINGLE[hop] = shared(frozenset((hop,)))
        return single
    anns: tuple[Announce, ...] = paths[1::2]
    shortest = min(len(a.attrs.as_path) for a in anns)
    return shared(frozenset(a.next_hop for a in anns if len(a.attrs.as_path) == shortest))


def shared(hops: frozenset[IPAddress]) -> frozenset[IPAddress]:
    if len(_HOPSETS) > 4096:
        _HOPSETS.clear()
    return _HOPSETS.setdefault(hops, hops)
