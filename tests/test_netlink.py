"""fabric.dataplane.netlink against the real kernel, in throwaway namespaces (trt + 4 hex digits).

Each namespace has a veth pair v0/v1 with 10.78.0.1/24 and fd78::1/112 on v0, so gateways
10.78.0.x and fd78::x are reachable. Routes are cross-checked with iproute2's JSON output.
The codec round trip (encode -> decode) needs no root.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import closing
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scratch_netns import VETH_PAIR, scratch_netns

from bgp.interned import Prefix4
from fabric.dataplane import netlink
from fabric.dataplane.netlink import (
    IPAddress,
    KernelRoute,
    NetlinkError,
    RouteOp,
    dump_routes,
    write_routes,
)
from fabric.dataplane.netlink.core import _Interrupted
from fabric.dataplane.netlink.routes import (
    _wanted,
    encode_route,
    encode_route_general,
    encode_v4_deletes,
)
from lab import netns as labns

PROTO = 201
N = ip_network
A = ip_address


@pytest.fixture
def ns() -> Iterator[str]:
    with scratch_netns("tnk", VETH_PAIR) as name:
        yield name


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-j", "-n", ns, *args], check=True, capture_output=True, text=True
    ).stdout
    result: list[dict[str, Any]] = json.loads(out or "[]")
    return result


def gw(*addrs: str) -> tuple[IPAddress, ...]:
    return tuple(A(a) for a in addrs)


SHAPES = [
    KernelRoute(N("10.78.1.0/24"), (A("10.78.0.2"),)),
    KernelRoute(N("10.78.2.0/24"), (A("10.78.0.3"), A("10.78.0.2"))),  # ECMP, given unsorted
    KernelRoute(N("10.78.3.0/26"), blackhole=True),
    KernelRoute(N("10.78.4.5/32"), dev="v1"),
    KernelRoute(N("10.78.5.0/24"), (A("10.78.0.2"),), metric=50),
    KernelRoute(N("fd78::1:0/112"), (A("fd78::2"),)),
    KernelRoute(N("fd78::2:0/112"), (A("fd78::2"), A("fd78::3"), A("fd78::4"))),
    KernelRoute(N("fd78::3:0/122"), blackhole=True),
    KernelRoute(N("fd78::4:5/128"), dev="v1"),
]


# ---------------------------------------------------------------- codec (no root)

addresses_v4 = st.integers(0, 2**32 - 1).map(IPv4Address)
prefixes_v4 = st.builds(
    lambda a, n: IPv4Network((int(a), n), strict=False), addresses_v4, st.integers(0, 32)
)
prefixes_v6 = st.builds(
    lambda a, n: IPv6Network((a, n), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)


@st.composite
def routes(draw: st.DrawFn) -> KernelRoute:
    dst = draw(st.one_of(prefixes_v4, prefixes_v6))
    kind = draw(st.sampled_from(["gw", "blackhole", "dev"]))
    metric = draw(st.integers(0, 2**32 - 1))
    if kind == "blackhole":
        return KernelRoute(dst, blackhole=True, metric=metric)
    if kind == "dev":
        return KernelRoute(dst, dev=draw(st.sampled_from(["v1", "fab0123abcd"])), metric=metric)
    make: type[IPAddress] = IPv4Address if dst.version == 4 else IPv6Address
    bits = 32 if dst.version == 4 else 128
    ints = draw(st.lists(st.integers(1, 2**bits - 1), min_size=1, max_size=8))
    return KernelRoute(dst, tuple(make(i) for i in ints), metric=metric)


@given(routes(), st.integers(1, 255), st.sampled_from([254, 100, 1000, 2**32 - 1]))
def test_codec_round_trip(route: KernelRoute, proto: int, table: int) -> None:
    indexes = {"v1": 7, "fab0123abcd": 4242}
    names = {i: n for n, i in indexes.items()}
    msg = netlink.encode_route(RouteOp(route), 9, proto, table, indexes)
    decoded = netlink.decode_route(memoryview(msg), names)
    assert decoded == netlink.DumpedRoute(proto, route)
    assert _wanted(memoryview(msg), table, proto)
    assert not _wanted(memoryview(msg), table + 1 if table < 2**32 - 1 else 1, proto)


def test_kernel_route_contract() -> None:
    r = KernelRoute(N("10.78.2.0/24"), (A("10.78.0.3"), A("10.78.0.2"), A("10.78.0.3")))
    assert r.gateways == (A("10.78.0.2"), A("10.78.0.3"))  # sorted, no duplicates
    assert KernelRoute(N("fd78::/112"), blackhole=True).metric == 1024  # as the kernel stores it
    with pytest.raises(ValueError, match="exactly one"):
        KernelRoute(N("10.78.2.0/24"))
    with pytest.raises(ValueError, match="exactly one"):
        KernelRoute(N("10.78.2.0/24"), (A("10.78.0.3"),), blackhole=True)
    with pytest.raises(ValueError, match="another address family"):
        KernelRoute(N("10.78.2.0/24"), (A("fd78::1"),))
    with pytest.raises(ValueError, match="metric"):
        KernelRoute(N("10.78.2.0/24"), blackhole=True, metric=-1)


def test_rt_proto_name_file(tmp_path: Path) -> None:
    d = tmp_path / "rt_protos.d"
    assert netlink.ensure_rt_proto_name(201, "fabric", d)
    assert (d / "fabric.conf").read_text().splitlines()[-1] == "201 fabric"
    mtime = (d / "fabric.conf").stat().st_mtime_ns
    assert not netlink.ensure_rt_proto_name(201, "fabric", d)  # idempotent: not rewritten
    assert (d / "fabric.conf").stat().st_mtime_ns == mtime
    assert netlink.ensure_rt_proto_name(202, "fabric", d)  # a changed number is rewritten
    assert (d / "fabric.conf").read_text().splitlines()[-1] == "202 fabric"
    assert sorted(p.name for p in d.iterdir()) == ["fabric.conf"]
    for number, name in ((0, "fabric"), (256, "fabric"), (201, "two words"), (201, "")):
        with pytest.raises(ValueError):
            netlink.ensure_rt_proto_name(number, name, d)


# ---------------------------------------------------------------- kernel


@pytest.mark.root
def test_write_and_dump_every_shape(ns: str) -> None:
    assert write_routes([RouteOp(r) for r in SHAPES], PROTO, netns=ns) == {}
    assert sorted(dump_routes(PROTO, netns=ns), key=str) == sorted(SHAPES, key=str)
    # iproute2 agrees on what the kernel holds
    v4 = {r["dst"]: r for r in ip_json(ns, "route", "show", "proto", str(PROTO))}
    assert {h["gateway"] for h in v4["10.78.2.0/24"]["nexthops"]} == {"10.78.0.2", "10.78.0.3"}
    assert v4["10.78.3.0/26"]["type"] == "blackhole"
    assert v4["10.78.4.5"]["dev"] == "v1" and v4["10.78.4.5"]["scope"] == "link"
    assert v4["10.78.5.0/24"]["metric"] == 50
    v6 = {r["dst"]: r for r in ip_json(ns, "-6", "route", "show", "proto", str(PROTO))}
    assert len(v6["fd78::2:0/112"]["nexthops"]) == 3
    assert v6["fd78::3:0/122"]["type"] == "blackhole"
    assert v6["fd78::4:5"]["dev"] == "v1"
    # routes of other protocols are not ours
    assert all(r.dst != N("10.78.0.0/24") for r in dump_routes(PROTO, netns=ns))


@pytest.mark.root
def test_replace_changes_shape_in_place(ns: str) -> None:
    dst4, dst6 = N("10.78.9.0/24"), N("fd78::9:0/112")
    for gws4, gws6 in [
        (("10.78.0.2",), ("fd78::2",)),
        (("10.78.0.2", "10.78.0.3"), ("fd78::2", "fd78::3")),  # single -> ECMP
        (("10.78.0.4",), ("fd78::4",)),  # ECMP -> single
    ]:
        want = [KernelRoute(dst4, gw(*gws4)), KernelRoute(dst6, gw(*gws6))]
        assert write_routes([RouteOp(r) for r in want], PROTO, netns=ns) == {}
        assert sorted(dump_routes(PROTO, netns=ns), key=str) == sorted(want, key=str)
    bh = [KernelRoute(dst4, blackhole=True), KernelRoute(dst6, blackhole=True)]
    assert write_routes([RouteOp(r) for r in bh], PROTO, netns=ns) == {}
    assert sorted(dump_routes(PROTO, netns=ns), key=str) == sorted(bh, key=str)


@pytest.mark.root
def test_per_route_errors_by_index_across_batches(ns: str) -> None:
    good = [KernelRoute(IPv4Network((0x0A4E_1000 + i, 32)), gw("10.78.0.2")) for i in range(2500)]
    ops = [RouteOp(r) for r in good]
    ops.insert(1500, RouteOp(KernelRoute(N("10.78.200.0/24"), gw("10.99.0.1"))))  # unreachable
    ops.insert(10, RouteOp(KernelRoute(N("10.78.201.0/24"), dev="nosuchdev")))
    ops.insert(2200, RouteOp(KernelRoute(N("10.78.202.0/24"), gw("10.78.0.9")), delete=True))
    errors = write_routes(ops, PROTO, netns=ns, batch=1000)
    assert set(errors) == {10, 1501}
    assert errors[1501].errno == errno.ENETUNREACH
    assert "gateway" in errors[1501].message  # the kernel's extended-ack text
    assert errors[10].errno == errno.ENODEV
    installed = dump_routes(PROTO, netns=ns)
    assert len(installed) == 2500 and set(installed) == set(good)
    # the same again with EXCL: each one already there is refused, nothing changes
    again = write_routes([RouteOp(r, exclusive=True) for r in good[:5]], PROTO, netns=ns)
    assert {i: e.errno for i, e in again.items()} == dict.fromkeys(range(5), errno.EEXIST)
    assert write_routes([RouteOp(r, delete=True) for r in good], PROTO, netns=ns) == {}
    assert dump_routes(PROTO, netns=ns) == []


@pytest.mark.root
def test_device_routes_written_while_links_churn(ns: str) -> None:
    """Pods starting beside a route write (a CNI ADD storm) make link dumps come back
    interrupted; resolving the devices by name must not fail because of it."""
    standing = "".join(f"link add s{i} type veth peer name t{i}\n" for i in range(150))
    subprocess.run(["ip", "-n", ns, "-batch", "-"], input=standing, text=True, check=True)
    stop, rounds = threading.Event(), []

    def churn(k: int) -> None:
        script = "".join(f"link add c{k}x{i} type veth peer name d{k}x{i}\nlink del c{k}x{i}\n"
                         for i in range(100))  # fmt: skip
        while not stop.is_set():
            done = subprocess.run(["ip", "-n", ns, "-batch", "-"], input=script, text=True,
                                  capture_output=True, check=False)  # fmt: skip
            rounds.append(done.returncode)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        with closing(netlink.RouteSocket(ns)) as sock:
            assert sock.indexes_of(["v1", "nosuchdev", "v1"]).keys() == {"v1"}
            for i in range(500):
                dst = IPv4Network((0x0A4E_0400 + i, 32))
                assert sock.write([RouteOp(KernelRoute(dst, dev="v1"))], PROTO) == {}
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert rounds and set(rounds) == {0}  # links really came and went meanwhile
    assert len(dump_routes(PROTO, netns=ns)) == 500


@pytest.mark.root
def test_a_route_write_never_depends_on_a_link_dump(ns: str) -> None:
    """However often the kernel flags link dumps interrupted, device routes are written."""

    class AlwaysInterrupted(netlink.RouteSocket):
        def _link_indexes(self) -> dict[str, int]:
            raise _Interrupted

    with closing(AlwaysInterrupted(ns)) as sock:
        with pytest.raises(NetlinkError, match="interrupted"):
            sock.link_indexes()
        assert sock.write([RouteOp(KernelRoute(N("10.78.4.9/32"), dev="v1"))], PROTO) == {}
    assert dump_routes(PROTO, netns=ns) == [KernelRoute(N("10.78.4.9/32"), dev="v1")]


@pytest.mark.root
def test_delete_and_replace_never_touch_other_protocols(ns: str) -> None:
    labns.batch(ns, [
        "route add 10.78.7.0/24 via 10.78.0.7 proto static",
        "route add fd78::7:0/112 via fd78::7 proto static",
    ])  # fmt: skip
    mine = [
        KernelRoute(N("10.78.7.0/24"), gw("10.78.0.2")),
        KernelRoute(N("fd78::7:0/112"), gw("fd78::2")),
    ]
    assert write_routes([RouteOp(r, delete=True) for r in mine], PROTO, netns=ns) == {}
    errors = write_routes([RouteOp(r, exclusive=True) for r in mine], PROTO, netns=ns)
    assert [e.errno for e in errors.values()] == [errno.EEXIST, errno.EEXIST]
    assert dump_routes(PROTO, netns=ns) == []
    static = {r["dst"]: r for r in ip_json(ns, "route", "show", "proto", "static")}
    assert static["10.78.7.0/24"]["gateway"] == "10.78.0.7"
    assert ip_json(ns, "-6", "route", "show", "proto", "static")[0]["gateway"] == "fd78::7"


@pytest.mark.root
def test_tables_above_255_and_main_kept_apart(ns: str) -> None:
    r = KernelRoute(N("10.78.8.0/24"), gw("10.78.0.2"))
    r6 = KernelRoute(N("fd78::8:0/112"), blackhole=True)
    assert write_routes([RouteOp(r), RouteOp(r6)], PROTO, table=1000, netns=ns) == {}
    assert sorted(dump_routes(PROTO, table=1000, netns=ns), key=str) == sorted([r, r6], key=str)
    assert dump_routes(PROTO, netns=ns) == []
    assert ip_json(ns, "route", "show", "table", "1000")[0]["dst"] == "10.78.8.0/24"


@pytest.mark.root
def test_socket_is_in_the_netns_and_the_caller_stays_put(ns: str) -> None:
    before = os.readlink("/proc/thread-self/ns/net")
    with closing(netlink.RouteSocket(ns)) as sock:
        assert {d.route.dst for d in sock.dump()} >= {N("10.78.0.0/24"), N("fd78::/112")}
    assert os.readlink("/proc/thread-self/ns/net") == before
    assert netlink.link_indexes(ns).keys() == {"lo", "v0", "v1"}
    with pytest.raises(NetlinkError) as info:
        netlink.RouteSocket(ns + "-missing")
    assert info.value.errno == errno.ENOENT


@pytest.mark.root
def test_iproute_helper_is_bound_to_the_netns(ns: str) -> None:
    """The pyroute2 entry point later link/address functions build on."""
    with netlink.iproute(ns) as ipr:
        names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    assert names == {"lo", "v0", "v1"}


def _here() -> str:
    return os.readlink("/proc/thread-self/ns/net")


@pytest.mark.root
def test_in_netns_runs_on_the_calling_thread_and_comes_back(ns: str) -> None:
    home, me = _here(), threading.get_ident()
    inside = netlink.in_netns(ns, lambda: (_here(), threading.get_ident()))
    assert inside == (f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]", me)
    assert _here() == home
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert netlink.in_netns(fd, _here) == inside[0]
    finally:
        os.close(fd)
    assert _here() == home


@pytest.mark.root
def test_in_netns_comes_back_when_the_function_raises(ns: str) -> None:
    home = _here()

    def fail() -> None:
        assert _here() != home
        raise KeyError("boom")

    with pytest.raises(KeyError):
        netlink.in_netns(ns, fail)
    assert _here() == home
    with pytest.raises(KeyboardInterrupt):  # not only Exception: any BaseException
        netlink.in_netns(ns, lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert _here() == home


@pytest.mark.root
def test_in_netns_refused_runs_nothing_and_stays_home(tmp_path: Path) -> None:
    home, ran = _here(), []
    (tmp_path / "plain").write_text("")
    fd = os.open(tmp_path / "plain", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(OSError) as info:
            netlink.in_netns(fd, lambda: ran.append(1))
    finally:
        os.close(fd)
    assert info.value.errno == errno.EINVAL and not ran and _here() == home


ROUTE_SHAPES = [
    KernelRoute(ip_network("10.1.2.3/32"), (ip_address("10.0.0.1"),)),
    KernelRoute(ip_network("10.1.2.0/24"), (ip_address("10.0.0.1"),), metric=7),
    KernelRoute(ip_network("10.1.2.0/24"), (ip_address("10.0.0.1"), ip_address("10.0.0.2"))),
    KernelRoute(ip_network("10.1.2.0/24"), blackhole=True),
    KernelRoute(ip_network("10.1.2.9/32"), dev="eth0"),
    KernelRoute(ip_network("fd00:1::/64"), (ip_address("fd00::1"),)),
]


@pytest.mark.parametrize("route", ROUTE_SHAPES, ids=str)
@pytest.mark.parametrize("table", [254, 1000])
def test_fast_encoding_is_byte_for_byte_the_general_one(route: KernelRoute, table: int) -> None:
    """encode_route packs an IPv4 route via one gateway, or any IPv4 delete, in one struct;
    every other shape goes attribute by attribute. Both give the same message."""
    for op in (RouteOp(route), RouteOp(route, delete=True), RouteOp(route, exclusive=True)):
        for ack in (True, False):
            want = encode_route_general(op, 7, 201, table, {"eth0": 3}, ack)
            assert encode_route(op, 7, 201, table, {"eth0": 3}, ack) == want


@pytest.mark.parametrize("table", [254, 1000])
def test_v4_deletes_in_one_go_are_byte_for_byte_one_by_one(table: int) -> None:
    """A batch of IPv4 deletes (any shape, metric, plain or interned prefix) encoded at
    once gives the messages of encode_route, an ack asked only on the last; anything else
    in the batch, or sequence numbers that would wrap, leave it to encode_route."""
    v4 = [r for r in ROUTE_SHAPES if r.dst.version == 4]
    v4.append(KernelRoute(Prefix4.of(0x0A64_0102, 32), (ip_address("10.0.0.1"),), metric=2**32 - 1))
    v4.append(KernelRoute(ip_network("0.0.0.0/0"), blackhole=True))
    ops = [RouteOp(r, delete=True) for r in v4]
    for seq in (1, 7, 0x7FFFFFFF - len(ops) + 1):
        want = b"".join(
            encode_route(op, seq + i, 201, table, {}, i == len(ops) - 1) for i, op in enumerate(ops)
        )
        assert encode_v4_deletes(ops, seq, 201, table) == want
    assert encode_v4_deletes(ops, 0x7FFFFFFF - len(ops) + 2, 201, table) is None  # would wrap
    assert encode_v4_deletes([*ops, RouteOp(v4[0])], 7, 201, table) is None  # an add
    v6 = RouteOp(ROUTE_SHAPES[-1], delete=True)
    assert encode_v4_deletes([*ops, v6], 7, 201, table) is None
    assert encode_v4_deletes([], 7, 201, table) is None


@pytest.mark.parametrize("route", ROUTE_SHAPES, ids=str)
def test_kernel_route_via_equals_the_constructor(route: KernelRoute) -> None:
    if not route.gateways:
        return
    via, want = KernelRoute.via(route.dst, route.gateways), KernelRoute(route.dst, route.gateways)
    assert via == want and hash(via) == hash(want) and via.metric == want.metric
    with pytest.raises(ValueError, match="another address family"):
        KernelRoute.via(ip_network("10.9.0.0/24"), (ip_address("fd00::1"),))
