"""bgp.codec: ExaBGP 5 JSON lines in (the exact lines the probe recorded), commands out."""

from __future__ import annotations

import gc
import ipaddress
import json

import pytest

from bgp import codec, interned
from bgp.codec import Ack, RelayNotice, Reply, SpeakerShutdown, parse_line
from bgp.errors import SpeakerError, ValidationError
from bgp.model import (
    Advert,
    EndOfRib,
    PeerGracefulRestart,
    PeerNotification,
    PeerState,
    PeerUpdate,
    SessionState,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network

HEAD = '"exabgp": "5.0.0", "time": 1795668017.02, "host" : "vm", "pid" : 8136, "ppid" : 8134'
NB = (
    '"neighbor": { "address": { "local": "10.99.0.12", "peer": "10.99.0.1" }, '
    '"asn": { "local": 64512, "peer": 65000 }, "router-id": "10.99.0.12" '
)


def line(body: str, kind: str = "update", counter: int = 1) -> bytes:
    return f'{{ {HEAD}, "counter": {counter}, "type": "{kind}", {body} }}\n'.encode()


def test_state_sequence() -> None:
    up = parse_line(line(NB + ', "state": "up" }', "state"))
    assert up == [PeerState(ip("10.99.0.1"), SessionState.ESTABLISHED, "", ip("10.99.0.12"), 65000)]
    conn = parse_line(line(NB + ', "state": "connected" }', "state"))
    assert isinstance(conn, list) and conn[0].state is SessionState.CONNECTED  # type: ignore[union-attr]
    down = parse_line(
        line(NB + ', "state": "down", "reason": "notification received (6,2)" }', "state")
    )
    assert down == [
        PeerState(
            ip("10.99.0.1"),
            SessionState.DOWN,
            "notification received (6,2)",
            ip("10.99.0.12"),
            65000,
        )
    ]


def test_update_ebgp_several_nlri() -> None:
    body = (
        NB + ', "direction": "receive", "message": { "update": { "attribute": { "origin": "igp", '
        '"as-path": {"0": {"element": "as-sequence", "value": [65000, 64512]}}, '
        '"community": [ [ 65000, 1 ] ], "large-community": [ [ 65000, 1, 2 ] ] }, '
        '"announce": { "ipv4 unicast": { "10.99.0.11": [ { "nlri": "10.99.128.0/32" }, '
        '{ "nlri": "10.99.128.1/32" }, { "nlri": "10.99.100.0/26" } ] } } } } }'
    )
    (ev,) = parse_line(line(body))  # type: ignore[misc]
    assert isinstance(ev, PeerUpdate)
    assert ev.peer == ip("10.99.0.1")
    assert [a.prefix for a in ev.announced] == [
        net("10.99.128.0/32"),
        net("10.99.128.1/32"),
        net("10.99.100.0/26"),
    ]
    assert {a.next_hop for a in ev.announced} == {ip("10.99.0.11")}
    attrs = ev.announced[0].attrs
    assert attrs.as_path == (65000, 64512)
    assert attrs.communities == ("65000:1", "65000:1:2")
    assert ev.withdrawn == ()


def test_update_rr_attributes_and_ipv6() -> None:
    body = (
        NB + ', "direction": "receive", "message": { "update": { "attribute": { "origin": "igp", '
        '"local-preference": 100, "originator-id": "10.99.0.11", "cluster-list": [ "10.99.0.1" ] }, '
        '"announce": { "ipv6 unicast": { "fd99::11": [ { "nlri": "fd99:100:0:1::/64" } ] } } } } }'
    )
    (ev,) = parse_line(line(body))  # type: ignore[misc]
    assert isinstance(ev, PeerUpdate)
    (a,) = ev.announced
    assert a.prefix == net("fd99:100:0:1::/64") and a.next_hop == ip("fd99::11")
    assert a.attrs.as_path == ()
    assert a.attrs.originator_id == ip("10.99.0.11")
    assert a.attrs.cluster_list == ("10.99.0.1",)
    assert a.attrs.local_pref == 100


def test_ipv6_global_and_link_local_next_hop_is_one_route() -> None:
    """Seen from BIRD over an IPv4 session: ExaBGP lists the NLRI under both next hops."""
    body = (
        NB + ', "direction": "receive", "message": { "update": { "attribute": { "origin": "igp" }, '
        '"announce": { "ipv6 unicast": { "fd77::1": [ { "nlri": "fd88:1::/64" } ], '
        '"fe80::d856:5ff:feee:a26c": [ { "nlri": "fd88:1::/64" } ] } } } } }'
    )
    (ev,) = parse_line(line(body))  # type: ignore[misc]
    assert isinstance(ev, PeerUpdate)
    assert [(a.prefix, a.next_hop) for a in ev.announced] == [(net("fd88:1::/64"), ip("fd77::1"))]
    only_ll = body.replace('"fd77::1": [ { "nlri": "fd88:1::/64" } ], ', "")
    (ev,) = parse_line(line(only_ll))  # type: ignore[misc]
    assert isinstance(ev, PeerUpdate)
    assert ev.announced[0].next_hop == ip("fe80::d856:5ff:feee:a26c")


def test_compact_nlri_lists() -> None:
    """exabgp.api.compact (what fabricd runs ExaBGP with): NLRIs as plain strings."""
    body = (
        NB + ', "direction": "receive", "message": { "update": { "attribute": { "origin": '
        '"igp", "as-path": { "0": { "element": "as-sequence", "value": [ 65000 ] } } }, '
        '"announce": { "ipv4 unicast": { "10.99.0.1": [ "10.99.7.0/26", "10.99.8.0/26" ] } }, '
        '"withdraw": { "ipv4 unicast": [ "10.99.9.0/26" ] } } } }'
    )
    [ev] = parse_line(line(body))
    assert isinstance(ev, PeerUpdate)
    assert [a.prefix for a in ev.announced] == [net("10.99.7.0/26"), net("10.99.8.0/26")]
    assert {a.next_hop for a in ev.announced} == {ip("10.99.0.1")}
    assert ev.announced[0].attrs.as_path == (65000,)
    assert ev.withdrawn == (net("10.99.9.0/26"),)


def test_withdraw_and_eor() -> None:
    body = (
        NB + ', "direction": "receive", "message": { "update": { "withdraw": { "ipv4 unicast": '
        '[ { "nlri": "10.99.100.0/26" } ], "ipv6 unicast": [ { "nlri": "fd99:100:0:1::/64" } ] } } } }'
    )
    assert parse_line(line(body)) == [
        PeerUpdate(ip("10.99.0.1"), (), (net("10.99.100.0/26"), net("fd99:100:0:1::/64")))
    ]
    eor = (
        NB
        + ', "direction": "receive", "message": { "eor": { "afi" : "ipv4", "safi" : "unicast" } } }'
    )
    assert parse_line(line(eor)) == [EndOfRib(ip("10.99.0.1"), "ipv4 unicast")]


def test_notifications() -> None:
    body = (
        NB + ', "direction": "receive", "notification": { "code": 6, "subcode": 2, '
        '"data": "0x", "message": "" } }'
    )
    assert parse_line(line(body, "notification")) == [PeerNotification(ip("10.99.0.1"), 6, 2, "")]
    shutdown = f'{{ {HEAD}, "type": "notification", "notification": "shutdown" }}'.encode()
    assert parse_line(shutdown) == SpeakerShutdown()


def test_exabgp_42_flat_as_path() -> None:
    body = (
        NB.replace(', "router-id": "10.99.0.12" ', "")
        + ', "direction": "receive", "message": { "update": { "attribute": { "origin": "igp", '
        '"as-path": [ 65000, 64512 ], "confederation-path": [] }, '
        '"announce": { "ipv4 unicast": { "10.99.0.11": [ { "nlri": "10.99.100.0/26" } ] } } } } }'
    )
    (ev,) = parse_line(line(body).replace(b'"5.0.0"', b'"4.0.1"'))  # type: ignore[misc]
    assert isinstance(ev, PeerUpdate)
    assert ev.announced[0].attrs.as_path == (65000, 64512)


def test_text_lines_acks_and_relay_notice() -> None:
    assert parse_line(b"done\n") is Ack.DONE
    assert parse_line(b"error") is Ack.ERROR
    assert parse_line(b"exabgp 5.0.15\n") == Reply("exabgp 5.0.15")
    assert parse_line(b'{"type": "relay", "pid": 7, "connected": true, "dropped": 3}\n') == (
        RelayNotice(7, True, 3)
    )
    assert parse_line(line(NB + ', "direction": "receive" }', "open")) == []
    with pytest.raises(SpeakerError):
        parse_line(b'{ "type": "update", "neighbor": ')
    with pytest.raises(SpeakerError):
        parse_line(b'{ "type": "update", "neighbor": {} }')


def _bulk_lines(n_lines: int, per_line: int) -> list[bytes]:
    out = []
    k = 0
    for i in range(n_lines):
        nlri = []
        for _ in range(per_line):
            nlri.append(f'{{ "nlri": "{ipaddress.IPv4Address(0x0A000000 + k)}/32" }}')
            k += 1
        body = (
            NB + ', "direction": "receive", "message": { "update": { "attribute": { "origin": '
            '"igp", "as-path": {"0": {"element": "as-sequence", "value": [65000, 64513]}} }, '
            '"announce": { "ipv4 unicast": { "10.99.0.11": [ ' + ", ".join(nlri) + " ] } } } } }"
        )
        out.append(line(body, counter=i))
    return out


def test_parse_100k_prefixes_in_4000_updates() -> None:
    """100,000 prefixes in 4,000 UPDATE lines all come out, each once. (How fast is the
    routes benchmark's business, measured against BIRD in the same run: never a test's.)"""
    lines = _bulk_lines(4000, 25)
    seen: set[object] = set()
    n = 0
    for raw in lines:
        for ev in parse_line(raw):  # type: ignore[union-attr]
            n += len(ev.announced)  # type: ignore[union-attr]
            seen.update(ev.announced)  # type: ignore[union-attr]
    assert n == len(seen) == 100_000


# ---------------------------------------------------------------------------- commands


def test_announce_commands_group_and_split() -> None:
    nh = ip("10.0.0.9")
    adverts = [Advert(net(f"10.1.{i}.0/24")) for i in range(250)]
    adverts += [Advert(net("10.2.0.0/26"), nh, ("65000:1",)), Advert(net("10.2.0.64/26"), nh)]
    adverts += [Advert(net("fd00:1::/64"), ip("fd00::9"))]
    cmds = codec.announce_commands(adverts)
    assert [len(c.split(" nlri ")[1].split()) for c in cmds] == [100, 100, 50, 1, 1, 1]
    assert cmds[0].startswith("announce attributes next-hop self nlri 10.1.0.0/24 10.1.1.0/24")
    assert cmds[3] == "announce attributes next-hop 10.0.0.9 community [ 65000:1 ] nlri 10.2.0.0/26"
    assert cmds[4] == "announce attributes next-hop 10.0.0.9 nlri 10.2.0.64/26"
    assert cmds[5] == "announce attributes next-hop fd00::9 nlri fd00:1::/64"
    scoped = codec.announce_commands(adverts[:1], neighbor=ip("10.0.0.1"))
    assert scoped == ["neighbor 10.0.0.1 announce attributes next-hop self nlri 10.1.0.0/24"]
    large = codec.announce_line(None, ("65000:1:2", "65000:3"), [net("10.3.0.0/24")])
    assert large == (
        "announce attributes next-hop self community [ 65000:3 ] "
        "large-community [ 65000:1:2 ] nlri 10.3.0.0/24"
    )
    with pytest.raises(ValidationError):
        codec.announce_commands([Advert(net("10.3.0.0/24"), None, ("no community",))])


def test_withdraw_eor_refresh_commands() -> None:
    prefixes = [net("10.1.0.0/24"), net("fd00:1::/64"), net("10.1.1.0/24")]
    assert codec.withdraw_commands(prefixes) == [
        "withdraw attributes nlri 10.1.0.0/24 10.1.1.0/24",
        "withdraw attributes nlri fd00:1::/64",
    ]
    assert len(codec.withdraw_commands([net(f"10.9.{i}.0/24") for i in range(201)])) == 3
    assert codec.withdraw_commands(prefixes[:1], ip("10.0.0.1")) == [
        "neighbor 10.0.0.1 withdraw attributes nlri 10.1.0.0/24"
    ]
    assert codec.eor_command("ipv4 unicast") == "announce eor ipv4 unicast"
    assert codec.eor_command("ipv6 unicast", ip("fd00::1")) == (
        "neighbor fd00::1 announce eor ipv6 unicast"
    )
    assert codec.route_refresh_command("ipv4 unicast") == "announce route-refresh ipv4 unicast"
    with pytest.raises(ValidationError):
        codec.eor_command("ipv4 flow")


def test_neighbor_descriptions() -> None:
    reply = [
        "neighbor 10.77.0.1 {",
        'description "Mesh_10_77_0_1 gen 3";',
        "router-id 10.77.0.2;",
        "}",
        "neighbor fd77::1 {",
        'description "Global fd77::1 gen 3";',
    ]
    assert codec.neighbor_descriptions(reply) == {
        ip("10.77.0.1"): "Mesh_10_77_0_1 gen 3",
        ip("fd77::1"): "Global fd77::1 gen 3",
    }


def test_relay_notice_is_what_the_relay_writes() -> None:
    from bgp.relay import Relay

    r = Relay("/nonexistent")
    r.dropped = 5
    notice = parse_line(r.notice(False))
    assert isinstance(notice, RelayNotice) and notice.dropped == 5 and not notice.connected
    assert json.loads(r.notice(True))["connected"] is True


def test_received_open_gives_the_peers_graceful_restart_capability() -> None:
    head = '{"exabgp": "5.0.0", "time": 1.0, "type": "open", "neighbor": {"address": {"local": "10.0.0.2", "peer": "10.0.0.1"}, "asn": {"local": 65101, "peer": 65001}, "direction": "receive", '
    frr = (
        head
        + '"open": {"version": 4, "asn": 65001, "hold_time": 9, "router_id": "10.255.255.2", "capabilities": {"graceful-restart": {"name": "graceful restart", "time": 120, "address-family-flags": { }, "restart-flags": [ ] }}}}}'
    )
    exa = (
        head
        + '"open": {"version": 4, "asn": 65001, "hold_time": 9, "router_id": "10.255.255.2", "capabilities": {"graceful-restart": {"name": "graceful restart", "time": 90, "address-family-flags": {"ipv4/unicast": [ "restart" ], "ipv6/unicast": [ ] }, "restart-flags": [ ] }}}}}'
    )
    bare = (
        head
        + '"open": {"version": 4, "asn": 65001, "hold_time": 9, "router_id": "10.255.255.2", "capabilities": {}}}}'
    )
    peer = ipaddress.ip_address("10.0.0.1")
    assert parse_line(frr.encode()) == [PeerGracefulRestart(peer, 120, frozenset())]
    assert parse_line(exa.encode()) == [PeerGracefulRestart(peer, 90, frozenset({"ipv4 unicast"}))]
    assert parse_line(bare.encode()) == [PeerGracefulRestart(peer, None)]
    sent = frr.replace('"direction": "receive"', '"direction": "send"')
    assert parse_line(sent.encode()) == []


def test_received_prefixes_are_interned_until_a_sweep_finds_them_unused() -> None:
    """A withdrawal yields the very object the RIB holds; a sweep drops only prefixes that
    nothing but the table holds (a withdrawal itself frees none)."""
    text, key = "10.98.7.0/26", bytes([32, 10, 98, 7, 9])
    first, wire = interned.prefix(text), interned.nlri4(key)
    assert interned.prefix(text) is first and first == net(text) and hash(first) == hash(net(text))
    assert interned.nlri4(key) is wire and wire == net("10.98.7.9/32")
    interned.sweep()
    assert interned.PREFIXES[text] is first and interned.PREFIXES[key] is wire  # still held
    del first
    gc.collect()
    assert text in interned.PREFIXES  # kept until a sweep
    interned.sweep()
    assert text not in interned.PREFIXES and interned.PREFIXES[key] is wire
    again = interned.prefix(text)
    assert interned.PREFIXES[text] is again


def test_the_table_is_swept_when_it_doubled() -> None:
    """Interning into a table that reached the mark sweeps it first; the next mark is twice
    what the sweep left (at least SWEEP_MIN)."""
    interned.sweep()
    held = [interned.nlri4(bytes([32, 10, 97, i >> 8, i & 255])) for i in range(300)]
    dropped = [interned.nlri4(bytes([32, 10, 96, i >> 8, i & 255])) for i in range(300)]
    del dropped
    saved = interned.SWEEP_MIN, interned._sweep_at
    try:
        interned.SWEEP_MIN = 10
        interned._sweep_at = len(interned.PREFIXES)
        interned.nlri4(bytes([32, 10, 95, 0, 1]))  # at the mark: sweeps, then interns
        assert all(interned.PREFIXES[bytes([32, 10, 97, i >> 8, i & 255])] is held[i]
                   for i in range(300))  # fmt: skip
        assert not any(bytes([32, 10, 96, i >> 8, i & 255]) in interned.PREFIXES
                       for i in range(300))  # fmt: skip
        assert interned._sweep_at == 2 * (len(interned.PREFIXES) - 1)
    finally:
        interned.SWEEP_MIN, interned._sweep_at = saved
