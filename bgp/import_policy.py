"""The import policy: which received routes the local node accepts, and why not.
Pure: no I/O. Used by ``bgp.rib`` for every received route and re-evaluated there when
the policy changes (``Rib.set_policy``).

A route is refused, with one of the reasons below (or ``covers own block <cidr>``), when it
carries the node's own AS beyond the peer's allowance, names the node as originator or next
hop, is a default route not allowed by the configuration, covers one of the node's own
blocks, or lies outside every IP pool and ``importCIDRs`` entry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from bgp.config import BGPConfig
from bgp.model import DEFAULT_AS, Announce, IPAddress, IPNetwork, PathAttrs

# ((version, pool prefix length, {pool network >> host bits}), ...)
_Inside = tuple[tuple[int, int, frozenset[int]], ...]
# (version, prefix length p) -> {own block's network >> (width - p): that block}
_Covers = dict[tuple[int, int], dict[int, IPNetwork]]

OUTSIDE_POOLS = "outside pools"
DEFAULT_ROUTE = "default route"
OWN_AS_IN_PATH = "own AS in path"
NEXT_HOP_IS_SELF = "next hop is self"
ORIGINATOR_IS_SELF = "originator is self"


@dataclass(frozen=True, slots=True)
class ImportPolicy:
    """What the local node accepts from its peers. ``check`` is O(1) in the number of own
    blocks (their supernets are precomputed) and O(distinct pool prefix lengths)."""

    allowed: tuple[IPNetwork, ...] = ()
    own: frozenset[IPNetwork] = frozenset()
    allow_default: bool = False
    local_as: int = DEFAULT_AS
    router_id: ipaddress.IPv4Address | None = None
    own_addresses: frozenset[IPAddress] = frozenset()
    # Per peer: how many times the local AS may appear in a path (Session.allow_local_as,
    # Calico's numAllowedLocalASNumbers: one AS per rack, routes come back via the ToR).
    allow_local_as: Mapping[IPAddress, int] = field(default_factory=dict, hash=False)
    _inside: _Inside = field(init=False, repr=False, compare=False)
    _covers: _Covers = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups: dict[tuple[int, int], set[int]] = {}
        for net in self.allowed:
            shifted = int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
            groups.setdefault((net.version, net.prefixlen), set()).add(shifted)
        inside = tuple((v, plen, frozenset(s)) for (v, plen), s in sorted(groups.items()))
        covers: _Covers = {}
        # Most specific own block first, so a supernet names the smallest block it covers.
        for block in sorted(
            self.own, key=lambda n: (n.version, -n.prefixlen, int(n.network_address))
        ):
            n, width = int(block.network_address), block.max_prefixlen
            for plen in range(block.prefixlen, -1, -1):
                covers.setdefault((block.version, plen), {}).setdefault(n >> (width - plen), block)
        object.__setattr__(self, "_inside", inside)
        object.__setattr__(self, "_covers", covers)

    @classmethod
    def for_node(
        cls,
        config: BGPConfig,
        pools: Iterable[IPNetwork],
        own: Iterable[IPNetwork],
        local_as: int,
        router_id: ipaddress.IPv4Address | None,
        own_addresses: Iterable[IPAddress],
        allow_local_as: Mapping[IPAddress, int] | None = None,
    ) -> ImportPolicy:
        """The policy of one node: its IP pools plus ``config.import_cidrs``, and the default
        route as ``config.import_default_route`` says."""
        return cls(
            allowed=(*pools, *config.import_cidrs),
            own=frozenset(own),
            allow_default=config.import_default_route,
            local_as=local_as,
            router_id=router_id,
            own_addresses=frozenset(own_addresses),
            allow_local_as=dict(allow_local_as or {}),
        )

    def check(self, peer: IPAddress, announce: Announce) -> str | None:
        """None if ``announce`` from ``peer`` is acceptable, else a short reason: the path's
        reason (``check_path``) if any, else the prefix's (``check_prefix``)."""
        return self.check_path(peer, announce.next_hop, announce.attrs) or self.check_prefix(
            announce.prefix
        )

    def check_path(self, peer: IPAddress, next_hop: IPAddress, a: PathAttrs) -> str | None:
        """The checks that do not depend on the prefix (the RIB runs them once for all the
        prefixes of an UPDATE, which share next hop and attributes).

        An own AS in the path (beyond the peer's allowance) is a loop whether the route came
        over eBGP or iBGP: inside one AS a route carrying it has left the AS and come back
        (RFC 4271 §9.1.2)."""
        # None == address would run ipaddress's __eq__ (it raises and catches: 1.4 us/prefix)
        if a.originator_id is not None and a.originator_id == self.router_id:
            return ORIGINATOR_IS_SELF
        if self.local_as in a.as_path and a.as_path.count(self.local_as) > self.allow_local_as.get(
            peer, 0
        ):
            return OWN_AS_IN_PATH
        if next_hop in self.own_addresses:
            return NEXT_HOP_IS_SELF
        return None

    def check_prefix(self, prefix: IPNetwork) -> str | None:
        """The checks of the prefix itself: default route, own blocks, pools."""
        if prefix.prefixlen == 0:
            # The one prefix allowed outside the pools (a ToR's default), and it covers
            # every own block by definition: the blocks stay more specific.
            return None if self.allow_default else DEFAULT_ROUTE
        n, plen, version = int(prefix.network_address), prefix.prefixlen, prefix.version
        width = prefix.max_prefixlen
        below = self._covers.get((version, plen))
        if below is not None:
            block = below.get(n >> (width - plen))
            if block is not None:
                return f"covers own block {block}"
        for v, alen, nets in self._inside:
            if v == version and alen <= plen and n >> (width - alen) in nets:
                return None
        return OUTSIDE_POOLS
