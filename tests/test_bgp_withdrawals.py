"""Tests of the merging of withdrawal-only UPDATEs (pure, no I/O): the events passed on, and
that a RIB fed the merged run ends where one fed the UPDATEs one by one does."""

from __future__ import annotations

import ipaddress
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from bgp import interned
from bgp.import_policy import ImportPolicy
from bgp.model import Announce, Event, IPNetwork, PathAttrs, PeerState, PeerUpdate, SessionState
from bgp.rib import Rib
from bgp.withdrawals import WithdrawalRun

A, B = interned.address("10.0.0.2"), interned.address("10.0.0.3")
POLICY = ImportPolicy(allowed=(ipaddress.ip_network("10.100.0.0/16"),), local_as=64512)


def p(i: int) -> IPNetwork:
    return interned.nlri4(bytes([32, 10, 100, i >> 8, i & 255]))


def withdraw(peer: ipaddress.IPv4Address, *ids: int) -> PeerUpdate:
    return PeerUpdate(peer, (), tuple(p(i) for i in ids))


def announce(peer: ipaddress.IPv4Address, *ids: int) -> PeerUpdate:
    return PeerUpdate(peer, tuple(Announce(p(i), peer, PathAttrs(as_path=(65010,))) for i in ids))


def run(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    held = WithdrawalRun(out.append)
    for ev in events:
        if not held.take(ev):
            out.append(ev)
    held.release()
    return out


def test_a_peers_consecutive_withdrawals_become_one_update_in_hash_order() -> None:
    out = run([withdraw(A, 5, 1, 9), withdraw(A, 7, 2)])
    assert out == [PeerUpdate(A, (), tuple(sorted(map(p, (5, 1, 9, 7, 2)), key=hash)))]


def test_anything_else_releases_the_run_first_and_keeps_the_order() -> None:
    down = PeerState(A, SessionState.DOWN)
    events: list[Event] = [withdraw(A, 3), announce(A, 4), withdraw(A, 5), down, withdraw(A, 6)]
    out = run(events)
    assert out == [withdraw(A, 3), announce(A, 4), withdraw(A, 5), down, withdraw(A, 6)]
    # an UPDATE that announces and withdraws is passed on as it is, after what was held
    mixed = PeerUpdate(A, announce(A, 8).announced, (p(9),))
    assert run([withdraw(A, 1), mixed]) == [withdraw(A, 1), mixed]


def test_another_peers_withdrawal_releases_the_run() -> None:
    assert run([withdraw(A, 1, 2), withdraw(B, 3), withdraw(A, 4)]) == [
        withdraw(A, *sorted((1, 2), key=lambda i: hash(p(i)))),
        withdraw(B, 3),
        withdraw(A, 4),
    ]


def test_a_run_is_released_when_it_reaches_max() -> None:
    out: list[Event] = []
    held = WithdrawalRun(out.append)
    held.MAX = 4
    assert held.take(withdraw(A, 1, 2)) and held.holding and not out
    assert held.take(withdraw(A, 3, 4)) and not held.holding
    assert len(out) == 1 and len(out[0].withdrawn) == 4  # type: ignore[attr-defined]
    held.release()  # nothing held: nothing emitted
    assert len(out) == 1


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_rib_fed_merged_runs_ends_as_one_fed_update_by_update(data: st.DataObject) -> None:
    ids = list(range(300))
    events: list[Event] = [announce(A, *ids[:200]), announce(B, *ids[100:300])]
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    for _ in range(data.draw(st.integers(1, 12))):
        peer = A if rng.random() < 0.6 else B
        picked = rng.sample(ids, rng.randint(1, 40))
        events.append(withdraw(peer, *picked) if rng.random() < 0.8 else announce(peer, *picked))
    one, merged = Rib(POLICY), Rib(POLICY)
    best_one: dict[IPNetwork, object] = {}
    best_merged: dict[IPNetwork, object] = {}
    for ev in events:
        best_one.update(one.apply(ev, 0.0))
    for ev in run(events):
        best_merged.update(merged.apply(ev, 0.0))
    assert merged.best() == one.best()
    assert best_merged == best_one  # the changes reported add up to the same
    assert {peer: merged.routes_from(peer) for peer in (A, B)} == {
        peer: one.routes_from(peer) for peer in (A, B)
    }
