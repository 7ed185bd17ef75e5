"""bgp.adjout: the desired-vs-sent diff and the command queue (pure; the speaker tests run
the same code against a real ExaBGP)."""

from __future__ import annotations

import ipaddress

from bgp.adjout import AdjRibOut, Command
from bgp.model import Advert

ip = ipaddress.ip_address
net = ipaddress.ip_network
PEER = ip("10.77.1.1")


def adverts(n: int, base: str = "10.100.0.0", **kw: object) -> list[Advert]:
    start = int(ipaddress.IPv4Address(base))
    return [Advert(ipaddress.IPv4Network((start + i, 32)), **kw) for i in range(n)]  # type: ignore[arg-type]


def drain(rib: AdjRibOut, ok: bool = True) -> list[str]:
    """Send everything, acking each command as ExaBGP would (in order)."""
    out = []
    while (cmd := rib.next_command(idle=True)) is not None:
        if cmd.adds or cmd.dels:
            rib.on_sent(cmd)
        rib.settle(cmd, ok)
        out.append(cmd.text)
    return out


def fresh_rib(desired: list[Advert]) -> AdjRibOut:
    rib = AdjRibOut()
    rib.keep_peers({PEER})
    rib.set_desired({a.prefix: a for a in desired})
    return rib


def test_initial_announce_batches_and_acks() -> None:
    want = adverts(250) + adverts(2, "10.200.0.0", communities=("65000:1",))
    rib = fresh_rib(want)
    cmds = drain(rib)
    assert [len(c.split(" nlri ")[1].split()) for c in cmds] == [100, 100, 50, 2]
    assert "community [ 65000:1 ]" in cmds[3]
    assert rib.acked == rib.sent == {a.prefix: a for a in want}
    assert drain(rib) == [] and rib.quiet()


def test_diff_sends_only_changes_withdrawals_first_one_family_per_line() -> None:
    v6 = Advert(net("fd99:1::/64"), ip("fd77:1::2"))
    rib = fresh_rib([*adverts(3), v6])
    drain(rib)
    moved = Advert(net("10.100.0.1/32"), ip("10.77.1.9"))
    rib.set_desired({a.prefix: a for a in [adverts(1)[0], moved, Advert(net("10.1.0.0/24"))]})
    assert drain(rib) == [
        "withdraw attributes nlri 10.100.0.2/32",
        "withdraw attributes nlri fd99:1::/64",
        "announce attributes next-hop 10.77.1.9 nlri 10.100.0.1/32",
        "announce attributes next-hop self nlri 10.1.0.0/24",
    ]
    # coalescing: two changes before anything is sent give one diff against what was sent
    rib.set_desired({})
    rib.set_desired({a.prefix: a for a in adverts(1)})
    assert drain(rib) == ["withdraw attributes nlri 10.100.0.1/32 10.1.0.0/24"]


def test_refused_command_reverts_and_waits_for_next_change() -> None:
    rib = fresh_rib(adverts(2))
    cmd = rib.next_command(idle=True)
    assert cmd is not None
    rib.on_sent(cmd)
    assert set(rib.sent) == {a.prefix for a in adverts(2)}
    rib.settle(cmd, ok=False)
    assert rib.sent == {} and rib.acked == {}
    assert rib.next_command(idle=True) is None  # not retried in a loop
    rib.set_desired(dict(rib.desired))
    assert len(drain(rib)) == 1 and len(rib.acked) == 2


def test_no_neighbor_means_nothing_to_send() -> None:
    rib = AdjRibOut()
    rib.set_desired({a.prefix: a for a in adverts(3)})
    assert rib.next_command(idle=True) is None
    assert len(rib.acked) == 3  # every (absent) RIB agrees


def test_eor_after_routes_and_only_when_idle() -> None:
    rib = fresh_rib(adverts(150))
    rib.session_up(PEER, ["ipv4 unicast", "ipv6 unicast"])
    first = rib.next_command(idle=True)
    assert first is not None and first.text.startswith("announce attributes")
    rib.on_sent(first)
    second = rib.next_command(idle=False)
    assert second is not None and second.text.startswith("announce attributes")
    rib.on_sent(second)
    assert rib.next_command(idle=False) is None  # EOR waits until nothing is outstanding
    eor = rib.next_command(idle=True)
    assert isinstance(eor, Command) and eor.exclusive
    assert eor.text == "neighbor 10.77.1.1 announce eor ipv4 unicast"
    assert drain(rib) == ["neighbor 10.77.1.1 announce eor ipv6 unicast"]
    rib.session_up(PEER, ["ipv4 unicast"])  # every (re)establishment ends with an EOR
    rib.session_down(PEER)
    assert drain(rib) == []


