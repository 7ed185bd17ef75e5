"""Waiting for an address to be announced: until an advert ExaBGP acknowledged covers it.

``Speaker.wait_covered(ip, timeout)`` is the public face (fabricd's CNI ADD of a borrowed
address waits on it before answering, docs/design/cni.md "Borrowed addresses"). ExaBGP
acknowledges an ``announce`` once the route is in its neighbor RIBs (adjout.py), from where
its reactor writes the UPDATEs within the same loop pass: the ack is the last moment this
host can observe before the route is on the wire.

Invariants:
- ``covering`` is pure: one dict lookup per prefix length (33 for IPv4, ~40 us), asked
  only for addresses outside this host's own blocks and on acks while someone waits.
- Waiters are checked only on acks (``notify``), never by polling; a waiter that times out
  or is cancelled leaves nothing behind.
"""

# ruff: noqa: ASYNC109 (a bounded wait that answers False, as Speaker.ping does)
from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping

from bgp.model import Advert, IPAddress, IPNetwork


class Covered:
    """The acknowledged adverts (read through ``acked``, which may return a new mapping
    after an ExaBGP restart) and the coroutines waiting for an address to be covered."""

    def __init__(self, acked: Callable[[], Mapping[IPNetwork, Advert]]) -> None:
        self._acked = acked
        self._waiters: dict[IPAddress, list[asyncio.Future[None]]] = {}
        self._at: dict[IPNetwork, float] = {}  # when ExaBGP last acknowledged each prefix

    def since(self, ip: IPAddress) -> float | None:
        """When (``time.monotonic()``) the advert now covering ``ip`` was acknowledged: 0.0
        when not seen (acknowledged without a time), None when nothing covers it."""
        net = self.covering(ip)
        return None if net is None else self._at.get(net, 0.0)

    def covering(self, ip: IPAddress) -> IPNetwork | None:
        """The most specific acknowledged prefix that contains ``ip``, or None."""
        acked = self._acked()
        top = ip.max_prefixlen
        for plen in range(top, -1, -1):
            net = ipaddress.ip_network((ip, plen), strict=False)
            if net in acked:
                return net
        return None

    def notify(self, acked: Iterable[IPNetwork] = ()) -> None:
        """Acks came in (``acked``: the prefixes ExaBGP just acknowledged): note when, and
        wake every waiter whose address is covered now."""
        now = time.monotonic()
        for p in acked:
            self._at[p] = now
        if len(self._at) > 2 * len(held := self._acked()) + 64:  # withdrawn ones go
            self._at = {p: t for p, t in self._at.items() if p in held}
        if not self._waiters:
            return
        for ip in [ip for ip in self._waiters if self.covering(ip) is not None]:
            for fut in self._waiters.pop(ip):
                if not fut.done():
                    fut.set_result(None)

    async def wait(self, ip: IPAddress, timeout: float) -> bool:
        """True once an acknowledged advert covers ``ip`` (at once if one does), False after
        ``timeout`` seconds."""
        if self.covering(ip) is not None:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ip, []).append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            left = self._waiters.get(ip)
            if left is not None and fut in left:
                left.remove(fut)
                if not left:
                    del self._waiters[ip]
        return True
