"""bgp.wire through bgp.codec: received BGP messages as ExaBGP hands them over with
``receive { packets; }`` (the UPDATE, OPEN and NOTIFICATION bytes), decoded into events.
The messages are built here byte by byte from the RFCs; tests/test_speaker.py and the lab
tests feed the same path from real ExaBGP, BIRD and FRR sessions."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from bgp import interned
from bgp.codec import parse_line
from bgp.errors import SpeakerError
from bgp.model import (
    Announce,
    EndOfRib,
    PathAttrs,
    PeerGracefulRestart,
    PeerNotification,
    PeerUpdate,
)
from bgp.wire import WireError

ip = ipaddress.ip_address
net = ipaddress.ip_network
PEER = ip("10.99.0.1")


def attr(code: int, value: bytes, flags: int = 0x40) -> bytes:
    if len(value) > 255:
        return struct.pack("!BBH", flags | 0x10, code, len(value)) + value
    return struct.pack("!BBB", flags, code, len(value)) + value


def nlri(*cidrs: str) -> bytes:
    out = b""
    for c in cidrs:
        n = net(c)
        out += bytes([n.prefixlen]) + n.network_address.packed[: (n.prefixlen + 7) // 8]
    return out


def as_path(*asns: int, width: int = 4, kind: int = 2) -> bytes:
    fmt = "!I" if width == 4 else "!H"
    return bytes([kind, len(asns)]) + b"".join(struct.pack(fmt, a) for a in asns)


def update(withdrawn: bytes = b"", attrs: bytes = b"", announced: bytes = b"") -> bytes:
    return (
        struct.pack("!H", len(withdrawn))
        + withdrawn
        + struct.pack("!H", len(attrs))
        + attrs
        + announced
    )


def packet(
    body: bytes, category: int = 2, asn4: bool | None = True, direction: str = "receive"
) -> bytes:
    """One line as ExaBGP 5.0 writes it for ``receive { packets; }`` with ``negotiated``."""
    kind = {1: "open", 2: "update", 3: "notification"}[category]
    negotiated = (
        ""
        if asn4 is None
        else f', "negotiated": {{ "message_size": 4096, "hold_time": 9, "asn4": {str(asn4).lower()}, '
        '"multisession": false, "operational": false, "refresh": "normal", '
        '"families": [ "ipv4 unicast" ], "nexthop": [ ], "add_path": { "send": [ ], "receive": [ ] } } '
    )
    header = "0x" + ("FF" * 16) + f"{19 + len(body):04X}{category:02X}"
    return (
        '{ "exabgp": "5.0.0", "time": 1795668017.02, "host" : "vm", "pid" : 8136, "ppid" : 8134, '
        f'"counter": 3, "type": "{kind}", "neighbor": {{ "address": {{ "local": "10.99.0.12", '
        f'"peer": "{PEER}" }}, "asn": {{ "local": 64512, "peer": 65000 }}, "router-id": '
        f'"10.99.0.12" , "direction": "{direction}", "message": {{ "category": {category}, '
        f'"header": "{header}", "body": "0x{body.hex().upper()}" }} {negotiated}}} }}\n'
    ).encode()


BASE = attr(1, b"\x00", 0x40) + attr(2, as_path(65000, 65010)) + attr(3, ip("10.99.0.1").packed)


def test_ipv4_announce_with_every_attribute_fabricd_reads() -> None:
    attrs = (
        BASE
        + attr(5, struct.pack("!I", 200))
        + attr(8, struct.pack("!HHHH", 65000, 100, 64512, 7), 0xC0)
        + attr(32, struct.pack("!III", 65000, 1, 2), 0xC0)
        + attr(9, ip("10.0.0.9").packed, 0x80)
        + attr(10, ip("10.0.0.1").packed + ip("10.0.0.2").packed, 0x80)
    )
    got = parse_line(packet(update(attrs=attrs, announced=nlri("10.100.0.1/32", "10.244.3.0/26"))))
    want_attrs = PathAttrs(
        as_path=(65000, 65010),
        originator_id=ipaddress.IPv4Address("10.0.0.9"),
        cluster_list=("10.0.0.1", "10.0.0.2"),
        local_pref=200,
        communities=("65000:100", "64512:7", "65000:1:2"),
    )
    assert got == [
        PeerUpdate(
            PEER,
            (
                Announce(net("10.100.0.1/32"), PEER, want_attrs),
                Announce(net("10.244.3.0/26"), PEER, want_attrs),
            ),
        )
    ]


def test_withdrawals_find_the_announced_objects() -> None:
    """A withdrawal yields the very prefix object the announcement made (the RIB's dict
    lookups then match by identity), and the prefixes hash like plain IPv4Networks."""
    [ann] = parse_line(packet(update(attrs=BASE, announced=nlri("10.100.7.7/32", "0.0.0.0/0"))))
    [wd] = parse_line(packet(update(withdrawn=nlri("10.100.7.7/32", "0.0.0.0/0"))))
    assert isinstance(ann, PeerUpdate) and isinstance(wd, PeerUpdate)
    assert wd.announced == () and wd.withdrawn == (net("10.100.7.7/32"), net("0.0.0.0/0"))
    assert [a.prefix for a in ann.announced] == list(wd.withdrawn)
    assert all(a.prefix is w for a, w in zip(ann.announced, wd.withdrawn, strict=True))
    assert {net("10.100.7.7/32"): 1}[wd.withdrawn[0]] == 1
    assert hash(wd.withdrawn[0]) == hash(net("10.100.7.7/32"))


def test_host_bits_past_the_prefix_length_are_cleared() -> None:
    [u] = parse_line(packet(update(withdrawn=bytes([26, 10, 1, 2, 67]))))
    assert isinstance(u, PeerUpdate) and u.withdrawn == (net("10.1.2.64/26"),)


def test_end_of_rib_ipv4_and_ipv6() -> None:
    assert parse_line(packet(b"\x00\x00\x00\x00")) == [EndOfRib(PEER, "ipv4 unicast")]
    mp_eor = update(attrs=attr(15, struct.pack("!HB", 2, 1), 0x80))
    assert parse_line(packet(mp_eor)) == [EndOfRib(PEER, "ipv6 unicast")]


def test_ipv6_mp_reach_keeps_the_global_next_hop_and_mp_unreach_withdraws() -> None:
    hops = ip("fd77::1").packed + ip("fe80::d856:5ff:feee:a26c").packed
    reach = struct.pack("!HBB", 2, 1, 32) + hops + b"\x00" + nlri("fd88:1::/64")
    unreach = struct.pack("!HB", 2, 1) + nlri("fd88:2::/64")
    attrs = (
        attr(1, b"\x00") + attr(2, as_path(65000)) + attr(14, reach, 0x80) + attr(15, unreach, 0x80)
    )
    [u] = parse_line(packet(update(attrs=attrs)))
    assert u == PeerUpdate(
        PEER,
        (Announce(net("fd88:1::/64"), ip("fd77::1"), PathAttrs(as_path=(65000,))),),
        (net("fd88:2::/64"),),
    )


def test_two_octet_as_path_is_completed_from_as4_path() -> None:
    """RFC 6793: a peer without 4-octet AS numbers sends AS_TRANS (23456) in AS_PATH and
    the real numbers in AS4_PATH."""
    attrs = (
        attr(1, b"\x00")
        + attr(2, as_path(65000, 23456, width=2))
        + attr(3, PEER.packed)
        + attr(17, as_path(4200000001, width=4), 0xC0)
    )
    [u] = parse_line(packet(update(attrs=attrs, announced=nlri("10.100.0.9/32")), asn4=False))
    assert isinstance(u, PeerUpdate) and u.announced[0].attrs.as_path == (65000, 4200000001)


def test_as_sets_count_and_confederation_segments_do_not() -> None:
    path = as_path(65000) + as_path(65001, 65002, kind=1) + as_path(64999, kind=3)
    [u] = parse_line(packet(update(attrs=attr(1, b"\x00") + attr(2, path) + attr(3, PEER.packed),
                                   announced=nlri("10.100.0.9/32"))))  # fmt: skip
    assert isinstance(u, PeerUpdate) and u.announced[0].attrs.as_path == (65000, 65001, 65002)


def test_malformed_attribute_is_treat_as_withdraw() -> None:
    """RFC 7606: a NEXT_HOP of the wrong length turns the UPDATE's announcements into
    withdrawals, and the withdrawals it carried still count."""
    attrs = attr(1, b"\x00") + attr(2, as_path(65000)) + attr(3, b"\x0a\x00\x00")
    body = update(withdrawn=nlri("10.100.0.1/32"), attrs=attrs, announced=nlri("10.100.0.2/32"))
    assert parse_line(packet(body)) == [
        PeerUpdate(PEER, (), (net("10.100.0.1/32"), net("10.100.0.2/32")))
    ]
    no_hop = update(
        attrs=attr(1, b"\x00") + attr(2, as_path(65000)), announced=nlri("10.100.0.3/32")
    )
    assert parse_line(packet(no_hop)) == [PeerUpdate(PEER, (), (net("10.100.0.3/32"),))]


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\x09\x00\x00",  # withdrawn length past the end
        update(withdrawn=bytes([33, 10, 0, 0, 0, 1])),  # an IPv4 /33
        update(attrs=BASE, announced=bytes([32, 10, 0])),  # NLRI cut short
        struct.pack("!HH", 0, 40) + BASE,  # attributes length past the end
    ],
)
def test_unframeable_update_is_a_decode_error(body: bytes) -> None:
    with pytest.raises(WireError, match=r"UPDATE from 10\.99\.0\.1"):
        parse_line(packet(body))
    assert issubclass(WireError, SpeakerError)  # the speaker counts and logs it


def open_body(*caps: bytes) -> bytes:
    params = b"".join(bytes([2, len(c)]) + c for c in caps)
    return struct.pack("!BHH4sB", 4, 65000, 9, ip("10.99.0.1").packed, len(params)) + params


def test_open_graceful_restart_capability() -> None:
    gr = bytes([64, 10]) + struct.pack("!H", 0x8000 | 120) + struct.pack("!HBB", 1, 1, 0x80)
    gr += struct.pack("!HBB", 2, 1, 0x00)
    as4 = bytes([65, 4]) + struct.pack("!I", 65000)
    assert parse_line(packet(open_body(as4, gr), category=1)) == [
        PeerGracefulRestart(PEER, 120, frozenset({"ipv4 unicast"}))
    ]
    helper = bytes([64, 2]) + struct.pack("!H", 90)  # GR helper: no family preserved
    assert parse_line(packet(open_body(helper), category=1)) == [
        PeerGracefulRestart(PEER, 90, frozenset())
    ]
    assert parse_line(packet(open_body(as4), category=1)) == [PeerGracefulRestart(PEER, None)]


def test_notification() -> None:
    assert parse_line(packet(b"\x06\x02bye", category=3)) == [PeerNotification(PEER, 6, 2, "bye")]


def test_sent_messages_are_not_events() -> None:
    assert (
        parse_line(packet(update(attrs=BASE, announced=nlri("10.1.0.0/24")), direction="send"))
        == []
    )


def test_large_update_with_extended_length_attribute() -> None:
    """A full UPDATE of /32s (BIRD packs ~800 per 4 KiB message) and an attribute over 255
    bytes (extended length)."""
    prefixes = [f"10.100.{i // 256}.{i % 256}/32" for i in range(800)]
    comms = b"".join(struct.pack("!HH", 65000, i) for i in range(100))  # 400 bytes
    [u] = parse_line(packet(update(attrs=BASE + attr(8, comms, 0xC0), announced=nlri(*prefixes))))
    assert isinstance(u, PeerUpdate) and [str(a.prefix) for a in u.announced] == prefixes
    assert len(u.announced[0].attrs.communities) == 100
    assert interned.Prefix4 is type(u.announced[0].prefix)
