"""RouteTable against the real kernel, in throwaway namespaces (trt + 4 hex digits).

Each namespace has a veth pair v0/v1 with 10.78.0.1/24 and fd78::1/112 on v0. What a flush
changes is observed with ``ip monitor route`` between two marker routes, so "only the
difference is written" is checked on the kernel's own change notifications.
"""

from __future__ import annotations

import asyncio
import errno
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import closing
from ipaddress import IPv4Network, ip_address, ip_network
from typing import Any, TypeVar

import pytest
from scratch_netns import VETH_PAIR, scratch_netns

from fabric.agent.status import RouteList
from fabric.dataplane.netlink import IPAddress, IPNetwork, KernelRoute, dump_routes
from fabric.dataplane.route_table import FlushResult, RouteTable
from lab import netns as labns

pytestmark = pytest.mark.root

PROTO = 201
N = ip_network
T = TypeVar("T")


def gw(*addrs: str) -> tuple[IPAddress, ...]:
    return tuple(ip_address(a) for a in addrs)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def until(cond: Callable[[], bool]) -> None:
    for _ in range(600):  # 30 s
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("trt", VETH_PAIR) as name:
        yield name


class Monitor:
    """``ip monitor route`` in the namespace; :meth:`changes` runs a step and returns the
    route notifications it caused (found between two marker routes of another protocol).
    """

    def __init__(self, ns: str) -> None:
        self.ns = ns
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["ip", "-n", ns, "monitor", "route"], stdout=subprocess.PIPE, text=True, bufsize=1
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.markers = 0

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _mark(self) -> int:
        self.markers += 1
        dst = f"10.78.{200 + self.markers}.0/24"
        labns.batch(self.ns, [f"route add {dst} dev v0 proto static"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for i, line in enumerate(self.lines):
                if line.startswith(dst.removesuffix(".0/24")):
                    return i
            time.sleep(0.01)
        raise AssertionError(f"ip monitor did not show {dst}: {self.lines}")

    def changes(self, step: Callable[[], object]) -> list[str]:
        start = self._mark()
        step()
        end = self._mark()
        # The kernel's own routes (an IPv6 link-local address's local route, which on a busy
        # machine can appear seconds after the veth came up) are not the step's doing.
        return [ln for ln in self.lines[start + 1 : end]
                if not ln.startswith(("\t", " ")) and "proto kernel" not in ln]  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()  # our own child, by its PID
        self.proc.wait(timeout=5)
        self.reader.join(timeout=5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def monitor(ns: str) -> Iterator[Monitor]:
    m = Monitor(ns)
    try:
        yield m
    finally:
        m.stop()


def many(n: int, base: int = 0x0A4E_4000) -> dict[IPNetwork, KernelRoute]:
    gws = gw("10.78.0.2")
    return {(dst := IPv4Network((base + i, 32))): KernelRoute(dst, gws) for i in range(n)}


def test_set_coalesces_and_flush_applies_every_shape(ns: str) -> None:
    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            ecmp = KernelRoute(N("10.78.1.0/24"), gw("10.78.0.2", "10.78.0.3"))
            for g in ("10.78.0.5", "10.78.0.6"):  # earlier values of the prefix are never written
                t.set(ecmp.dst, KernelRoute(ecmp.dst, gw(g)))
            t.set(ecmp.dst, ecmp)
            shapes = [
                ecmp,
                KernelRoute(N("10.78.2.0/26"), blackhole=True),
                KernelRoute(N("10.78.3.4/32"), dev="v1"),
                KernelRoute(N("fd78::1:0/112"), gw("fd78::2", "fd78::3")),
                KernelRoute(N("fd78::2:0/122"), blackhole=True),
                KernelRoute(N("fd78::3:4/128"), dev="v1"),
            ]
            for r in shapes[1:]:
                t.set(r.dst, r)
            res = await t.flush()
            assert (res.added, res.replaced, res.removed, res.failed) == (6, 0, 0, {})
            assert t.installed() == {r.dst: r for r in shapes}
            assert sorted(dump_routes(PROTO, netns=ns), key=str) == sorted(shapes, key=str)
            stats = t.stats()
            assert (stats.installed, stats.blackholes, stats.devices, stats.pending) == (6, 2, 2, 0)
            # a second flush has nothing to do
            res = await t.flush()
            assert (res.added, res.replaced, res.removed) == (0, 0, 0)
            # removals
            for r in shapes:
                t.set(r.dst, None)
            assert (await t.flush()).removed == 6
            assert dump_routes(PROTO, netns=ns) == [] and t.installed() == {}

    run(go())


def test_update_is_set_in_bulk(ns: str) -> None:
    """update() (the agent's path for a burst of RIB changes): adds, changes and removals in
    one call, the last value per prefix wins, a route at the wrong prefix is refused."""

    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            routes = many(300)
            t.update(routes.items())
            assert (await t.flush()).added == 300
            first, *rest = routes
            moved = KernelRoute(first, gw("10.78.0.3"))
            t.update([(first, KernelRoute(first, gw("10.78.0.9"))), (first, moved)])
            t.update((dst, None) for dst in rest[:100])
            res = await t.flush()
            assert (res.added, res.replaced, res.removed) == (0, 1, 100)
            assert set(dump_routes(PROTO, netns=ns)) == {moved, *(routes[d] for d in rest[100:])}
            with pytest.raises(ValueError, match="set at"):
                t.update([(N("10.78.9.0/24"), moved)])

    run(go())


def test_status_route_list_waits_for_a_burst_to_settle(ns: str) -> None:
    """fabricd's status document lists installed routes; it is not rebuilt while a burst is
    pending (that CPU belongs to the burst), and is once the table settles."""

    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            pub = RouteList(t)
            assert pub.items() == []
            routes = many(5)
            t.update(routes.items())
            await t.flush()
            listed = pub.items()
            assert [i["dst"] for i in listed] == sorted(str(d) for d in routes)
            t.update((dst, None) for dst in list(routes)[:2])  # pending: a burst goes on
            assert pub.items() is listed
            await t.flush()  # written, nothing pending, and no run() burst timer
            assert len(pub.items()) == 3

    run(go())


def test_status_route_list_waits_for_the_table_to_hold_still(ns: str) -> None:
    """With ``settle`` (the publisher's interval), the list is rebuilt only once the table
    went that long without a change: a flush within the wait starts it again. The learned
    list is rebuilt with it, read from the live mapping it is given."""

    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            best: dict[IPNetwork, frozenset[Any]] = {}
            pub = RouteList(t, best=lambda: best, settle=1.0)
            assert pub.items() == [] and pub.learned()["count"] == 0
            routes = many(4)
            t.update(routes.items())
            best.update((d, frozenset(r.gateways)) for d, r in routes.items())
            await t.flush()
            empty = pub.items()
            assert empty == []  # just changed: the old list stays
            await asyncio.sleep(0.5)
            first = next(iter(routes))
            t.set(first, None)
            del best[first]
            await t.flush()  # a change 0.5 s in: the wait starts over
            await asyncio.sleep(0.3)
            assert pub.items() is empty
            await asyncio.sleep(0.8)
            listed = pub.items()
            assert [i["dst"] for i in listed] == sorted(str(d) for d in list(routes)[1:])
            assert pub.learned()["count"] == 3
            assert [i["dst"] for i in pub.learned()["items"]] == [i["dst"] for i in listed]
            assert pub.items() is listed  # nothing changed since: not rebuilt

    run(go())


def test_status_learned_list_follows_routes_the_kernel_already_had(ns: str) -> None:
    """fabricd restarted over its routes (SIGTERM leaves them): the new RouteTable adopts
    them at its first dump, and the RIB learning them again changes nothing in the kernel.
    The learned list must still show them (``fabricctl explain`` reads it)."""

    async def go() -> None:
        routes = many(3)
        with closing(RouteTable(PROTO, netns=ns)) as before:
            before.update(routes.items())
            await before.flush()
        with closing(RouteTable(PROTO, netns=ns)) as t:
            best: dict[IPNetwork, frozenset[Any]] = {}
            pub = RouteList(t, best=lambda: best)
            t.replace_all({})  # the start-up resync: dump, adopt what is ours
            t.update(routes.items())
            await t.flush()
            assert pub.items() and pub.learned()["count"] == 0
            generation = t.generation
            best.update((d, frozenset(r.gateways)) for d, r in routes.items())
            t.update(routes.items())  # the RIB learned them: the same routes again
            await t.flush()
            assert t.generation == generation  # nothing written to the kernel
            pub.items()  # as the publisher reads them: the list, then the learned section
            assert pub.learned()["count"] == 3
            assert [i["dst"] for i in pub.learned()["items"]] == sorted(str(d) for d in routes)

    run(go())


def test_status_route_list_order_is_family_address_length() -> None:
    """IPv4 before IPv6, then by address, then by prefix length, as the document always
    listed them (the key reads ipaddress's slots, for plain and interned prefixes)."""
    from bgp.interned import prefix
    from fabric.agent.status import learned_section

    nets = [N("fd00::/64"), prefix("10.1.0.0/24"), N("10.1.0.0/16"), prefix("9.0.0.0/8"),
            N("10.0.255.255/32"), prefix("fc00::/7")]  # fmt: skip
    got = [i["dst"] for i in learned_section(dict.fromkeys(nets, frozenset()))["items"]]
    assert got == ["9.0.0.0/8", "10.0.255.255/32", "10.1.0.0/16", "10.1.0.0/24",
                   "fc00::/7", "fd00::/64"]  # fmt: skip


def test_replace_all_writes_only_the_difference(ns: str, monitor: Monitor) -> None:
    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            desired = many(3000)
            t.replace_all(desired)
            assert (await t.flush()).added == 3000
            keys = list(desired)
            changed = dict(desired)
            changed[keys[10]] = KernelRoute(keys[10], gw("10.78.0.9"))  # replaced
            del changed[keys[20]]  # removed
            new = N("10.78.99.0/24")
            changed[new] = KernelRoute(new, blackhole=True)  # added
            t.replace_all(changed)
            result: dict[str, FlushResult] = {}

            def flush() -> None:
                result["r"] = asyncio.run_coroutine_threadsafe(t.flush(), loop).result()

            loop = asyncio.get_running_loop()
            lines = await asyncio.to_thread(monitor.changes, flush)
            r = result["r"]
            assert (r.added, r.replaced, r.removed, r.failed) == (1, 1, 1, {})
            assert len(lines) == 3, lines
            assert any(
                ln.startswith("Deleted") and str(keys[20].network_address) in ln for ln in lines
            )
            assert sorted(dump_routes(PROTO, netns=ns), key=str) == sorted(
                changed.values(), key=str
            )

    run(go())


def test_adopt_then_resync_changes_nothing(ns: str, monitor: Monitor) -> None:
    routes = many(500)
    labns.batch(ns, [f"route add {d} via 10.78.0.2 proto {PROTO}" for d in routes])
    labns.batch(ns, ["route add fd78::5:0/112 proto 201 nexthop via fd78::2 nexthop via fd78::3"])
    routes[N("fd78::5:0/112")] = KernelRoute(N("fd78::5:0/112"), gw("fd78::3", "fd78::2"))

    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            assert await t.adopt() == 501
            assert t.installed() == routes
            # adopting deletes nothing, and set() on other prefixes leaves the adopted ones alone
            extra = KernelRoute(N("10.78.9.0/24"), gw("10.78.0.2"))
            t.set(extra.dst, extra)
            assert (await t.flush()).added == 1
            assert len(dump_routes(PROTO, netns=ns)) == 502
            t.replace_all({**routes, extra.dst: extra})
            loop = asyncio.get_running_loop()
            out: dict[str, FlushResult] = {}

            def flush() -> None:
                out["r"] = asyncio.run_coroutine_threadsafe(t.flush(), loop).result()

            assert await asyncio.to_thread(monitor.changes, flush) == []
            assert (out["r"].added, out["r"].replaced, out["r"].removed) == (0, 0, 0)

    run(go())


def test_other_protocols_are_never_touched(ns: str) -> None:
    labns.batch(ns, [
        "route add 10.78.7.0/24 via 10.78.0.7 proto static",
        "route add 10.78.8.0/24 via 10.78.0.8 metric 30 proto static",
        "route add fd78::7:0/112 via fd78::7 proto static",
    ])  # fmt: skip
    before = subprocess.run(
        ["ip", "-n", ns, "route"], capture_output=True, text=True, check=True
    ).stdout

    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            await t.adopt()
            wanted = {
                N("10.78.7.0/24"): KernelRoute(N("10.78.7.0/24"), gw("10.78.0.2")),
                N("10.78.8.0/24"): KernelRoute(N("10.78.8.0/24"), gw("10.78.0.2")),  # other metric
                N("fd78::7:0/112"): KernelRoute(N("fd78::7:0/112"), gw("fd78::2")),
                N("10.78.9.0/24"): KernelRoute(N("10.78.9.0/24"), gw("10.78.0.2")),
            }
            t.replace_all(wanted)
            r = await t.flush()
            assert r.added == 1
            assert r.errnos == dict.fromkeys(list(wanted)[:3], errno.EEXIST)
            assert "protocol 4" in r.failed[N("10.78.7.0/24")]
            assert t.pending() == set(list(wanted)[:3]) and t.stats().conflicts == 3
            # an empty desired table deletes ours only
            t.replace_all({})
            assert (await t.flush()).removed == 1

    run(go())
    after = subprocess.run(
        ["ip", "-n", ns, "route"], capture_output=True, text=True, check=True
    ).stdout
    assert after == before
    assert (
        "fd78::7:0/112 via fd78::7"
        in subprocess.run(
            ["ip", "-n", ns, "-6", "route"], capture_output=True, text=True, check=True
        ).stdout
    )


def test_unknown_route_at_prefix_is_looked_up_not_clobbered(ns: str) -> None:
    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            await t.adopt()
            # appears after the dump: one of ours (replaced) and a foreign one (reported)
            labns.batch(ns, [
                f"route add 10.78.5.0/24 via 10.78.0.5 proto {PROTO}",
                "route add 10.78.6.0/24 via 10.78.0.6 proto static",
            ])  # fmt: skip
            a = KernelRoute(N("10.78.5.0/24"), gw("10.78.0.2"))
            b = KernelRoute(N("10.78.6.0/24"), gw("10.78.0.2"))
            t.set(a.dst, a)
            t.set(b.dst, b)
            r = await t.flush()
            assert (r.added, r.replaced) == (0, 1)
            assert r.errnos == {b.dst: errno.EEXIST}
            assert dump_routes(PROTO, netns=ns) == [a]

    run(go())
    assert (
        "10.78.6.0/24 via 10.78.0.6 dev v0 proto static"
        in subprocess.run(
            ["ip", "-n", ns, "route"], capture_output=True, text=True, check=True
        ).stdout
    )


def test_unreachable_gateway_fails_then_is_retried(ns: str) -> None:
    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            r4 = KernelRoute(N("10.78.10.0/24"), gw("10.78.1.2"))
            r6 = KernelRoute(N("fd78::10:0/112"), gw("fd78::1:2"))
            dev = KernelRoute(N("10.78.11.5/32"), dev="v2")  # the veth is created later
            ok = KernelRoute(N("10.78.12.0/24"), gw("10.78.0.2"))
            for r in (r4, r6, dev, ok):
                t.set(r.dst, r)
            res = await t.flush()
            assert res.added == 1
            assert res.errnos == {
                r4.dst: errno.ENETUNREACH,
                r6.dst: errno.EHOSTUNREACH,  # IPv6 says it differently
                dev.dst: errno.ENODEV,
            }
            assert t.pending() == {r4.dst, r6.dst, dev.dst} and t.stats().failed == 3
            assert t.stats().failed_total == 3
            assert (await t.flush()).errnos.keys() == {r4.dst, r6.dst, dev.dst}  # still failing
            labns.batch(ns, [
                "addr add 10.78.1.1/24 dev v0",
                "addr add fd78::1:1/112 dev v0 nodad",
                "link add v2 type veth peer name v3",
                "link set v2 up",
                "link set v3 up",
            ])  # fmt: skip
            res = await t.flush()
            assert (res.added, res.failed) == (3, {})
            assert len(dump_routes(PROTO, netns=ns)) == 4 and not t.pending()

    run(go())


def test_removing_missing_routes_is_fine_and_resync_repairs(ns: str) -> None:
    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            desired = many(10)
            t.replace_all(desired)
            await t.flush()
            keys = list(desired)
            # behind our back: one deleted, one changed
            labns.batch(ns, [
                f"route del {keys[0]} proto {PROTO}",
                f"route replace {keys[1]} via 10.78.0.77 proto {PROTO}",
                f"route del {keys[2]} proto {PROTO}",
            ])  # fmt: skip
            t.set(N("10.78.50.0/24"), None)  # never installed: nothing to do
            t.set(keys[2], None)  # already gone: ESRCH counts as removed
            r = await t.flush()
            assert (r.removed, r.failed) == (1, {})
            del desired[keys[2]]
            t.replace_all(desired)  # re-dumps: the deleted and the changed one are repaired
            r = await t.flush()
            assert (r.added, r.replaced, r.removed) == (1, 1, 0)
            assert sorted(dump_routes(PROTO, netns=ns), key=str) == sorted(
                desired.values(), key=str
            )

    run(go())


def test_metric_change_and_strays(ns: str) -> None:
    dst = N("10.78.13.0/24")
    labns.batch(ns, [
        f"route add {dst} via 10.78.0.2 metric 10 proto {PROTO}",
        f"route add {dst} via 10.78.0.3 metric 20 proto {PROTO}",  # a stray of ours
    ])  # fmt: skip

    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            assert await t.adopt() == 1
            assert t.installed()[dst].metric == 10  # the one in use
            want = KernelRoute(dst, gw("10.78.0.4"), metric=30)
            t.replace_all({dst: want})
            r = await t.flush()
            assert (r.added, r.replaced, r.removed) == (0, 1, 0)
            assert dump_routes(PROTO, netns=ns) == [want]  # old metric and stray both gone

    run(go())


def test_run_coalesces_a_burst_and_retries(ns: str) -> None:
    async def go() -> None:
        with closing(RouteTable(PROTO, netns=ns)) as t:
            task = asyncio.create_task(t.run())
            routes = many(20000)
            for i, (dst, r) in enumerate(routes.items()):  # a burst over ~100 loop turns
                t.set(dst, r)
                if i % 200 == 0:
                    await asyncio.sleep(0)
            late = KernelRoute(N("10.78.14.0/24"), gw("10.78.2.2"))
            t.set(late.dst, late)
            await until(lambda: t.stats().installed == 20000)
            stats = t.stats()
            assert stats.installed == 20000 and stats.failed == 1
            assert stats.flushes <= 10, stats  # batches, not one flush per update
            labns.batch(ns, ["addr add 10.78.2.1/24 dev v0"])
            await until(lambda: late.dst in t.installed())  # a retry (with backoff) picks it up
            assert t.installed()[late.dst] == late
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert len(dump_routes(PROTO, netns=ns)) == 20001

    run(go())


def test_missing_netns_is_a_netlink_error_and_gc_stays_on() -> None:
    import gc

    from fabric.dataplane.netlink import NetlinkError

    async def go() -> None:
        with closing(RouteTable(PROTO, netns="trt-no-such-netns")) as t:
            with pytest.raises(NetlinkError) as info:
                await t.adopt()
            assert info.value.errno == errno.ENOENT
            t.set(N("10.78.1.0/24"), KernelRoute(N("10.78.1.0/24"), blackhole=True))
            with pytest.raises(NetlinkError):
                await t.flush()
            assert t.pending() == {N("10.78.1.0/24")}

    assert gc.isenabled()
    run(go())
    assert gc.isenabled()
