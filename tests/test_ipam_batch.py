"""Assignments arriving together on one node are coalesced, with the same answers as alone."""

from __future__ import annotations

import asyncio

import pytest

from ipam.allocator import Allocator
from ipam.batch import BatchingAllocator
from ipam.errors import ValidationError
from ipam.gc import Maintenance
from ipam.pool import IPAMConfig, Pool, Reservation
from ipam.request import AssignRequest
from ipam.resources import Node
from ipam.store import Store

pytestmark = pytest.mark.etcd


def test_concurrent_assignments_are_batched_distinct_and_consistent(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def main() -> None:
        async with Store(etcd_endpoints, prefix) as s:
            a = Allocator(s)
            b = BatchingAllocator(a)
            await a.resources.create_pool(Pool.from_spec("p", {"cidr": "10.20.0.0/20"}))
            await a.resources.put_node(Node("n1"))
            reqs = [AssignRequest(f"h{i}", "n1", attrs={"pod": f"p{i}"}) for i in range(300)]
            # the same handle twice in the burst: one address, given to both callers
            reqs.append(AssignRequest("h7", "n1", attrs={"pod": "p7"}))
            # one bad request in the burst gets its own error; the others are unaffected
            bad = AssignRequest("bad", "n1", pools_v4=("nope",))
            results = await asyncio.gather(
                *(b.assign(r) for r in [*reqs, bad]), return_exceptions=True
            )
            *good, err = results
            assert isinstance(err, ValidationError)
            ips = [g[0].ip for g in good if not isinstance(g, BaseException)]
            assert len(ips) == 301
            assert len(set(ips)) == 300 and ips[7] == ips[300]
            assert b.batches > 0, "nothing was coalesced"
            rep = await Maintenance(a).check()
            assert rep.problems == 0 and rep.ips_in_use == 300
            for r, g in zip(reqs, good, strict=True):
                assert not isinstance(g, BaseException)
                assert [x.ip for x in await a.ips_by_handle(r.handle)] == [g[0].ip]

    asyncio.run(main())


def test_two_batching_allocators_on_one_node_never_duplicate(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def main() -> None:
        async with Store(etcd_endpoints, prefix) as s1, Store(etcd_endpoints, prefix) as s2:
            a1, a2 = Allocator(s1), Allocator(s2)
            await a1.resources.create_pool(Pool.from_spec("p", {"cidr": "10.21.0.0/22"}))
            b1, b2 = BatchingAllocator(a1), BatchingAllocator(a2)
            reqs = [(b1 if i % 2 else b2).assign(AssignRequest(f"h{i}", "n1")) for i in range(200)]
            got = await asyncio.gather(*reqs)
            ips = [g[0].ip for g in got]
            assert len(set(ips)) == 200
            assert (await Maintenance(a1).check()).ips_in_use == 200

    asyncio.run(main())


def test_batch_honours_a_reservation_made_after_the_cache_was_warm(
    etcd_endpoints: list[str], prefix: str
) -> None:
    """The combined commit compares the reservations it planned with (one helper builds the
    settings compares of every commit path)."""

    async def main() -> None:
        async with Store(etcd_endpoints, prefix) as s, Store(etcd_endpoints, prefix) as s2:
            a = Allocator(s)
            b = BatchingAllocator(a)
            await a.resources.create_pool(Pool.from_spec("p", {"cidr": "10.22.0.0/28",
                                                               "blockSize": 28}))  # fmt: skip
            first = await a.auto_assign(AssignRequest("h0", "n1"))  # warms caches and memos
            nxt = [first[0].ip + i for i in range(1, 5)]
            await Allocator(s2).resources.put_reservation(
                Reservation.from_spec("late", {"reservedCIDRs": [f"{n}/32" for n in nxt]})
            )
            got = await asyncio.gather(
                *(b.assign(AssignRequest(f"h{i}", "n1")) for i in range(1, 4))
            )
            assert not {g[0].ip for g in got} & set(nxt), "reserved addresses were handed out"

    asyncio.run(main())


@pytest.mark.parametrize("limit", [1, 0])
def test_a_burst_that_fills_the_block_never_gives_an_address_twice(
    etcd_endpoints: list[str], prefix: str, limit: int
) -> None:
    """A burst larger than the room left in the node's block: the batch plans request after
    request on its own staged blocks, and re-reading the node's blocks (when the staged block
    is full) or every block (to borrow, at ``maxBlocksPerHost`` 1) must not put etcd's older
    copy back under the batch: that gave the last free addresses, and the first borrowed
    one, to two pods each, with only one of them recorded (seen in the soak: fill61/fill62
    both 10.244.157.126)."""

    async def main() -> None:
        async with Store(etcd_endpoints, prefix) as s:
            a = Allocator(s)
            b = BatchingAllocator(a)
            await a.resources.create_pool(Pool.from_spec("p", {"cidr": "10.23.0.0/24",
                                                               "blockSize": 29}))  # fmt: skip
            await a.resources.set_config(IPAMConfig(max_blocks_per_host=limit))
            for n in ("n1", "n2"):
                await a.resources.put_node(Node(n))
            await a.auto_assign(AssignRequest("other", "n2"))  # n2's block: room to borrow
            for i in range(5):  # n1's block: 3 addresses left
                await a.auto_assign(AssignRequest(f"early{i}", "n1"))
            reqs = [AssignRequest(f"h{i}", "n1", attrs={"pod": f"p{i}"}) for i in range(9)]
            got = await asyncio.gather(*(b.assign(r) for r in reqs))
            ips = [g[0].ip for g in got]
            assert len(set(ips)) == len(ips), f"an address given twice: {sorted(ips)}"
            assert b.batches > 0, "nothing was coalesced"
            for r, g in zip(reqs, got, strict=True):
                assert [x.ip for x in await a.ips_by_handle(r.handle)] == [g[0].ip]
            rep = await Maintenance(a).check()
            assert rep.problems == 0 and rep.ips_in_use == 1 + 5 + 9
            if limit:
                assert sum(g[0].borrowed for g in got) == 6  # 3 fit, 6 borrowed from n2

    asyncio.run(main())
