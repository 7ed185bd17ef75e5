"""The kernel routes fabricd wants, from the RIB, the intent and the local pods. Pure.

Precedence for one prefix, lowest first: adopted (until converged), best learned route,
own block (blackhole), local pod (host route on its veth). A learned route never replaces
an own block's blackhole or a local pod's /32, and a withdrawal leaves an adopted route in
place until the RIB has converged (``sessions.Convergence``).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator, Mapping

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
) -> Iterator[tuple[IPNetwork, KernelRoute | None]]:
    """The route table updates for RIB ``changes``: skips own blocks and local pods' routes
    (``local``), keeps the withdrawn prefixes in ``keeps`` (adopted routes before
    convergence). Containers, not predicates: 100k withdrawals test each prefix against all
    three, and ``in`` a set or dict needs no Python call."""
    # an empty container is not asked: `in` hashes the prefix first (a Python call for one)
    own, local, keeps = own or (), local or (), keeps or ()
    for dst, hops in changes.items():
        if dst in own or dst in local:  # a local pod's /32 stays on its veth
            continue
        if hops:
            yield dst, KernelRoute.via(dst, gateways(hops))
        elif dst not in keeps:
            yield dst, None


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
