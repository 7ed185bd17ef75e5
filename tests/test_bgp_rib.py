"""Unit and property tests of the received-route table (pure, no I/O)."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bgp.config import BGPConfig
from bgp.import_policy import (
    DEFAULT_ROUTE,
    NEXT_HOP_IS_SELF,
    ORIGINATOR_IS_SELF,
    OUTSIDE_POOLS,
    OWN_AS_IN_PATH,
    ImportPolicy,
)
from bgp.model import (
    Announce,
    EndOfRib,
    IPAddress,
    IPNetwork,
    PathAttrs,
    PeerGracefulRestart,
    PeerNotification,
    PeerState,
    PeerUpdate,
    SessionState,
    SpeakerRestarted,
)
from bgp.rib import MAX_PREFIXES, Changes, PeerStats, Rib, graceful_down

net = ipaddress.ip_network
addr = ipaddress.ip_address

ME = addr("10.0.0.1")
A, B, C = addr("10.0.0.2"), addr("10.0.0.3"), addr("10.0.0.4")
POOL = net("10.244.0.0/16")
POOL6 = net("fd10::/48")
OWN = net("10.244.1.0/26")
POLICY = ImportPolicy(
    allowed=(POOL, POOL6),
    own=frozenset({OWN}),
    local_as=64512,
    router_id=ipaddress.IPv4Address("10.0.0.1"),
    own_addresses=frozenset({ME}),
)


def ann(prefix: str, nh: IPAddress | str, path: tuple[int, ...] = (), **kw: Any) -> Announce:
    return Announce(net(prefix), addr(str(nh)), PathAttrs(as_path=path, **kw))


def upd(peer: IPAddress, *announced: Announce, withdraw: tuple[str, ...] = ()) -> PeerUpdate:
    return PeerUpdate(peer, announced, tuple(net(w) for w in withdraw))


def down(peer: IPAddress, reason: str) -> PeerState:
    return PeerState(peer, SessionState.DOWN, reason)


# --------------------------------------------------------------------------- policy


@pytest.mark.parametrize(
    ("announce", "reason"),
    [
        (ann("10.244.2.0/26", A), None),
        (ann("10.244.1.7/32", A), None),  # a borrowed IP inside our block: more specific
        (ann("fd10:0:0:1::/122", "fd00::2"), None),
        (ann("10.245.0.0/26", A), OUTSIDE_POOLS),
        (ann("fd11::/122", "fd00::2"), OUTSIDE_POOLS),
        (ann("10.244.0.0/16", A), "covers own block 10.244.1.0/26"),
        (ann("10.244.1.0/26", A), "covers own block 10.244.1.0/26"),
        (ann("0.0.0.0/0", A), DEFAULT_ROUTE),
        (ann("10.244.2.0/26", A, (65001, 64512)), OWN_AS_IN_PATH),
        (ann("10.244.2.0/26", ME), NEXT_HOP_IS_SELF),
        (
            ann("10.244.2.0/26", A, originator_id=ipaddress.IPv4Address("10.0.0.1")),
            ORIGINATOR_IS_SELF,
        ),
    ],
)
def test_policy_reasons(announce: Announce, reason: str | None) -> None:
    assert POLICY.check(A, announce) == reason


def test_default_route_rejected_even_inside_a_pool_unless_allowed() -> None:
    everything = ImportPolicy(allowed=(net("0.0.0.0/0"),), own=frozenset({OWN}))
    assert everything.check(A, ann("0.0.0.0/0", A)) == DEFAULT_ROUTE
    allowed = ImportPolicy(allowed=(POOL,), own=frozenset({OWN}), allow_default=True)
    assert allowed.check(A, ann("0.0.0.0/0", A)) is None  # though it covers our block
    assert allowed.check(A, ann("::/0", "fd00::2")) is None
    assert allowed.check(A, ann("10.0.0.0/8", A)) == "covers own block 10.244.1.0/26"


def test_covering_names_the_smallest_own_block() -> None:
    p = ImportPolicy(allowed=(POOL,), own=frozenset({net("10.244.0.0/24"), OWN}))
    assert p.check(A, ann("10.244.0.0/23", A)) == "covers own block 10.244.1.0/26"
    assert p.check(A, ann("10.244.0.0/24", A)) == "covers own block 10.244.0.0/24"
    assert p.check(A, ann("10.244.0.0/25", A)) is None  # inside, not covering


def test_for_node_adds_import_cidrs_and_default_route_from_config() -> None:
    config = BGPConfig(import_cidrs=(net("192.0.2.0/24"),), import_default_route=True)
    p = ImportPolicy.for_node(config, [POOL], [OWN], 64512, None, [ME])
    assert p.check(A, ann("192.0.2.128/25", A)) is None
    assert p.check(A, ann("0.0.0.0/0", A)) is None
    assert p.check(A, ann("198.51.100.0/24", A)) == OUTSIDE_POOLS
    assert p.check(A, ann("10.244.9.0/26", ME)) == NEXT_HOP_IS_SELF


def test_local_as_allowance_is_per_peer_and_counts_occurrences() -> None:
    p = ImportPolicy(allowed=(POOL,), local_as=65001, allow_local_as={A: 1})
    once = ann("10.244.2.0/26", A, (65101, 65001))
    twice = ann("10.244.2.0/26", A, (65101, 65001, 65001))
    assert p.check(A, once) is None
    assert p.check(A, twice) == OWN_AS_IN_PATH
    assert p.check(B, once) == OWN_AS_IN_PATH


# ------------------------------------------------------------------- best path


def test_announce_replace_withdraw() -> None:
    rib = Rib(POLICY)
    p = net("10.244.2.0/26")
    assert rib.apply(upd(A, ann("10.244.2.0/26", A)), 0) == {p: frozenset({A})}
    assert rib.apply(upd(A, ann("10.244.2.0/26", A)), 0) == {}  # same again: nothing changes
    assert rib.apply(upd(A, ann("10.244.2.0/26", C)), 0) == {p: frozenset({C})}
    assert rib.apply(upd(A, withdraw=("10.244.2.0/26",)), 0) == {p: None}
    assert rib.best() == {}
    assert rib.peers() == []
    assert rib.apply(upd(A, withdraw=("10.244.2.0/26",)), 0) == {}  # unknown: a no-op


def test_prefix_in_both_lists_counts_as_announced() -> None:
    rib = Rib(POLICY)
    rib.apply(upd(A, ann("10.244.2.0/26", A)), 0)
    both = upd(A, ann("10.244.2.0/26", C), withdraw=("10.244.2.0/26",))
    assert rib.apply(both, 0) == {net("10.244.2.0/26"): frozenset({C})}


def test_ecmp_keeps_every_shortest_path_and_dedups_next_hops() -> None:
    rib = Rib(POLICY)
    p = net("10.244.2.0/26")
    rib.apply(upd(A, ann("10.244.2.0/26", A, (65001, 65002))), 0)
    assert rib.apply(upd(B, ann("10.244.2.0/26", B, (65003,))), 0) == {p: frozenset({B})}
    assert rib.apply(upd(C, ann("10.244.2.0/26", C, (65004,))), 0) == {p: frozenset({B, C})}
    # A reflector repeating C's route: same next hop, the set does not change.
    assert rib.apply(upd(A, ann("10.244.2.0/26", C, (65004,))), 0) == {}
    assert rib.best()[p] == frozenset({B, C})
    assert rib.apply(upd(B, withdraw=("10.244.2.0/26",)), 0) == {p: frozenset({C})}


# ------------------------------------------------------- policy changes, limits


def test_rejected_routes_are_kept_and_accepted_by_a_later_policy() -> None:
    log: list[tuple[IPAddress, IPNetwork, str]] = []
    rib = Rib(POLICY, on_reject=lambda peer, prefix, why: log.append((peer, prefix, why)))
    outside = net("10.245.0.0/26")
    assert rib.apply(upd(A, ann("10.245.0.0/26", A), ann("10.244.2.0/26", A)), 0) == {
        net("10.244.2.0/26"): frozenset({A})
    }
    assert log == [(A, outside, OUTSIDE_POOLS)]
    assert rib.stats(A) == PeerStats(received=2, accepted=1, rejected=1, rejected_total=1)
    assert [r.reason for r in rib.routes_from(A)] == [None, OUTSIDE_POOLS]

    wider = ImportPolicy(allowed=(net("10.0.0.0/8"),), own=frozenset({OWN}))
    assert rib.set_policy(wider) == {outside: frozenset({A})}
    assert rib.stats(A) == PeerStats(received=2, accepted=2, rejected=0, rejected_total=1)
    # Back again: the route is withdrawn from best and logged once more.
    assert rib.set_policy(POLICY) == {outside: None}
    assert log[-1] == (A, outside, OUTSIDE_POOLS)
    assert rib.stats(A).rejected_total == 2


def test_max_prefixes_admits_the_earliest_and_refills_in_order() -> None:
    log: list[str] = []
    rib = Rib(POLICY, on_reject=lambda peer, prefix, why: log.append(f"{prefix} {why}"))
    rib.set_limits({A: 2})
    p1, p2, p3, p4 = (f"10.244.{i}.0/26" for i in (2, 3, 4, 5))
    got = rib.apply(upd(A, ann(p1, A), ann(p2, A), ann(p3, A), ann(p4, A)), 0)
    assert set(got) == {net(p1), net(p2)}
    assert log == [f"{p3} {MAX_PREFIXES}", f"{p4} {MAX_PREFIXES}"]
    assert rib.stats(A) == PeerStats(received=4, accepted=2, rejected=2, rejected_total=2)
    # Re-announcing an accepted prefix does not lose its place.
    assert rib.apply(upd(A, ann(p1, C)), 0) == {net(p1): frozenset({C})}
    # A freed slot goes to the oldest waiting prefix.
    assert rib.apply(upd(A, withdraw=(p1,)), 0) == {net(p1): None, net(p3): frozenset({A})}
    # A policy-rejected route does not take a slot.
    rib.apply(upd(A, ann("10.245.0.0/26", A)), 0)
    assert rib.stats(A).accepted == 2
    # Lowering the limit sends the youngest back to waiting; raising it brings them back.
    assert rib.set_limits({A: 1}) == {net(p3): None}
    assert rib.set_limits({}) == {net(p3): frozenset({A}), net(p4): frozenset({A})}
    assert rib.stats(A).accepted == 3


def test_lowering_the_limit_keeps_admission_order_for_the_next_raise() -> None:
    rib = Rib(POLICY)
    rib.set_limits({A: 3})
    p1, p2, p3, p4 = (f"10.244.{i}.0/26" for i in (2, 3, 4, 5))
    rib.apply(upd(A, ann(p1, A), ann(p2, A), ann(p3, A), ann(p4, A)), 0)
    assert rib.set_limits({A: 1}) == {net(p2): None, net(p3): None}
    assert rib.set_limits({A: 2}) == {net(p2): frozenset({A})}  # the oldest waiting first
    assert rib.set_limits({A: 3}) == {net(p3): frozenset({A})}


def test_a_limit_given_to_a_peer_without_one_admits_in_arrival_order() -> None:
    rib = Rib(POLICY)
    p1, p2, p3 = (f"10.244.{i}.0/26" for i in (2, 3, 4))
    rib.apply(upd(A, ann(p3, A), ann("10.245.0.0/26", A), ann(p1, A), ann(p2, A)), 0)
    assert rib.stats(A) == PeerStats(received=4, accepted=3, rejected=1, rejected_total=1)
    assert rib.apply(upd(A, ann(p3, C)), 0) == {net(p3): frozenset({C})}  # keeps its place
    assert rib.set_limits({A: 2}) == {net(p2): None}
    assert rib.set_limits({}) == {net(p2): frozenset({A})}
    assert rib.stats(A) == PeerStats(received=4, accepted=3, rejected=1, rejected_total=2)
    assert rib.apply(upd(A, withdraw=(p2, "10.245.0.0/26")), 0) == {net(p2): None}
    assert rib.peer_down(A, False, 0, 0) == {net(p3): None, net(p1): None}


def test_limit_applies_per_peer() -> None:
    rib = Rib(POLICY)
    rib.set_limits({A: 1})
    rib.apply(upd(A, ann("10.244.2.0/26", A), ann("10.244.3.0/26", A)), 0)
    rib.apply(upd(B, ann("10.244.2.0/26", B), ann("10.244.3.0/26", B)), 0)
    assert (rib.stats(A).accepted, rib.stats(B).accepted) == (1, 2)
    assert rib.best()[net("10.244.3.0/26")] == frozenset({B})


# ---------------------------------------------------------- graceful restart


def loaded() -> Rib:
    rib = Rib(POLICY)
    rib.set_restart_times({A: 60})
    rib.apply(
        upd(A, ann("10.244.2.0/26", A), ann("10.244.3.0/26", A), ann("fd10::/122", "fd00::2")), 0
    )
    rib.apply(upd(B, ann("10.244.9.0/26", B)), 0)
    return rib


def test_graceful_loss_keeps_routes_until_end_of_rib() -> None:
    rib = loaded()
    before = rib.best()
    assert rib.apply(down(A, "closing connection"), 10) == {}
    assert rib.best() == before
    assert (rib.stats(A).stale, rib.stale_count()) == (3, 3)
    assert rib.apply(PeerState(A, SessionState.ESTABLISHED), 12) == {}
    assert rib.apply(upd(A, ann("10.244.2.0/26", A)), 12) == {}  # refreshed, same next hop
    assert rib.stats(A).stale == 2
    assert rib.apply(EndOfRib(A, "ipv4 unicast"), 13) == {net("10.244.3.0/26"): None}
    assert rib.stats(A).stale == 1  # the IPv6 route waits for the IPv6 End-of-RIB
    assert rib.apply(EndOfRib(A, "ipv6 unicast"), 13) == {net("fd10::/122"): None}
    assert rib.stale_count() == 0
    assert rib.apply(EndOfRib(A, "l2vpn evpn"), 14) == {}
    assert rib.expire(1000) == {}  # the deadline went with the last stale route


def test_stale_routes_expire_at_the_restart_time() -> None:
    rib = loaded()
    rib.apply(down(A, "closing connection"), 10)
    assert rib.expire(69.9) == {}
    assert rib.expire(70) == {
        net("10.244.2.0/26"): None,
        net("10.244.3.0/26"): None,
        net("fd10::/122"): None,
    }
    assert rib.peers() == [B]


def test_flapping_peer_cannot_push_the_deadline_later() -> None:
    rib = loaded()
    rib.apply(down(A, "closing connection"), 10)
    rib.apply(upd(A, ann("10.244.2.0/26", A)), 20)
    rib.apply(down(A, "closing connection"), 50)
    assert rib.stats(A).stale == 3
    assert len(rib.expire(70)) == 3


def test_a_peer_that_refreshed_every_route_gets_a_new_deadline() -> None:
    rib = loaded()
    rib.apply(down(A, "closing connection"), 10)
    rib.apply(upd(A, ann("10.244.2.0/26", A), ann("10.244.3.0/26", A)), 20)
    rib.apply(upd(A, ann("fd10::/122", "fd00::2")), 20)
    assert rib.stats(A).stale == 0  # nothing stale is left: no End-of-RIB needed
    rib.apply(down(A, "closing connection"), 50)
    assert rib.expire(70) == {}
    assert len(rib.expire(110)) == 3


@pytest.mark.parametrize(
    "reason",
    [
        "notification received (6,2)",
        "notification sent (4,0)",  # ExaBGP's hold timer expiry
        "peer reset, message [notification sent (4,0)] error[Hold timer expired]",
        "stop, message [shutdown]",
    ],
)
def test_loss_with_notification_drops_routes_at_once(reason: str) -> None:
    assert not graceful_down(reason)
    rib = loaded()
    got = rib.apply(down(A, reason), 10)
    assert set(got) == {net("10.244.2.0/26"), net("10.244.3.0/26"), net("fd10::/122")}
    assert set(got.values()) == {None}
    assert rib.peers() == [B]


@pytest.mark.parametrize(
    "reason", ["closing connection", "connection received before we could fully establish one", ""]
)
def test_loss_without_notification_is_graceful(reason: str) -> None:
    assert graceful_down(reason)


def test_notification_event_makes_the_next_loss_not_graceful() -> None:
    rib = loaded()
    rib.apply(PeerNotification(A, 6, 4, "administrative reset"), 10)
    assert len(rib.apply(down(A, "closing connection"), 10)) == 3
    # Only that loss: the next one of a re-established session is graceful again.
    rib.apply(upd(A, ann("10.244.2.0/26", A)), 11)
    assert rib.apply(down(A, "closing connection"), 12) == {}


def test_peer_down_without_restart_time_is_not_graceful() -> None:
    rib = loaded()
    assert len(rib.peer_down(A, True, 10, 0)) == 3


def test_speaker_restart_marks_everything_stale_until_each_end_of_rib() -> None:
    rib = loaded()
    assert rib.apply(SpeakerRestarted(1), 100) == {}
    assert rib.stale_count() == 4
    rib.apply(upd(B, ann("10.244.9.0/26", B)), 101)
    assert rib.apply(EndOfRib(B, "ipv4 unicast"), 101) == {}
    assert rib.stats(B).stale == 0
    # A never comes back: its routes go at its deadline (default 120 s for B, 60 s for A).
    assert len(rib.expire(160)) == 3
    assert rib.best() == {net("10.244.9.0/26"): frozenset({B})}


def test_unknown_peer_stats_and_routes() -> None:
    rib = Rib(POLICY)
    assert rib.stats(C) == PeerStats()
    assert rib.routes_from(C) == []
    assert rib.peer_down(C, False, 0, 0) == {}
    assert rib.sweep_stale(C) == {}


# ---------------------------------------------------------------- properties

PEERS = [A, B, C]
PREFIXES = [
    "10.244.2.0/26",
    "10.244.3.0/26",
    "10.244.1.8/30",
    "10.244.0.0/16",  # covers own
    "10.245.0.0/26",  # outside the narrow pool
    "fd10::/122",
    "0.0.0.0/0",
]
HOPS = [A, B, C, ME, addr("fd00::2")]
POLICIES = [
    POLICY,
    ImportPolicy(allowed=(net("10.0.0.0/8"), POOL6), own=frozenset({OWN}), allow_default=True),
    ImportPolicy(allowed=(net("10.244.2.0/24"),), own_addresses=frozenset({A})),
]

op = st.one_of(
    st.tuples(
        st.just("update"),
        st.sampled_from(PEERS),
        st.lists(
            st.tuples(
                st.sampled_from(PREFIXES), st.sampled_from(HOPS), st.integers(0, 3), st.booleans()
            ),
            max_size=5,
        ),
        st.lists(st.sampled_from(PREFIXES), max_size=2),
    ),
    st.tuples(
        st.just("down"),
        st.sampled_from(PEERS),
        st.sampled_from(["closing connection", "notification received (6,2)"]),
    ),
    st.tuples(
        st.just("eor"), st.sampled_from(PEERS), st.sampled_from(["ipv4 unicast", "ipv6 unicast"])
    ),
    st.tuples(st.just("tick"), st.integers(1, 80)),
    st.tuples(st.just("policy"), st.integers(0, len(POLICIES) - 1)),
    st.tuples(
        st.just("limits"),
        st.dictionaries(st.sampled_from(PEERS), st.one_of(st.none(), st.integers(1, 3))),
    ),
    st.tuples(
        st.just("restart"),
    ),
)


def brute_best(rib: Rib) -> dict[IPNetwork, frozenset[IPAddress]]:
    routes: dict[IPNetwork, list[Announce]] = {}
    for peer in rib.peers():
        for r in rib.routes_from(peer):
            if r.reason is None:
                routes.setdefault(r.announce.prefix, []).append(r.announce)
    out = {}
    for prefix, anns in routes.items():
        shortest = min(len(a.attrs.as_path) for a in anns)
        out[prefix] = frozenset(a.next_hop for a in anns if len(a.attrs.as_path) == shortest)
    return out


def diff(
    before: dict[IPNetwork, frozenset[IPAddress]], after: dict[IPNetwork, frozenset[IPAddress]]
) -> Changes:
    return {p: after.get(p) for p in before.keys() | after.keys() if before.get(p) != after.get(p)}


class Model:
    """What each peer's Adj-RIB-In must hold, with the stale marks and deadlines (RFC 4724)."""

    def __init__(self) -> None:
        self.routes: dict[IPAddress, dict[IPNetwork, Announce]] = {}
        self.stale: dict[IPAddress, set[IPNetwork]] = {}
        self.deadline: dict[IPAddress, float] = {}

    def drop(self, peer: IPAddress, prefixes: set[IPNetwork]) -> None:
        for p in prefixes:
            self.routes.get(peer, {}).pop(p, None)
            self.stale.get(peer, set()).discard(p)
        if not self.stale.get(peer):
            self.deadline.pop(peer, None)

    def mark(self, peer: IPAddress, now: float) -> None:
        if self.routes.get(peer):
            self.stale[peer] = set(self.routes[peer])
            self.deadline[peer] = min(self.deadline.get(peer, now + 120), now + 120)


