"""Unit and property tests of the session planner (pure, no I/O)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bgp.config import BGPConfig, Peer
from bgp.errors import ValidationError
from bgp.model import DEFAULT_AS, IPInterface, NodeInfo, PeerType, Session
from bgp.plan import V4, V6, plan_sessions, session_name

ip = ipaddress.ip_address
v4 = ipaddress.IPv4Interface
v6 = ipaddress.IPv6Interface


def match(selector: str, labels: Mapping[str, str]) -> bool:
    """A tiny stand-in for ipam.selector: all(), has(k), k == 'v'."""
    s = selector.strip()
    if s == "all()":
        return True
    if m := re.fullmatch(r"has\(([\w./-]+)\)", s):
        return m.group(1) in labels
    if m := re.fullmatch(r"([\w./-]+) == '([^']*)'", s):
        return labels.get(m.group(1)) == m.group(2)
    raise ValueError(f"fake matcher does not know {selector!r}")


def node(
    name: str,
    a4: str | None = None,
    a6: str | None = None,
    asn: int | None = None,
    rr: str | None = None,
    **labels: str,
) -> NodeInfo:
    return NodeInfo(
        name,
        ipv4=v4(a4) if a4 else None,
        ipv6=v6(a6) if a6 else None,
        as_number=asn,
        labels=labels,
        rr_cluster_id=rr,
    )


N1 = node("n1", "10.0.0.1/24")
N2 = node("n2", "10.0.0.2/24")
N3 = node("n3", "10.0.0.3/24")
MESH = BGPConfig()
NO_MESH = BGPConfig(node_to_node_mesh=False)


def plan(
    local: NodeInfo,
    nodes: list[NodeInfo],
    peers: tuple[Peer, ...] | list[Peer] = (),
    config: BGPConfig = MESH,
    local_interfaces: Sequence[IPInterface] = (),
) -> list[Session]:
    return plan_sessions(local, nodes, peers, config, match, local_interfaces)


def by_ip(sessions: list[Session]) -> dict[str, Session]:
    return {str(s.peer_ip): s for s in sessions}


# --------------------------------------------------------------------------- mesh


def test_mesh_one_session_per_other_node_with_mesh_settings() -> None:
    config = BGPConfig(
        as_number=65000,
        listen_port=1790,
        mesh_hold_time=30,
        mesh_max_restart_time=300,
        mesh_password_file="/etc/fabric/mesh.key",
    )
    got = plan(N1, [N1, N2, N3], config=config)
    assert [s.name for s in got] == ["Mesh_10_0_0_2", "Mesh_10_0_0_3"]
    s = got[0]
    assert s.kind is PeerType.MESH
    assert (s.peer_as, s.local_as) == (65000, 65000)
    assert s.local_address == ip("10.0.0.1")
    assert s.router_id == ip("10.0.0.1")
    assert (s.hold_time, s.restart_time) == (30, 300)
    assert s.password_file == "/etc/fabric/mesh.key"
    assert s.peer_port == 1790
    assert s.required is False
    assert s.peer_node == "n2"
    assert s.families == (V4,)
    assert s.allow_local_as == 0


def test_mesh_off_means_no_mesh_sessions() -> None:
    assert plan(N1, [N1, N2, N3], config=NO_MESH) == []


def test_mesh_uses_each_nodes_own_as() -> None:
    local = node("n1", "10.0.0.1/24", asn=65001)
    got = by_ip(plan(local, [local, node("n2", "10.0.0.2/24", asn=65002), N3]))
    assert (got["10.0.0.2"].local_as, got["10.0.0.2"].peer_as) == (65001, 65002)
    assert got["10.0.0.3"].peer_as == MESH.as_number


def test_mesh_carries_ipv6_over_ipv4_when_both_are_dual_stack() -> None:
    a = node("a", "10.0.0.1/24", "fd00::1/64")
    b = node("b", "10.0.0.2/24", "fd00::2/64")
    c = node("c", "10.0.0.3/24")
    got = by_ip(plan(a, [a, b, c]))
    assert set(got) == {"10.0.0.2", "10.0.0.3"}  # no separate IPv6 session
    assert got["10.0.0.2"].families == (V4, V6)
    assert got["10.0.0.3"].families == (V4,)


def test_mesh_ipv6_session_only_between_nodes_lacking_common_ipv4() -> None:
    dual = node("a", "10.0.0.1/24", "fd00::1/64")
    v6only = node("b", a6="fd00::2/64")
    v4only = node("c", "10.0.0.3/24")
    nothing = node("d")
    got = plan(dual, [dual, v6only, v4only, nothing])
    assert [(s.name, s.families) for s in got] == [
        ("Mesh_10_0_0_3", (V4,)),
        ("Mesh_fd00__2", (V6,)),
    ]
    assert got[1].local_address == ip("fd00::1")
    # A v4-only node and a v6-only node have nothing in common: no session, no crash.
    assert by_ip(plan(v4only, [dual, v6only, v4only])).keys() == {"10.0.0.1"}
    assert plan(nothing, [dual, v6only, nothing]) == []


def test_mesh_passive_end_is_the_higher_address() -> None:
    low = plan(N1, [N1, N2])[0]
    high = plan(N2, [N1, N2])[0]
    assert (low.passive, high.passive) == (False, True)


def test_mesh_skips_route_reflectors_like_calico() -> None:
    rr = node("rr", "10.0.0.9/24", rr="1.0.0.1")
    assert [s.peer_node for s in plan(N1, [N1, N2, rr])] == ["n2"]
    assert plan(rr, [N1, N2, rr]) == []


def test_local_node_found_by_name_in_nodes_is_not_a_peer() -> None:
    renamed = node("n1", "10.0.0.1/24")
    assert [s.peer_node for s in plan(renamed, [N1, N2])] == ["n2"]


# ----------------------------------------------------------------- explicit peers


TOR = Peer("tor", peer_ip=ip("10.0.0.254"), as_number=65100)


def test_global_peer_defaults() -> None:
    got = plan(N1, [N1], [TOR])
    assert len(got) == 1
    s = got[0]
    assert s.name == "Global_10_0_0_254"
    assert s.kind is PeerType.GLOBAL
    assert (s.peer_as, s.local_as) == (65100, MESH.as_number)
    assert (s.hold_time, s.keepalive_time, s.restart_time) == (90, None, 120)
    assert s.peer_port == 179
    assert s.required is True
    assert s.passive is False
    assert s.peer_node is None
    assert s.families == (V4,)


def test_peer_settings_are_carried_over() -> None:
    p = Peer(
        "tor",
        peer_ip=ip("10.0.0.254"),
        peer_port=1179,
        as_number=65100,
        local_as_number=65010,
        password_file="/etc/fabric/tor.key",
        hold_time=0,
        keepalive_time=None,
        max_restart_time=30,
        max_prefixes=500,
        required=False,
        num_allowed_local_as=1,
    )
    (s,) = plan(N1, [N1], [p])
    assert s.local_as == 65010
    assert s.peer_port == 1179
    assert s.password_file == "/etc/fabric/tor.key"
    assert s.hold_time == 0  # 0 is a valid hold time (no keepalives), not "unset"
    assert (s.restart_time, s.max_prefixes, s.required) == (30, 500, False)
    assert s.allow_local_as == 1


def test_gtsm_source_address_and_credential_are_carried_over() -> None:
    base = dict(peer_ip=ip("10.9.0.1"), as_number=65100)
    two_homed = node("n1", "10.0.0.1/24")
    ifaces: list[IPInterface] = [ipaddress.IPv4Interface("10.9.0.2/24")]
    # unset: the interface facing the router; UseNodeIP: the node address; None: the kernel
    (s,) = plan(two_homed, [two_homed], [Peer("t", **base)], local_interfaces=ifaces)  # type: ignore[arg-type]
    assert (s.local_address, s.source_auto, s.ttl_security) == (ip("10.9.0.2"), False, 0)
    use_node = Peer("t", **base, source_address="UseNodeIP", ttl_security=1)  # type: ignore[arg-type]
    (s,) = plan(two_homed, [two_homed], [use_node], local_interfaces=ifaces)
    assert (s.local_address, s.source_auto, s.ttl_security) == (ip("10.0.0.1"), False, 1)
    kernel = Peer("t", **base, source_address="None", password_credential="tor")  # type: ignore[arg-type]
    (s,) = plan(two_homed, [two_homed], [kernel], local_interfaces=ifaces)
    assert (s.source_auto, s.password_credential, s.password_file) == (True, "tor", None)
    # UseNodeIP needs a node address of the peer's family: none, no session
    v6 = Peer("t6", peer_ip=ip("fd00::fe"), as_number=65100, source_address="UseNodeIP")
    assert (
        plan(two_homed, [two_homed], [v6], local_interfaces=[ipaddress.IPv6Interface("fd00::1/64")])
        == []
    )
    # node-to-node sessions carry GTSM on both ends
    n2 = node("n2", "10.0.0.2/24")
    sel = Peer("nodes", peer_selector="all()", ttl_security=1)
    assert [s.ttl_security for s in plan(two_homed, [two_homed, n2], [sel])] == [1]
    assert [s.ttl_security for s in plan(n2, [two_homed, n2], [sel])] == [1]


def test_node_scoped_peers() -> None:
    mine = Peer("mine", peer_ip=ip("10.0.0.250"), as_number=65100, node="n1")
    theirs = Peer("theirs", peer_ip=ip("10.0.0.251"), as_number=65100, node="n2")
    rack = Peer("rack", peer_ip=ip("10.0.0.252"), as_number=65100, node_selector="rack == 'a'")
    other = Peer("other", peer_ip=ip("10.0.0.253"), as_number=65100, node_selector="rack == 'b'")
    local = node("n1", "10.0.0.1/24", rack="a")
    got = plan(local, [local], [mine, theirs, rack, other])
    assert [s.name for s in got] == ["Node_10_0_0_250", "Node_10_0_0_252"]
    assert all(s.kind is PeerType.NODE for s in got)


def test_ipv6_peer_needs_a_local_ipv6_address() -> None:
    p6 = Peer("tor6", peer_ip=ip("fd00::fe"), as_number=65100)
    assert plan(N1, [N1], [p6]) == []
    dual = node("n1", "10.0.0.1/24", "fd00::1/64")
    (s,) = plan(dual, [dual], [p6])
    assert (s.name, s.local_address, s.families) == ("Global_fd00__fe", ip("fd00::1"), (V6,))


def test_local_address_is_the_interface_facing_the_peer() -> None:
    ifaces = [v4("192.168.1.10/24"), v4("192.168.2.10/24"), v4("192.168.2.11/25")]
    peers = [
        Peer("a", peer_ip=ip("192.168.1.1"), as_number=65101),
        Peer("b", peer_ip=ip("192.168.2.1"), as_number=65102),
        Peer("c", peer_ip=ip("172.16.0.1"), as_number=65103),
    ]
    got = by_ip(plan(N1, [N1], peers, local_interfaces=ifaces))
    assert got["192.168.1.1"].local_address == ip("192.168.1.10")
    assert got["192.168.2.1"].local_address == ip("192.168.2.11")  # most specific subnet
    assert got["172.16.0.1"].local_address == ip("10.0.0.1")  # no facing interface


def test_no_session_to_an_own_address() -> None:
    ifaces = [v4("192.168.1.10/24")]
    peers = [
        Peer("self-node", peer_ip=ip("10.0.0.1"), as_number=65100),
        Peer("self-iface", peer_ip=ip("192.168.1.10"), as_number=65100),
    ]
    assert plan(N1, [N1], peers, local_interfaces=ifaces) == []


def test_node_without_addresses_plans_nothing_and_has_a_hashed_router_id() -> None:
    bare = node("bare")
    assert plan(bare, [bare, N2], [TOR]) == []
    assert bare.router_id == node("bare").router_id != node("other").router_id


# ------------------------------------------------------------ route reflectors

RR_PEER = Peer("rr", node_selector="all()", peer_selector="rr == 'true'")


RR1 = NodeInfo("rr1", v4("10.0.0.10/24"), labels={"rr": "true"}, rr_cluster_id="1.0.0.1")
RR2 = NodeInfo("rr2", v4("10.0.0.11/24"), labels={"rr": "true"}, rr_cluster_id="1.0.0.1")
C1 = node("c1", "10.0.0.21/24")
C2 = node("c2", "10.0.0.22/24")
CLUSTER = [RR1, RR2, C1, C2]


def test_client_peers_with_every_reflector() -> None:
    got = plan(C1, CLUSTER, [RR_PEER], config=NO_MESH)
    assert [s.name for s in got] == ["RR_10_0_0_10", "RR_10_0_0_11"]
    for s in got:
        assert s.kind is PeerType.RR
        assert (s.rr_client, s.cluster_id) == (False, None)
        assert s.required is True
        assert s.peer_port == NO_MESH.listen_port


def test_reflector_gets_the_reverse_sessions_with_clients_marked() -> None:
    got = by_ip(plan(RR1, CLUSTER, [RR_PEER], config=NO_MESH))
    assert set(got) == {"10.0.0.11", "10.0.0.21", "10.0.0.22"}
    for client in ("10.0.0.21", "10.0.0.22"):
        s = got[client]
        assert s.kind is PeerType.RR
        assert (s.rr_client, s.cluster_id) == (True, "1.0.0.1")
        assert s.required is False  # a reflector does not wait for all of its clients
    # The other reflector of the same cluster is not a client.
    assert (got["10.0.0.11"].rr_client, got["10.0.0.11"].cluster_id) == (False, None)
    assert got["10.0.0.11"].required is True


def test_reflector_in_other_cluster_or_other_as_is_not_a_client() -> None:
    other = NodeInfo("rr3", v4("10.0.0.12/24"), labels={"rr": "true"}, rr_cluster_id="2.0.0.2")
    ebgp = node("c3", "10.0.0.23/24", asn=65003)
    got = by_ip(plan(RR1, [RR1, other, ebgp], [RR_PEER], config=NO_MESH))
    assert got["10.0.0.12"].rr_client is True  # another cluster: reflect to it
    assert got["10.0.0.23"].rr_client is False  # eBGP: reflection does not apply
    assert got["10.0.0.23"].peer_as == 65003


def test_explicit_peer_wins_over_mesh_for_the_same_address() -> None:
    p = Peer("to-n2", node_selector="all()", peer_selector="has(n2)", hold_time=9)
    n2 = node("n2", "10.0.0.2/24", n2="")
    got = by_ip(plan(N1, [N1, n2, N3], [p]))
    assert (got["10.0.0.2"].kind, got["10.0.0.2"].hold_time) == (PeerType.NODE, 9)
    assert got["10.0.0.3"].kind is PeerType.MESH


def test_first_peer_name_wins_among_duplicates() -> None:
    b = Peer("b-tor", peer_ip=ip("10.0.0.254"), as_number=65100, hold_time=30)
    a = Peer("a-tor", peer_ip=ip("10.0.0.254"), as_number=65100, hold_time=60)
    for order in ([a, b], [b, a]):
        (s,) = plan(N1, [N1], order)
        assert s.hold_time == 60


def test_peer_ip_naming_a_fabric_node_is_planned_on_both_ends() -> None:
    p = Peer("n1-to-n2", peer_ip=ip("10.0.0.2"), as_number=MESH.as_number, node="n1")
    (fwd,) = plan(N1, [N1, N2], [p], config=NO_MESH)
    (rev,) = plan(N2, [N1, N2], [p], config=NO_MESH)
    assert (fwd.name, rev.name) == ("Node_10_0_0_2", "Node_10_0_0_1")
    assert (fwd.peer_node, rev.peer_node) == ("n2", "n1")
    assert (fwd.passive, rev.passive) == (False, True)
    assert (fwd.required, rev.required) == (True, False)
    # AS mismatch: the far node is not that peer, so nothing is planned there and the
    # near end must not wait passively for a connection that will never come.
    wrong = Peer("wrong", peer_ip=ip("10.0.0.1"), as_number=65999, node="n2")
    (only,) = plan(N2, [N1, N2], [wrong], config=NO_MESH)
    assert only.passive is False
    assert plan(N1, [N1, N2], [wrong], config=NO_MESH) == []


def test_output_is_sorted_by_kind_then_address() -> None:
    peers = [
        Peer("tor6", peer_ip=ip("fd00::fe"), as_number=65100),
        TOR,
        Peer("n", peer_ip=ip("10.0.0.250"), as_number=65100, node="n1"),
    ]
    dual = node("n1", "10.0.0.1/24", "fd00::1/64")
    got = plan(dual, [dual, N3, N2], peers)
    assert [s.name for s in got] == [
        "Mesh_10_0_0_2",
        "Mesh_10_0_0_3",
        "Global_10_0_0_254",
        "Global_fd00__fe",
        "Node_10_0_0_250",
    ]


def test_peer_ip_without_as_number_is_a_validation_error() -> None:
    with pytest.raises(ValidationError) as e:
        plan(N1, [N1], [Peer("bad", peer_ip=ip("10.0.0.254"))])
    assert e.value.field == "asNumber"


def test_session_name() -> None:
    assert session_name(PeerType.RR, ip("10.0.0.5")) == "RR_10_0_0_5"
    assert session_name(PeerType.GLOBAL, ip("2001:db8::1")) == "Global_2001_db8__1"


# ---------------------------------------------------------------- properties

LABELS = st.fixed_dictionaries({}, optional={"rr": st.just("true"), "rack": st.sampled_from("ab")})
SELECTORS = st.sampled_from(["all()", "rr == 'true'", "has(rack)", "rack == 'a'", "rack == 'b'"])


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[NodeInfo], list[Peer], BGPConfig]:
    count = draw(st.integers(2, 7))
    v4s = draw(st.lists(st.integers(1, 250), min_size=count, max_size=count, unique=True))
    nodes = []
    for i, host in enumerate(v4s):
        has4, has6 = draw(st.sampled_from([(True, False), (True, True), (False, True)]))
        nodes.append(
            NodeInfo(
                f"n{i}",
                ipv4=v4(f"10.0.0.{host}/24") if has4 else None,
                ipv6=v6(f"fd00::{host:x}/64") if has6 else None,
                as_number=draw(st.sampled_from([None, None, 65001])),
                labels=draw(LABELS),
                rr_cluster_id=draw(st.sampled_from([None, None, "1.0.0.1", "2.0.0.2"])),
            )
        )
    peers = [
        Peer(
            f"p{j}",
            node_selector=draw(st.one_of(st.none(), SELECTORS)),
            peer_selector=draw(SELECTORS),
            hold_time=draw(st.sampled_from([None, 9, 30])),
            local_as_number=draw(st.sampled_from([None, 65010])),
        )
        for j in range(draw(st.integers(0, 3)))
    ]
    # peerIP peers naming a fabric node by one of its addresses, with its AS (so that node
    # plans the far end, as Calico's reverse peerings do).
    for j in range(draw(st.integers(0, 2))):
        target = draw(st.sampled_from(nodes))
        iface = draw(st.sampled_from([i for i in (target.ipv4, target.ipv6) if i is not None]))
        peers.append(
            Peer(
                f"q{j}",
                peer_ip=iface.ip,
                as_number=target.as_number or DEFAULT_AS,
                node_selector=draw(st.one_of(st.none(), SELECTORS)),
                local_as_number=draw(st.sampled_from([None, 65010])),
            )
        )
    return nodes, peers, BGPConfig(node_to_node_mesh=draw(st.booleans()))


@settings(max_examples=300, deadline=None)
@given(clusters(), st.randoms(use_true_random=False))
def test_node_sessions_exist_on_both_ends_with_exactly_one_passive(
    cluster: tuple[list[NodeInfo], list[Peer], BGPConfig], rnd: object
) -> None:
    nodes, peers, config = cluster
    plans = {n.name: plan_sessions(n, nodes, peers, config, match) for n in nodes}
    byname = {n.name: n for n in nodes}
    for n in nodes:
        own = {i.ip for i in (n.ipv4, n.ipv6) if i is not None}
        keys = [s.key for s in plans[n.name]]
        assert len(keys) == len(set(keys)), "duplicate session key"
        assert not own & set(keys), "session to an own address"
        for s in plans[n.name]:
            assert s.peer_node is not None
            assert s.local_address in own
            far = [t for t in plans[s.peer_node] if t.peer_ip == s.local_address]
            assert len(far) == 1, f"{n.name} -> {s.peer_node} planned on one end only"
            t = far[0]
            assert t.local_address == s.peer_ip and t.peer_node == n.name
            assert s.passive != t.passive, "both or neither end passive"
            assert (s.hold_time, s.families) == (t.hold_time, t.families)
            # A peerIP peer shows as Global on the side it names and Node on the far side.
            for k in (PeerType.MESH, PeerType.RR):
                assert (s.kind is k) == (t.kind is k)
            assert (s.local_as, s.peer_as) == (t.peer_as, t.local_as)
            assert s.rr_client == (
                n.rr_cluster_id is not None
                and s.peer_as == s.local_as
                and byname[s.peer_node].rr_cluster_id != n.rr_cluster_id
            )
    # The plan does not depend on input order.
    shuffled_nodes, shuffled_peers = list(nodes), list(peers)
    rnd.shuffle(shuffled_nodes)  # type: ignore[attr-defined]
    rnd.shuffle(shuffled_peers)  # type: ignore[attr-defined]
    for n in nodes:
        again = plan_sessions(n, shuffled_nodes, shuffled_peers, config, match)
        assert again == plans[n.name]
