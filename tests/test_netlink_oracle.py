"""pyroute2 as the oracle of fabric's hand-written rtnetlink codec (docs/adr/0002-netlink.md).

Two directions:
- every message the encoders produce (routes, links, addresses, pod routes, deletes) is parsed
  by pyroute2 0.9.7's own message classes, and what pyroute2 reads is what was meant; for
  routes, fabric's decoder and pyroute2 agree on the same bytes (property tests, no root);
- fabric's decoding of real kernel dumps (routes, links, addresses; v4 and v6, ECMP,
  blackholes, device routes, metrics) equals pyroute2's decoding of the very same dump bytes,
  and equals what pyroute2's own IPRoute dump reports (root, a throwaway netns ``tor`` + 4 hex
  digits; addresses 10.77.0.0/16 and fd77::/32 only).

Conversions from pyroute2's parsed form to fabric's types are in ``pr_*`` below: they only
rename fields, the parsing is pyroute2's.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from contextlib import closing
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
    ip_address,
    ip_interface,
    ip_network,
)
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg
from scratch_netns import scratch_netns

from fabric.dataplane.netlink import links
from fabric.dataplane.netlink.core import (
    _HDR,
    _IFINFO,
    RTM_GETLINK,
    RTM_NEWLINK,
    NetlinkSocket,
    iproute,
)
from fabric.dataplane.netlink.routes import (
    RTM_GETROUTE,
    RTM_NEWROUTE,
    RTN_BLACKHOLE,
    RTN_UNICAST,
    DumpedRoute,
    IPAddress,
    IPNetwork,
    KernelRoute,
    RouteOp,
    decode_route,
    encode_route,
)

PROTO = 201

# ---------------------------------------------------------------- pyroute2's view, renamed


def pr_parse(cls: Any, data: bytes) -> Any:
    msg = cls(data)
    msg.decode()
    return msg


def pr_gateways(msg: Any) -> list[IPAddress]:
    if (gw := msg.get_attr("RTA_GATEWAY")) is not None:
        return [ip_address(gw)]
    return [ip_address(h.get_attr("RTA_GATEWAY")) for h in msg.get_attr("RTA_MULTIPATH") or ()
            if h.get_attr("RTA_GATEWAY") is not None]  # fmt: skip


def pr_route(msg: Any, names: Mapping[int, str]) -> DumpedRoute | None:
    """pyroute2's parse of one RTM_NEWROUTE in fabric's model (same scope: unicast and
    blackhole routes without source prefix or TOS)."""
    if msg["src_len"] or msg["tos"] or msg["type"] not in (RTN_UNICAST, RTN_BLACKHOLE):
        return None
    net = IPv4Network if msg["family"] == socket.AF_INET else IPv6Network
    dst = net((msg.get_attr("RTA_DST") or ("0.0.0.0" if net is IPv4Network else "::"),
               msg["dst_len"]))  # fmt: skip
    metric = msg.get_attr("RTA_PRIORITY") or 0
    if msg["type"] == RTN_BLACKHOLE:
        return DumpedRoute(msg["proto"], KernelRoute(dst, blackhole=True, metric=metric))
    if gws := pr_gateways(msg):
        return DumpedRoute(msg["proto"], KernelRoute(dst, tuple(gws), metric=metric))
    oif = msg.get_attr("RTA_OIF")
    if oif is None:
        return None
    return DumpedRoute(msg["proto"], KernelRoute(dst, dev=names.get(oif, f"if{oif}"),
                                                 metric=metric))  # fmt: skip


def pr_link(msg: Any) -> links.Link:
    info = msg.get_attr("IFLA_LINKINFO")
    kind = (info.get_attr("IFLA_INFO_KIND") or "") if info is not None else ""
    return links.Link(msg["index"], msg.get_attr("IFLA_IFNAME"), kind,
                      msg.get_attr("IFLA_ADDRESS") or "", msg.get_attr("IFLA_MTU") or 0,
                      bool(msg["flags"] & links.IFF_UP), msg.get_attr("IFLA_LINK") or 0)  # fmt: skip


def pr_address(msg: Any) -> tuple[int, IPv4Interface | IPv6Interface]:
    raw = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return msg["index"], ip_interface(f"{raw}/{msg['prefixlen']}")


def framed(req: links.Request, seq: int = 1) -> bytes:
    return _HDR.pack(16 + len(req.body), req.kind, req.flags, seq, 0) + req.body


# ---------------------------------------------------------------- encoders (no root)

v4 = st.integers(0, 2**32 - 1).map(IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(IPv6Address)
prefixes = st.one_of(
    st.builds(lambda a, n: IPv4Network((int(a), n), strict=False), v4, st.integers(0, 32)),
    st.builds(lambda a, n: IPv6Network((int(a), n), strict=False), v6, st.integers(0, 128)),
)
ifnames = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=15)
macs = st.binary(min_size=6, max_size=6).map(links.mac_text)
indexes = st.integers(1, 2**31 - 1)
DEVICES = {"v1": 7, "fab0123abcd": 4242}


@st.composite
def routes(draw: st.DrawFn) -> KernelRoute:
    dst = draw(prefixes)
    kind = draw(st.sampled_from(["gw", "blackhole", "dev"]))
    metric = draw(st.integers(0, 2**32 - 1))
    if kind == "blackhole":
        return KernelRoute(dst, blackhole=True, metric=metric)
    if kind == "dev":
        return KernelRoute(dst, dev=draw(st.sampled_from(sorted(DEVICES))), metric=metric)
    make: type[IPAddress] = IPv4Address if dst.version == 4 else IPv6Address
    bits = 32 if dst.version == 4 else 128
    ints = draw(st.lists(st.integers(1, 2**bits - 1), min_size=1, max_size=8))
    return KernelRoute(dst, tuple(make(i) for i in ints), metric=metric)


@given(routes(), st.booleans(), st.booleans(), st.booleans(), st.integers(1, 255),
       st.sampled_from([254, 100, 1000, 2**32 - 1]), st.integers(1, 2**31 - 1))  # fmt: skip
def test_every_route_message_reads_the_same_with_pyroute2(
    route: KernelRoute, delete: bool, exclusive: bool, ack: bool, proto: int, table: int,
    seq: int,
) -> None:  # fmt: skip
    data = encode_route(RouteOp(route, delete, exclusive), seq, proto, table, DEVICES, ack)
    msg = pr_parse(rtmsg, data)
    hdr = msg["header"]
    assert (hdr["length"], hdr["sequence_number"]) == (len(data), seq)
    assert msg["family"] == (socket.AF_INET if route.dst.version == 4 else socket.AF_INET6)
    assert (msg["dst_len"], msg["proto"], msg.get_attr("RTA_TABLE")) == (
        route.dst.prefixlen, proto, table)  # fmt: skip
    assert msg["table"] == (table if table < 256 else 252)
    assert ip_address(msg.get_attr("RTA_DST")) == route.dst.network_address
    assert msg.get_attr("RTA_PRIORITY") == route.metric
    if delete:
        assert hdr["type"] == 25 and msg["type"] == 0 and pr_gateways(msg) == []
        return
    assert hdr["type"] == RTM_NEWROUTE
    assert msg["type"] == (RTN_BLACKHOLE if route.blackhole else RTN_UNICAST)
    assert tuple(pr_gateways(msg)) == route.gateways
    assert msg.get_attr("RTA_OIF") == (DEVICES[route.dev] if route.dev else None)
    names = {i: n for n, i in DEVICES.items()}
    ours = decode_route(memoryview(data), names)
    assert ours == pr_route(msg, names) == DumpedRoute(proto, route)


@given(ifnames, macs, st.integers(68, 65535), ifnames, macs, st.integers(0, 1023))
def test_veth_request_reads_the_same_with_pyroute2(
    name: str, mac: str, mtu: int, peer: str, peer_mac: str, fd: int
) -> None:
    msg = pr_parse(ifinfmsg, framed(links.veth_request(name, mac, mtu, peer, peer_mac, fd)))
    assert msg["header"]["type"] == RTM_NEWLINK
    assert (msg.get_attr("IFLA_IFNAME"), msg.get_attr("IFLA_ADDRESS"), msg.get_attr("IFLA_MTU")) == (
        name, mac, mtu)  # fmt: skip
    info = msg.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer_msg = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert (peer_msg.get_attr("IFLA_IFNAME"), peer_msg.get_attr("IFLA_ADDRESS"),
            peer_msg.get_attr("IFLA_MTU"), peer_msg.get_attr("IFLA_NET_NS_FD")) == (
        peer, peer_mac, mtu, fd)  # fmt: skip


@given(indexes, ifnames)
def test_link_state_requests_read_the_same_with_pyroute2(index: int, name: str) -> None:
    up = pr_parse(ifinfmsg, framed(links.up_request(index, name)))
    assert (up["index"], up["flags"] & links.IFF_UP, up["change"]) == (index, 1, links.IFF_UP)
    auto = pr_parse(ifinfmsg, framed(links.no_ipv6_autoconf_request(index, name)))
    inet6 = auto.get_attr("IFLA_AF_SPEC").get_attr("AF_INET6")
    assert (auto["index"], inet6.get_attr("IFLA_INET6_ADDR_GEN_MODE")) == (index, 1)
    by_index = pr_parse(ifinfmsg, framed(links.delete_request(name, index)))
    by_name = pr_parse(ifinfmsg, framed(links.delete_request(name)))
    assert by_index["header"]["type"] == by_name["header"]["type"] == links.RTM_DELLINK
    assert (by_index["index"], by_index.get_attr("IFLA_IFNAME")) == (index, None)
    assert (by_name["index"], by_name.get_attr("IFLA_IFNAME")) == (0, name)


@given(indexes, st.one_of(v4.map(lambda a: ip_interface((a, 32))),
                          v6.map(lambda a: ip_interface((a, 128)))), st.booleans())  # fmt: skip
def test_address_request_reads_the_same_with_pyroute2(
    index: int, address: IPv4Interface | IPv6Interface, nodad: bool
) -> None:
    msg = pr_parse(ifaddrmsg, framed(links.address_request(index, "x", address, nodad)))
    assert pr_address(msg) == (index, address)
    assert msg["flags"] == (links.IFA_F_NODAD if address.version == 6 and nodad else 0)


@given(prefixes, indexes, st.booleans())
def test_pod_route_request_reads_the_same_with_pyroute2(
    dst: IPNetwork, index: int, via: bool
) -> None:
    gateway: IPAddress | None = None
    if via:
        gateway = IPv4Address("169.254.1.1") if dst.version == 4 else IPv6Address("fe80::1")
    msg = pr_parse(rtmsg, framed(links.route_request(dst, index, "eth0", gateway)))
    assert (msg["dst_len"], msg["proto"], msg["table"], msg.get_attr("RTA_OIF")) == (
        dst.prefixlen, links.RTPROT_BOOT, 254, index)  # fmt: skip
    want_dst = dst.network_address if dst.prefixlen else None
    assert (ip_address(msg.get_attr("RTA_DST")) if msg.get_attr("RTA_DST") else None) == want_dst
    assert pr_gateways(msg) == ([gateway] if gateway else [])


# ---------------------------------------------------------------- real kernel dumps (root)

LINKS = ["link set lo up", "link add d0 type veth peer name d0p",
         "link add d1 type veth peer name d1p",
         "link add v0 address 02:00:00:77:00:01 mtu 1400 type veth peer name v1",
         *(f"link set {n} up" for n in ("d0", "d0p", "d1", "d1p", "v0", "v1")),
         "addr add 10.77.0.1/24 dev d0", "addr add 10.77.1.1/24 dev d1",
         "addr add 10.77.2.1/32 dev v0",
         "addr add fd77::1/64 dev d0 nodad", "addr add fd77:1::1/64 dev d1 nodad",
         "addr add fd77:2::1/128 dev v0 nodad"]  # fmt: skip
ROUTES = [
    KernelRoute(ip_network("10.77.10.0/24"), (ip_address("10.77.0.2"),)),
    KernelRoute(ip_network("10.77.11.0/24"), (ip_address("10.77.0.2"), ip_address("10.77.1.2"))),
    KernelRoute(ip_network("10.77.12.0/26"), blackhole=True),
    KernelRoute(ip_network("10.77.13.5/32"), dev="v0"),
    KernelRoute(ip_network("10.77.14.0/24"), (ip_address("10.77.0.3"),), metric=77),
    KernelRoute(ip_network("0.0.0.0/0"), (ip_address("10.77.0.254"),), metric=500),
    KernelRoute(ip_network("fd77:10::/64"), (ip_address("fd77::2"),)),
    KernelRoute(ip_network("fd77:11::/64"), (ip_address("fd77::2"), ip_address("fd77:1::2"))),
    KernelRoute(ip_network("fd77:12::/122"), blackhole=True),
    KernelRoute(ip_network("fd77:13::5/128"), dev="v0"),
    KernelRoute(ip_network("fd77:14::/64"), (ip_address("fd77::3"),), metric=77),
]


def ip_route_args(r: KernelRoute) -> str:
    """``r`` as an ``ip route add`` command (iproute2 writes it, not fabric)."""
    metric = f" metric {r.metric}" if r.metric not in (0, 1024) else ""
    head = f"route add {'blackhole ' if r.blackhole else ''}{r.dst} proto {PROTO}{metric}"
    if r.dev is not None:
        return f"{head} dev {r.dev}"
    if len(r.gateways) == 1:
        return f"{head} via {r.gateways[0]}"
    return " ".join([head, *(f"nexthop via {g}" for g in r.gateways)])  # nexthops come last


@pytest.fixture(scope="module")
def ns() -> Iterator[str]:
    with scratch_netns("tor", [*LINKS, *(ip_route_args(r) for r in ROUTES)]) as name:  # fmt: skip
        yield name


def raw_dump(ns: str, kind: int, body: bytes) -> list[bytes]:
    with closing(NetlinkSocket(ns)) as sock:
        return [bytes(msg) for _, msg in sock._dump(kind, body)]


def test_route_dumps_decode_the_same_with_pyroute2(ns: str) -> None:
    with closing(NetlinkSocket(ns)) as sock:
        names = {i: n for n, i in sock.link_indexes().items()}
    ours: list[DumpedRoute] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for data in raw_dump(ns, RTM_GETROUTE, bytes([family]) + bytes(11)):
            mine = decode_route(memoryview(data), names)
            assert mine == pr_route(pr_parse(rtmsg, data), names), data.hex()
            if mine is not None:
                ours.append(mine)
    assert {r.route for r in ours if r.proto == PROTO} == set(ROUTES)  # every shape was read
    with iproute(ns) as ipr:  # pyroute2's own dump, its own socket and request
        theirs = [pr_route(m, names) for m in ipr.get_routes(family=socket.AF_UNSPEC)]
    assert {r for r in theirs if r is not None} == set(ours)


def test_link_dumps_decode_the_same_with_pyroute2(ns: str) -> None:
    dumped = raw_dump(ns, RTM_GETLINK, _IFINFO.pack(0, 0, 0, 0, 0))
    ours = [links.decode_link(memoryview(d)) for d in dumped]
    assert ours == [pr_link(pr_parse(ifinfmsg, d)) for d in dumped]
    by_name = {link.name: link for link in ours}
    assert {"lo", "d0", "d0p", "d1", "v0", "v1"} <= set(by_name)
    v0, v1 = by_name["v0"], by_name["v1"]
    assert (v0.kind, v0.mac, v0.mtu, v0.up, v0.peer_index) == (
        "veth", "02:00:00:77:00:01", 1400, True, v1.ifindex)  # fmt: skip
    assert by_name["lo"].kind == "" and by_name["d0"].peer_index == by_name["d0p"].ifindex
    with iproute(ns) as ipr:
        assert sorted(ours) == sorted(pr_link(m) for m in ipr.get_links())


def test_address_dumps_decode_the_same_with_pyroute2(ns: str) -> None:
    dumped = raw_dump(ns, links.RTM_GETADDR, links._IFADDR.pack(0, 0, 0, 0, 0))
    ours = [links._decode_address(memoryview(d)) for d in dumped]
    assert ours == [pr_address(pr_parse(ifaddrmsg, d)) for d in dumped]
    got = {str(a) for _, a in (o for o in ours if o is not None)}
    assert {"10.77.0.1/24", "10.77.2.1/32", "fd77::1/64", "fd77:2::1/128"} <= got
    with iproute(ns) as ipr:
        assert sorted(map(str, ours)) == sorted(str(pr_address(m)) for m in ipr.get_addr())
