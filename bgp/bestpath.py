"""Candidate routes of one prefix and its best path (ECMP), for ``bgp.rib``. Pure.

A prefix's candidates are one flat tuple ``(peer, announce, peer, announce, ...)``, per peer
in arrival order: ~56 bytes, where a tuple of pairs took ~104 and a ``{peer: announce}``
dict ~280 (100k prefixes: 5 and 18 MB of fabricd's peak). Replaced, never mutated; ``()``
means "no route". The best path is the set of next hops of the routes with the shortest AS
path, one shared frozenset per distinct set.
"""

from __future__ import annotations

from typing import Any

from bgp.model import Announce, IPAddress

Paths = tuple[Any, ...]


# Next-hop sets are few (one per peer or ECMP combination) but referenced by every prefix:
# share one object per distinct set (100,000 routes via one router keep one frozenset).
_HOPSETS: dict[frozenset[IPAddress], frozenset[IPAddress]] = {}
_SINGLE: dict[IPAddress, frozenset[IPAddress]] = {}  # next hop -> its set of one, shared


def with_path(paths: Paths, peer: IPAddress, ann: Announce) -> Paths:
    """``paths`` with ``peer``'s route replaced (in its place) or added (last)."""
    for i in range(0, len(paths), 2):
        if (p := paths[i]) is peer or p == peer:
            return (*paths[:i], peer, ann, *paths[i + 2 :])
    return (*paths, peer, ann)


def without(paths: Paths, peer: IPAddress) -> Paths | None:
    """``paths`` without ``peer``'s route; None if it had none."""
    for i in range(0, len(paths), 2):
        if (p := paths[i]) is peer or p == peer:
            return paths[:i] + paths[i + 2 :]
    return None


def select(paths: Paths) -> frozenset[IPAddress] | None:
    """The ECMP set: next hops of the routes with the shortest AS path."""
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