def test_no_eor_before_the_desired_set_is_declared() -> None:
    """fabricd starting: the session may come up before the agent said what to announce;
    an EOR then would make a graceful-restart helper drop the routes it kept for us."""
    rib = AdjRibOut()
    rib.keep_peers({PEER})
    rib.session_up(PEER, ["ipv4 unicast"])
    assert rib.next_command(idle=True) is None and rib.quiet()  # held, not queued
    rib.set_desired({a.prefix: a for a in adverts(2)})
    assert not rib.quiet()
    assert drain(rib) == [
        "announce attributes next-hop self nlri 10.100.0.0/32 10.100.0.1/32",
        "neighbor 10.77.1.1 announce eor ipv4 unicast",
    ]
    # a new ExaBGP (reset) keeps the declared set: its EORs follow the re-announcement
    rib.reset()
    rib.session_up(PEER, ["ipv4 unicast"])
    assert drain(rib) == [
        "announce attributes next-hop self nlri 10.100.0.0/32 10.100.0.1/32",
        "neighbor 10.77.1.1 announce eor ipv4 unicast",
    ]
    # declaring an empty set is a declaration too: nothing to announce, EOR at once
    empty = AdjRibOut()
    empty.keep_peers({PEER})
    empty.session_up(PEER, ["ipv4 unicast"])
    empty.set_desired({})
    assert drain(empty) == ["neighbor 10.77.1.1 announce eor ipv4 unicast"]


def test_fresh_neighbor_gets_everything_scoped_then_eor() -> None:
    rib = fresh_rib([*adverts(120), Advert(net("10.1.0.0/24"), None, ("65000:2",))])
    drain(rib)
    new = ip("10.77.2.1")
    rib.keep_peers({PEER, new})
    rib.mark_fresh([new])
    rib.session_up(new, ["ipv4 unicast"])
    rib.set_desired({a.prefix: a for a in adverts(120)[1:]})  # one withdrawn meanwhile
    cmds = drain(rib)
    assert cmds[0] == "withdraw attributes nlri 10.100.0.0/32 10.1.0.0/24"
    assert cmds[1].startswith("neighbor 10.77.2.1 announce attributes next-hop self nlri ")
    scoped = " ".join(c.split(" nlri ")[1] for c in cmds[1:3]).split()
    assert sorted(scoped) == sorted(str(a.prefix) for a in adverts(120)[1:])
    assert cmds[3:] == ["neighbor 10.77.2.1 announce eor ipv4 unicast"]


def test_resync_sends_end_of_rib_again_after_the_routes() -> None:
    """A replaced relay may have swallowed an EOR in flight: every established session
    gets one again, after the re-sent routes."""
    rib = fresh_rib(adverts(2))
    rib.session_up(PEER, ["ipv4 unicast"])
    cmds = drain(rib)
    assert cmds[-1] == "neighbor 10.77.1.1 announce eor ipv4 unicast"
    rib.resync([], {PEER: ("ipv4 unicast",)})
    assert drain(rib) == [
        "announce attributes next-hop self nlri 10.100.0.0/32 10.100.0.1/32",
        "neighbor 10.77.1.1 announce eor ipv4 unicast",
    ]


def test_resync_resends_all_and_withdraws_the_rest() -> None:
    rib = fresh_rib(adverts(3))
    drain(rib)
    rib.set_desired({a.prefix: a for a in adverts(2)})
    rib.resync(["neighbor 10.77.1.1 announce route-refresh ipv4 unicast"])
    assert drain(rib) == [
        "withdraw attributes nlri 10.100.0.2/32",
        "announce attributes next-hop self nlri 10.100.0.0/32 10.100.0.1/32",
        "neighbor 10.77.1.1 announce route-refresh ipv4 unicast",
    ]
    assert set(rib.acked) == {a.prefix for a in adverts(2)}
