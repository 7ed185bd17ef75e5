"""The kernel routes fabricd wants, from the RIB, the intent and the local pods. Pure.

Precedence for one prefix, lowest first: adopted (until converged), best learned route,
own block (blackhole), local pod (host route on its veth). A learned route never replaces
an own block's blackhole or a local pod's /32, and a withdrawal leaves an adopted route in
place until the RIB has converged (``sessions.Convergence``).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping

from bgp.model import IPAddress, IPNetwork
from fabric.dataplane.netlink import KernelRoute

Changes = Mapping[IPNetwork, frozenset[IPAddress] | None]  # RIB best paths that changed


class Gateways:
    """One shared tuple per next-hop set (100,000 routes via one ToR share one)."""

    MAX = 4096  # distinct sets kept; more means churn, and the cache starts over

    def __init__(self) -> None:
        self._tuples: dict[frozenset[IPAddress], tuple[IPAddress, ...]] = {}

    def __call__(self, hops: frozenset[IPAddress]) -> tuple[IPAddress, ...]:
        got = self._tuples.get(hops)
        if got is None:
            if len(self._tuples) > self.MAX:
                self._tuples.clear()
            got = self._tuples[hops] = tuple(sorted(hops))
        return got


def kernel_changes(
    changes: Changes,
    own: Container[IPNetwork],
    local: Container[IPNetwork],
    keeps: Container[IPNetwork],
    gateways: Gateways,
) -> dict[IPNetwork, KernelRoute | None]:
    """The route table updates for RIB ``changes`` (None: remove): skips own blocks and
    local pods' routes (``local``), keeps the withdrawn prefixes in ``keeps`` (adopted
    routes before convergence). A withdrawal of 100k routes runs through here in updates of
    ~800: the result is built from ``changes`` with the hashes it holds (``dict.fromkeys``)
    and a set container is matched as a set (``isdisjoint``, ``intersection``: stored
    hashes again), so a withdrawn prefix costs no Python call (``Prefix4.__hash__``) here,
    and ``RouteTable.update`` takes the dict's hashes too."""
    out: dict[IPNetwork, KernelRoute | None] = dict.fromkeys(changes)
    for dst, hops in changes.items():
        if hops:
            out[dst] = KernelRoute.via(dst, gateways(hops))
    if own or local or keeps:
        keys = frozenset(out)  # the dict's hashes again
        for dst in _among(keys, own):
            del out[dst]
        for dst in _among(keys, local):  # a local pod's /32 stays on its veth
            out.pop(dst, None)
        for dst in _among(keys, keeps):
            if dst in out and out[dst] is None:
                del out[dst]
    return out


def _among(keys: frozenset[IPNetwork], container: Container[IPNetwork]) -> Iterable[IPNetwork]:
    """The members of ``keys`` that are in ``container`` (a set: matched with the hashes
    both hold; anything else, an adopted-routes dict of 100k, asked once per key)."""
    if not container:
        return ()
    if isinstance(container, set | frozenset):
        return () if keys.isdisjoint(container) else keys.intersection(container)
    return [dst for dst in keys if dst in container]


def desired_routes(
    adopted: Mapping[IPNetwork, KernelRoute],
    best: Changes,
    blackholes: Iterable[IPNetwork],
    local: Mapping[IPNetwork, KernelRoute],
    gateways: Gateways,
) -> dict[IPNetwork, KernelRoute]:
    """The whole kernel table fabricd wants, by the precedence of the module docstring."""
    desired: dict[IPNetwork, KernelRoute] = dict(adopted)
    for dst, hops in best.items():
        if hops:
            desired[dst] = KernelRoute(dst=dst, gateways=gateways(hops))
    for dst in blackholes:
        desired[dst] = KernelRoute(dst=dst, blackhole=True)
    desired.update(local)
    return desired
