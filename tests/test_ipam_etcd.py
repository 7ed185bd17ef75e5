"""IPAM behaviours against a real etcd (one per session; each test has its own prefix)."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ipam import keys
from ipam.allocator import Allocator
from ipam.blocks import AffinityState
from ipam.errors import (
    AlreadyAllocatedError,
    ExhaustedError,
    InUseError,
    ValidationError,
)
from ipam.gc import CheckReport, Maintenance
from ipam.pool import IPAMConfig, Pool, Reservation
from ipam.request import AssignRequest
from ipam.resources import Node
from ipam.store import Store

pytestmark = pytest.mark.etcd

Body = Callable[[Allocator, Maintenance], Awaitable[Any]]


def run(endpoints: list[str], prefix: str, body: Body) -> Any:
    async def main() -> Any:
        store = Store(endpoints, prefix)
        try:
            alloc = Allocator(store)
            return await body(alloc, Maintenance(alloc))
        finally:
            await store.close()

    return asyncio.run(main())


async def pool(a: Allocator, name: str, cidr: str, **spec: Any) -> Pool:
    p = Pool.from_spec(name, {"cidr": cidr, **spec})
    await a.resources.create_pool(p)
    return p


def ip(s: str) -> Any:
    return ipaddress.ip_address(s)


def test_pool_overlap_is_refused_even_when_created_concurrently(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "a", "10.0.0.0/16")
        with pytest.raises(ValidationError, match="overlaps pool a"):
            await pool(a, "b", "10.0.1.0/24")
        # Ten concurrent creations of overlapping pools: exactly one wins.
        specs = [Pool.from_spec(f"c{i}", {"cidr": f"10.1.0.0/{16 + i}"}) for i in range(10)]
        results = await asyncio.gather(
            *(a.resources.create_pool(p) for p in specs), return_exceptions=True
        )
        ok = [r for r in results if r is None]
        assert len(ok) == 1, results
        assert all(isinstance(r, ValidationError) for r in results if r is not None)

    run(etcd_endpoints, prefix, body)


def test_assign_is_idempotent_per_handle_and_records_attributes(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.2.0.0/24")
        req = AssignRequest("net.c1.eth0", "n1", attrs={"pod": "web-0", "namespace": "prod"})
        first = await a.auto_assign(req)
        again = await Allocator(a.store).auto_assign(req)  # a fresh allocator, no cache
        assert [x.ip for x in first] == [x.ip for x in again]
        found = await m.lookup(first[0].ip)
        assert found is not None
        _, blk, o = found
        owner = blk.owner(o)
        assert owner is not None and owner.handle == "net.c1.eth0"
        assert owner.secondary == {"node": "n1", "pod": "web-0", "namespace": "prod"}
        affs = await a.blocks.affinities("n1")
        assert [x.state for x in affs] == [AffinityState.CONFIRMED]

    run(etcd_endpoints, prefix, body)


def test_release_by_handle_and_ip_idempotent_and_stale_safe(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.3.0.0/24", blockSize=30)  # 4 addresses per block
        got = [(await a.auto_assign(AssignRequest(f"h{i}", "n1")))[0] for i in range(4)]
        assert len({g.block for g in got}) == 1
        assert await a.release_handle("h0") == [got[0].ip]
        assert await a.release_handle("h0") == []
        assert await a.release_ips({got[0].ip: None}) == ([], []), "releasing a free IP is a no-op"
        assert await a.blocks.get_handle("h0") is None
        # A stale sequence number does not free the address.
        rel, stale = await a.release_ips({got[1].ip: got[1].seq + 100})
        assert rel == [] and stale == [got[1].ip]
        rel, stale = await a.release_ips({got[1].ip: got[1].seq})
        assert rel == [got[1].ip] and stale == []
        assert await a.blocks.get_handle("h1") is None, "handle removed with its last address"
        # FIFO: h0's address (freed first) comes back before h1's.
        nxt = await a.auto_assign(AssignRequest("h4", "n1"))
        assert nxt[0].ip == got[0].ip

    run(etcd_endpoints, prefix, body)


def test_block_claim_resumes_after_crash_between_phases(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        p = await pool(a, "p", "10.4.0.0/24")
        await a.resources.put_node(Node("n1"))
        cidr = ipaddress.ip_network("10.4.0.64/26")
        claimed = await a.blocks.claim("n1", cidr)  # phase 1 only: the "crash" happens here
        assert claimed is not None
        assert [x.state for x in await a.blocks.affinities("n1")] == [AffinityState.PENDING]
        rep = await m.check()
        assert rep.stuck_affinities == [{"node": "n1", "cidr": str(cidr), "state": "pending"}]
        got = await Allocator(a.store).auto_assign(AssignRequest("h", "n1"))
        assert got[0].block == cidr, "the pending claim was finished and used"
        assert [x.state for x in await a.blocks.affinities("n1")] == [AffinityState.CONFIRMED]
        assert p.cidr.overlaps(cidr)

    run(etcd_endpoints, prefix, body)


def test_borrowing_strict_affinity_and_block_limit(etcd_endpoints: list[str], prefix: str) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.5.0.0/29", blockSize=30)  # two blocks of 4
        for i in range(4):
            await a.auto_assign(AssignRequest(f"a{i}", "n1"))
        await a.auto_assign(AssignRequest("b0", "n2"))
        assert len(await a.blocks.affinities()) == 2
        # n1's block is full and no block is free: it borrows from n2's block.
        got = await a.auto_assign(AssignRequest("a4", "n1"))
        assert got[0].borrowed and got[0].block in {x.cidr for x in await a.blocks.affinities("n2")}
        _, borrowed = await m.usage()
        assert [(b.ip, b.borrowing_node, b.block_owner) for b in borrowed] == [
            (str(got[0].ip), "n1", "n2")
        ]
        await a.resources.set_config(IPAMConfig(strict_affinity=True))
        a.invalidate()
        with pytest.raises(ExhaustedError, match="strictAffinity"):
            await a.auto_assign(AssignRequest("a5", "n1"))
        assert await a.blocks.get_handle("a5") is None

    run(etcd_endpoints, prefix, body)


def test_max_blocks_per_host(etcd_endpoints: list[str], prefix: str) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.6.0.0/24", blockSize=30)
        await a.resources.set_config(IPAMConfig(strict_affinity=True, max_blocks_per_host=2))
        for i in range(8):
            await a.auto_assign(AssignRequest(f"h{i}", "n1"))
        with pytest.raises(ExhaustedError, match="per-host block limit 2"):
            await a.auto_assign(AssignRequest("h8", "n1"))
        assert len(await a.blocks.affinities("n1")) == 2

    run(etcd_endpoints, prefix, body)


def test_specific_address_and_reservations(etcd_endpoints: list[str], prefix: str) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.7.0.0/28", blockSize=28)
        await a.resources.put_reservation(
            Reservation.from_spec("gw", {"reservedCIDRs": ["10.7.0.0/30"]})
        )
        got = await a.assign_ip("sticky", ip("10.7.0.9"), "n1", {"pod": "db-0"})
        assert got.ip == ip("10.7.0.9")
        assert (await a.assign_ip("sticky", ip("10.7.0.9"), "n1")).ip == got.ip
        with pytest.raises(AlreadyAllocatedError):
            await a.assign_ip("other", ip("10.7.0.9"), "n1")
        with pytest.raises(ValidationError, match="reserved by IPReservation gw"):
            await a.assign_ip("other", ip("10.7.0.2"), "n1")
        with pytest.raises(ValidationError, match="not in any enabled IP pool"):
            await a.assign_ip("other", ip("10.8.0.2"), "n1")
        handed = []
        with pytest.raises(ExhaustedError):
            for i in range(20):
                handed += await a.auto_assign(AssignRequest(f"h{i}", "n1"))
        addrs = {int(x.ip) - int(ip("10.7.0.0")) for x in handed}
        assert len(handed) == 11 and not addrs & {0, 1, 2, 3, 9}, (
            "reserved and sticky never handed out"
        )

    run(etcd_endpoints, prefix, body)


def test_dual_stack_is_all_or_nothing(etcd_endpoints: list[str], prefix: str) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "v4", "10.9.0.0/24")
        await pool(a, "v6", "fd00:9::/126", blockSize=126)
        await a.resources.set_config(IPAMConfig(strict_affinity=True))
        got = await a.auto_assign(AssignRequest("ds0", "n1", num_v4=1, num_v6=1))
        assert sorted(x.ip.version for x in got) == [4, 6]
        for i in range(1, 4):
            await a.auto_assign(AssignRequest(f"ds{i}", "n1", num_v4=1, num_v6=1))
        before = (await m.check()).ips_in_use
        with pytest.raises(ExhaustedError, match="IPv6"):
            await a.auto_assign(AssignRequest("ds4", "n1", num_v4=1, num_v6=1))
        assert (await m.check()).ips_in_use == before, "the IPv4 half was not kept"
        assert await a.blocks.get_handle("ds4") is None

    run(etcd_endpoints, prefix, body)


def test_disabled_pool_stops_new_allocations_only(etcd_endpoints: list[str], prefix: str) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.10.0.0/24")
        held = await a.auto_assign(AssignRequest("h0", "n1"))
        await a.resources.set_pool_disabled("p", True)
        with pytest.raises(ExhaustedError, match="no enabled IPv4 pool"):
            await a.auto_assign(AssignRequest("h1", "n1"))  # the cached pool revision is stale
        assert await a.ips_by_handle("h0") == held
        with pytest.raises(InUseError, match="1 addresses in use"):
            await m.delete_pool("p")
        assert await m.delete_pool("p", force=True) == 1
        assert await a.resources.list_pools() == []
        assert (await m.check()).blocks == 0

    run(etcd_endpoints, prefix, body)


def test_node_selector_picks_the_pool(etcd_endpoints: list[str], prefix: str) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "r1", "10.11.0.0/24", nodeSelector="rack == 'r1'")
        await pool(a, "r2", "10.11.1.0/24", nodeSelector="rack == 'r2'")
        await a.resources.put_node(Node("n2", labels={"rack": "r2"}))
        got = await a.auto_assign(AssignRequest("h", "n2"))
        assert got[0].pool == "r2"
        with pytest.raises(ExhaustedError):
            await a.auto_assign(AssignRequest("h2", "unlabelled"))
        with pytest.raises(ValidationError, match="no IPv4 pool named 'nope'"):
            await a.auto_assign(AssignRequest("h3", "n2", pools_v4=("nope",)))

    run(etcd_endpoints, prefix, body)


def test_gc_releases_dead_handles_and_empty_blocks_after_grace(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.12.0.0/24", blockSize=30)
        for i in range(8):  # two blocks for n1
            await a.auto_assign(AssignRequest(f"h{i}", "n1"))
        await a.auto_assign(AssignRequest("other", "n2"))
        res = await m.gc_node("n1", live_handles=["h0"], empty_grace=0)
        assert sorted(res.released) == [f"h{i}" for i in range(1, 8)]
        assert await a.ips_by_handle("other"), "another node's allocation is untouched"
        assert res.released_blocks == [], "first observation only stamps the empty block"
        res = await m.gc_node("n1", live_handles=["h0"], empty_grace=0)
        assert len(res.released_blocks) == 1, "the empty block goes on the second look"
        await a.release_handle("h0")
        for _ in range(3):
            res = await m.gc_node("n1", live_handles=[], empty_grace=0)
            assert res.released_blocks == [], "never the node's last block"
        assert len(await a.blocks.affinities("n1")) == 1

    run(etcd_endpoints, prefix, body)


def test_deleted_node_is_released_and_check_repairs_from_report(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.13.0.0/24")
        await a.resources.put_node(Node("n1"))
        for i in range(3):
            await a.auto_assign(AssignRequest(f"h{i}", "n1"))
        await a.resources.put_node(Node("gone"))
        await a.auto_assign(AssignRequest("g0", "gone"))
        assert (await m.check()).problems == 0
        # Seed problems: a node vanishes, a handle record is lost, a handle count is wrong.
        await a.store.delete(keys.node("gone"))
        await a.store.delete(keys.handle("h0"))
        h1_block = (await a.ips_by_handle("h1"))[0].block
        await a.store.put(keys.handle("h1"), b'{"block":{"%s":5}}' % str(h1_block).encode())
        rep = await m.check()
        assert {e["handle"] for e in rep.ips_without_handle} == {"h0"}
        assert [e["handle"] for e in rep.handles_without_ips] == ["h1"]
        assert [e["node"] for e in rep.affinities_of_missing_nodes] == ["gone"]
        rep2 = CheckReport.from_json(rep.to_json())
        counts = await m.release_from_report(rep2)
        assert counts["nodes"] == 1 and counts["ips"] == 1 and counts["handles"] == 1
        after = await m.check()
        assert after.problems == 0, after.to_json()
        assert [x.handle for x in await a.ips_by_handle("h2")] == ["h2"]

    run(etcd_endpoints, prefix, body)


def test_only_conflicts_are_retried(etcd_endpoints: list[str], prefix: str) -> None:
    from ipam.errors import ConflictError
    from ipam.retry import cas_retry

    calls = []

    async def flaky(n: int) -> str:
        calls.append(n)
        if n < 3:
            raise ConflictError("lost")
        return "ok"

    async def broken(n: int) -> str:
        calls.append(n)
        raise ValidationError("x", "bad")

    assert asyncio.run(cas_retry("t", flaky)) == "ok" and calls == [0, 1, 2, 3]
    calls.clear()
    with pytest.raises(ValidationError):
        asyncio.run(cas_retry("t", broken))
    assert calls == [0]
    calls.clear()
    with pytest.raises(ConflictError, match="5 attempts"):
        asyncio.run(cas_retry("t", lambda n: flaky(-1 - n), retries=5))


def test_refused_pool_delete_leaves_the_pool_as_it_was(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.14.0.0/24")
        await a.auto_assign(AssignRequest("h0", "n1"))
        with pytest.raises(InUseError):
            await m.delete_pool("p")
        _, p = await a.resources.get_pool("p")
        assert not p.disabled, "a refused delete must not leave the pool disabled"
        assert (await a.auto_assign(AssignRequest("h1", "n1")))[0].pool == "p"
        # update keeps the existing block size when the spec leaves it out
        await a.resources.update_pool(
            Pool.from_spec("p", {"cidr": "10.14.0.0/24", "blockSize": 26})
        )
        assert (await a.resources.get_pool("p"))[1].updated(
            {"cidr": "10.14.0.0/24"}
        ).block_size == 26
        cfg = await a.resources.update_config(lambda c: IPAMConfig(True, c.max_blocks_per_host + 3))
        assert cfg == await a.resources.get_config() == IPAMConfig(True, 3)

    run(etcd_endpoints, prefix, body)


def test_reservation_added_later_is_honoured_by_a_warm_allocator(
    etcd_endpoints: list[str], prefix: str
) -> None:
    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.15.0.0/28", blockSize=28)
        first = await a.auto_assign(AssignRequest("h0", "n1"))  # warms caches and memos
        nxt = first[0].ip + 1
        await a.resources.put_reservation(
            Reservation.from_spec("late", {"reservedCIDRs": [f"{nxt}/32"]})
        )
        got = await a.auto_assign(AssignRequest("h1", "n1"))
        assert got[0].ip != nxt, "the reservation made after the cache was warm was ignored"

    run(etcd_endpoints, prefix, body)


def test_assign_ip_refuses_a_reservation_made_after_the_cache_was_warm(
    etcd_endpoints: list[str], prefix: str
) -> None:
    """Issue 16: assign_ip checked reservations from the settings cache only and its commit did
    not compare them, so a warm allocator handed out a freshly reserved address."""

    async def body(a: Allocator, m: Maintenance) -> None:
        await pool(a, "p", "10.15.0.0/28", blockSize=28)
        await a.assign_ip("first", ip("10.15.0.2"), "n1")  # warms the settings cache
        async with Store(etcd_endpoints, prefix) as other:  # another process reserves
            await Allocator(other).resources.put_reservation(
                Reservation.from_spec("late", {"reservedCIDRs": ["10.15.0.9/32"]})
            )
        with pytest.raises(ValidationError, match="reserved by IPReservation late"):
            await a.assign_ip("sticky", ip("10.15.0.9"), "n1")
        assert await a.ips_by_handle("sticky") == []

    run(etcd_endpoints, prefix, body)
