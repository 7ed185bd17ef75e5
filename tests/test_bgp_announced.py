"""bgp.announced: waiting until an acknowledged advert covers an address (the CNI ADD of a
borrowed address waits on it; docs/design/cni.md, "Borrowed addresses")."""

from __future__ import annotations

import asyncio
from ipaddress import ip_address, ip_network

from bgp.announced import Covered
from bgp.model import Advert, IPNetwork


def test_covering_is_the_most_specific_acknowledged_prefix() -> None:
    acked: dict[IPNetwork, Advert] = {}
    c = Covered(lambda: acked)
    assert c.covering(ip_address("10.244.1.5")) is None
    for p in ("10.244.1.0/26", "10.244.1.5/32", "fd00::/122"):
        acked[ip_network(p)] = Advert(ip_network(p))
    assert c.covering(ip_address("10.244.1.5")) == ip_network("10.244.1.5/32")
    assert c.covering(ip_address("10.244.1.6")) == ip_network("10.244.1.0/26")
    assert c.covering(ip_address("10.244.1.64")) is None
    assert c.covering(ip_address("fd00::3")) == ip_network("fd00::/122")


def test_wait_returns_on_the_ack_that_covers_and_leaves_nothing_behind() -> None:
    acked: dict[IPNetwork, Advert] = {}
    c = Covered(lambda: acked)
    ip = ip_address("10.244.9.7")

    async def run() -> None:
        assert not await c.wait(ip, 0.01)  # timed out: False, no waiter left
        assert not c._waiters
        first = asyncio.ensure_future(c.wait(ip, 5))
        second = asyncio.ensure_future(c.wait(ip, 5))
        await asyncio.sleep(0)
        acked[ip_network("10.244.8.0/26")] = Advert(ip_network("10.244.8.0/26"))
        c.notify()  # an ack for something else: still waiting
        await asyncio.sleep(0.01)
        assert not first.done()
        acked[ip_network("10.244.9.7/32")] = Advert(ip_network("10.244.9.7/32"))
        c.notify()
        assert await first and await second
        assert not c._waiters
        assert await c.wait(ip, 0)  # covered already: at once
        cancelled = asyncio.ensure_future(c.wait(ip_address("10.244.10.1"), 5))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        assert not c._waiters

    asyncio.run(run())


def test_since_is_when_the_covering_advert_was_acknowledged() -> None:
    acked: dict[IPNetwork, Advert] = {}
    c = Covered(lambda: acked)
    ip = ip_address("10.244.3.4")
    assert c.since(ip) is None
    block = ip_network("10.244.3.0/26")
    acked[block] = Advert(block)
    assert c.since(ip) == 0.0  # held without a known ack time: long ago
    c.notify([block])
    first = c.since(ip)
    assert first is not None and first > 0.0
    host = ip_network("10.244.3.4/32")
    acked[host] = Advert(host)
    c.notify([host])
    assert (c.since(ip) or 0.0) >= first  # the /32 is the more specific
    del acked[host]
    assert c.since(ip) == first