@settings(max_examples=400, deadline=None)
@given(st.lists(op, max_size=40))
def test_rib_matches_brute_force_after_any_event_sequence(ops: list[tuple[Any, ...]]) -> None:
    rib, model, now = Rib(POLICY), Model(), 0.0
    policy, limits = POLICY, {}
    for o in ops:
        before = rib.best()
        kind = o[0]
        if kind == "update":
            _, peer, items, withdrawn = o
            anns = tuple(
                Announce(
                    net(p), nh, PathAttrs(as_path=(65000 + i,) * plen + ((64512,) if loop else ()))
                )
                for i, (p, nh, plen, loop) in enumerate(items)
            )
            got = rib.apply(PeerUpdate(peer, anns, tuple(net(w) for w in withdrawn)), now)
            table = model.routes.setdefault(peer, {})
            for w in withdrawn:
                model.drop(peer, {net(w)})
            for a in anns:
                table[a.prefix] = a
                model.stale.get(peer, set()).discard(a.prefix)
            if not model.stale.get(peer):
                model.deadline.pop(peer, None)
        elif kind == "down":
            _, peer, reason = o
            got = rib.apply(PeerState(peer, SessionState.DOWN, reason), now)
            if graceful_down(reason):
                model.mark(peer, now)
            else:
                model.drop(peer, set(model.routes.get(peer, {})))
        elif kind == "eor":
            _, peer, family = o
            got = rib.apply(EndOfRib(peer, family), now)
            v = 4 if family.startswith("ipv4") else 6
            model.drop(peer, {p for p in model.stale.get(peer, set()) if p.version == v})
        elif kind == "tick":
            now += o[1]
            got = rib.expire(now)
            for peer, end in list(model.deadline.items()):
                if end <= now:
                    model.drop(peer, set(model.stale[peer]))
        elif kind == "policy":
            policy = POLICIES[o[1]]
            got = rib.set_policy(policy)
        elif kind == "limits":
            limits = o[1]
            got = rib.set_limits(limits)
        else:
            got = rib.apply(SpeakerRestarted(1), now)
            for peer in PEERS:
                model.mark(peer, now)
        after = rib.best()
        assert got == diff(before, after)
        assert after == brute_best(rib)
        for peer in PEERS:
            routes = rib.routes_from(peer)
            assert {r.announce.prefix: r.announce for r in routes} == model.routes.get(peer, {})
            assert {r.announce.prefix for r in routes if r.stale} == model.stale.get(peer, set())
            accepted = sum(r.reason is None for r in routes)
            waiting = sum(r.reason == MAX_PREFIXES for r in routes)
            limit = limits.get(peer)
            assert limit is None or accepted <= limit
            assert waiting == 0 or accepted == limit, "a prefix waits while there is room"
            for r in routes:
                if r.reason != MAX_PREFIXES:
                    assert r.reason == policy.check(peer, r.announce)
                else:
                    assert policy.check(peer, r.announce) is None
            s = rib.stats(peer)
            assert (s.received, s.accepted, s.rejected, s.stale) == (
                len(routes),
                accepted,
                len(routes) - accepted,
                sum(r.stale for r in routes),
            )


