"""The kernel routes fabricd wants, from the RIB, the intent and the local pods. Pure.

Precedence for one prefix, lowest first: adopted (until converged), best learned route,
own block (blackhole), local pod (host route on its veth). A learned route never replaces
an own block's blackhole or a local pod's /32, and a withdrawal leaves an adopted route in
place until the RIB has converged (``sessions.Convergence``).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable, Iterator, Mapping

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
    local: Callable[[IPNetwork], bool],
    keeps: Callable[[IPNetwork], bool],
    gateways: Gateways,
) -> Iterator[tuple[IPNetwork, KernelRoute | None]]:
    """The route table updates for RIB ``changes``: skips own blocks and local pods' routes
    (``local``), keeps what ``keeps`` says (adopted routes before convergence)."""
    for dst, hops in changes.items():
        if dst in own or local(dst):  # a local pod's /32 stays on its veth
            continue
        if hops:
            yield dst, KernelRoute.via(dst, gateways(hops))
        elif not keeps(dst):
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
