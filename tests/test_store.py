"""The etcd store: watches that survive an etcd restart, endpoint failover, leases, errors."""

from __future__ import annotations

import asyncio
import time

import pytest

from ipam.errors import DatastoreUnavailable
from ipam.store import Cmp, Op, Store
from lab.etcd import EtcdCluster, free_port

pytestmark = pytest.mark.etcd


def test_watch_resumes_after_etcd_restart_without_losing_events(prefix: str) -> None:
    with EtcdCluster(size=1) as etcd:
        member = etcd.members[0]

        async def main() -> list[tuple[str, str]]:
            seen: list[tuple[str, str]] = []
            async with Store(etcd.endpoints, prefix) as s:
                rev = await s.put("w/a", b"1")
                got_first = asyncio.Event()

                async def consume() -> None:
                    async for ev in s.watch("w/", rev):
                        seen.append((str(ev.type), ev.kv.key))
                        got_first.set()
                        if len(seen) == 4:
                            return

                task = asyncio.create_task(consume())
                await asyncio.wait_for(got_first.wait(), 10)
                await asyncio.to_thread(member.stop)
                await asyncio.to_thread(etcd.restart, member)
                async with Store(etcd.endpoints, prefix) as writer:  # writes the watcher never saw
                    await writer.put("w/b", b"2")
                    await writer.delete("w/a")
                    await writer.put("w/c", b"3")
                await asyncio.wait_for(task, 30)
            return seen

        seen = asyncio.run(main())
    assert seen == [("put", "w/a"), ("put", "w/b"), ("delete", "w/a"), ("put", "w/c")]


def test_requests_fail_over_to_the_next_endpoint(etcd_cluster3: EtcdCluster, prefix: str) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def main() -> None:
        async with Store([dead, *etcd_cluster3.endpoints], prefix, deadline=10) as s:
            await s.put("k", b"v")
            kv = await s.get("k")
            assert kv is not None and kv.value == b"v"
            assert s.errors >= 1 and s.endpoint != dead

    asyncio.run(main())


def test_unreachable_datastore_fails_fast_with_a_clear_error(prefix: str) -> None:
    async def main() -> None:
        async with Store([f"127.0.0.1:{free_port()}"], prefix, deadline=1.0, rpc_timeout=0.5) as s:
            await s.get("k")

    t = time.monotonic()
    with pytest.raises(DatastoreUnavailable, match="no etcd endpoint answered"):
        asyncio.run(main())
    assert time.monotonic() - t < 5


def test_lease_keepalive_and_expiry(etcd_endpoints: list[str], prefix: str) -> None:
    async def main() -> None:
        async with Store(etcd_endpoints, prefix) as s:
            lease = await s.grant_lease(2)
            await s.put("leased", b"x", lease=lease)
            ttls = []
            async for ttl in s.keep_alive(lease, 0.5):
                ttls.append(ttl)
                if len(ttls) == 6:  # ~2.5 s: past the TTL, kept alive
                    break
            assert all(t == 2 for t in ttls)
            assert await s.get("leased") is not None
            short = await s.grant_lease(1)
            await s.put("short", b"x", lease=short)
            await asyncio.sleep(2.5)
            assert await s.get("short") is None, "an unrefreshed lease expires"
            await s.revoke_lease(lease)
            assert await s.get("leased") is None

    asyncio.run(main())


def test_prefix_compare_and_txn_gets(etcd_endpoints: list[str], prefix: str) -> None:
    async def main() -> None:
        async with Store(etcd_endpoints, prefix) as s:
            rev = await s.put("p/a", b"1")
            r = await s.txn([Cmp.prefix_unchanged_since("p/", rev)], [Op.put("p/b", b"2")])
            assert r.succeeded
            r = await s.txn([Cmp.prefix_unchanged_since("p/", rev)], [Op.put("p/c", b"3")],
                            [Op.get("p/", prefix=True)])  # fmt: skip
            assert not r.succeeded
            assert [kv.key for kv in r.gets[0]] == ["p/a", "p/b"]

    asyncio.run(main())


def test_etcd_leader_change_words_are_retried_other_failures_are_not() -> None:
    """The classification alone (the leader-kill test drives it against real etcd):
    etcd's UNKNOWN for a request a leader change cut short is retried like UNAVAILABLE."""
    import grpc

    from ipam.store import transient

    def err(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)

    assert transient(err(grpc.StatusCode.UNAVAILABLE, "connection refused"))
    assert transient(err(grpc.StatusCode.UNKNOWN, "context deadline exceeded"))
    assert transient(err(grpc.StatusCode.UNKNOWN, "etcdserver: leader changed"))
    assert transient(err(grpc.StatusCode.UNKNOWN, "etcdserver: request timed out"))
    assert not transient(err(grpc.StatusCode.UNKNOWN, "something else"))
    assert not transient(err(grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: key is not provided"))
    assert not transient(err(grpc.StatusCode.PERMISSION_DENIED, "no leader"))


def test_a_watch_catching_up_on_more_than_4_mib_gets_every_event(prefix: str) -> None:
    """etcd sends a watcher that starts in the past every event since its revision in one
    response; over gRPC's default 4 MiB limit the stream failed and was re-created forever."""
    with EtcdCluster(size=1) as etcd:

        async def main() -> int:
            async with Store(etcd.endpoints, prefix) as s:
                first = await s.put("big/0", b"x" * 1_000_000)
                for i in range(1, 6):  # ~6 MB of history after ``first``
                    await s.put(f"big/{i}", b"x" * 1_000_000)
                seen = 0
                async for ev in s.watch("big/", first):
                    assert len(ev.kv.value) == 1_000_000
                    seen += 1
                    if seen == 6:
                        break
                return seen

        assert asyncio.run(asyncio.wait_for(main(), 30)) == 6