# ---------------------------------------------------------------------- scale


def test_100k_prefixes_in_updates_of_25_stay_well_under_two_seconds() -> None:
    nets = [ipaddress.IPv4Network((0x0A000000 + i * 64, 26)) for i in range(100_001)]
    own = nets.pop(5000)
    policy = ImportPolicy(allowed=(net("10.0.0.0/8"),), own=frozenset({own}), local_as=64512)
    updates = [
        [
            PeerUpdate(
                peer,
                tuple(Announce(n, peer, PathAttrs(as_path=(65001,))) for n in nets[i : i + 25]),
            )
            for i in range(0, len(nets), 25)
        ]
        for peer in (A, B)
    ]
    rib = Rib(policy)
    t0 = time.process_time()
    changed = sum(len(rib.apply(u, 0)) for u in updates[0])
    first = time.process_time() - t0
    t0 = time.process_time()
    for u in updates[1]:
        rib.apply(u, 0)
    second = time.process_time() - t0
    t0 = time.process_time()
    gone = rib.peer_down(A, False, 0, 0)
    dropped = time.process_time() - t0
    print(
        f"\n100k prefixes: first peer {first:.2f} s, ECMP second peer {second:.2f} s, non-graceful loss {dropped:.2f} s CPU"
    )
    assert changed == len(nets)
    assert len(gone) == len(nets) and all(v == frozenset({B}) for v in gone.values())
    assert first < 2.0 and second < 2.0 and dropped < 2.0


def test_peer_without_preserved_forwarding_is_flushed_on_a_clean_loss() -> None:
    """FRR in helper mode lists no family in its graceful-restart capability: its FIB dies
    with it, so its routes are dropped at once even without a NOTIFICATION."""
    rib = loaded()
    rib.apply(PeerGracefulRestart(A, 120, frozenset()), 0)
    changes = rib.apply(down(A, "closing connection"), 10)
    assert set(changes) == {net("10.244.2.0/26"), net("10.244.3.0/26"), net("fd10::/122")}
    assert rib.stats(A).stale == 0


def test_peer_without_the_capability_is_flushed_on_a_clean_loss() -> None:
    rib = loaded()
    rib.apply(PeerGracefulRestart(A, None), 0)
    assert rib.apply(down(A, "closing connection"), 10)
    assert not rib.routes_from(A)


def test_peer_preserving_forwarding_keeps_stale_for_its_own_restart_time() -> None:
    """A peer that preserves forwarding (a fabric node's ExaBGP) keeps its routes stale,
    for the shorter of its announced restart time and ours (60 s here)."""
    rib = loaded()
    rib.apply(PeerGracefulRestart(A, 20, frozenset({"ipv4 unicast"})), 0)
    assert rib.apply(down(A, "closing connection"), 10) == {}
    assert rib.stats(A).stale == 3
    assert rib.expire(29) == {}
    assert set(rib.expire(31)) == {net("10.244.2.0/26"), net("10.244.3.0/26"), net("fd10::/122")}
