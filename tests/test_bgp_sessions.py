"""bgp.sessions and bgp.tcpstate: how a session that is not up is described (pure; the
strict-ToR lab test drives the same code with real ExaBGP, BIRD and FRR)."""

from __future__ import annotations

import ipaddress

from bgp.model import PeerGracefulRestart, PeerNotification, PeerState, SessionState
from bgp.sessions import NO_ANSWER_HINT, ONE_WAY_HINT, REFUSED, SessionBook
from bgp.tcpstate import Conn, parse_netstat, parse_tcp

ip = ipaddress.ip_address
PEER = ip("10.77.1.1")
LOCAL = ip("10.77.1.2")
TARGETS = {PEER: (179, False)}


def book() -> SessionBook:
    b = SessionBook()
    b.configure([PEER])
    return b


def state(st: SessionState, reason: str = "") -> PeerState:
    return PeerState(PEER, st, reason)


def test_established_clears_the_run_and_a_loss_starts_one() -> None:
    b = book()
    b.on_event(state(SessionState.CONNECTED))
    b.on_event(PeerGracefulRestart(PEER, 120))  # the peer's OPEN
    b.on_event(state(SessionState.ESTABLISHED))
    up = b.snapshot()[PEER]
    assert (up.attempts, up.connecting_since, up.last_failure, up.failures) == (0, None, "", 0)
    b.on_event(state(SessionState.DOWN, "notification sent (4,0)"))
    down = b.snapshot()[PEER]
    assert down.last_failure == "session lost: hold timer expired (NOTIFICATION 4/0 sent)"
    assert down.connecting_since is not None and down.failures == 0  # not a failed attempt


def test_failed_attempts_are_counted_and_explained() -> None:
    b = book()
    b.on_event(state(SessionState.CONNECTED))
    b.on_event(state(SessionState.DOWN, "closing connection"))  # no OPEN: refused or reset
    st = b.snapshot()[PEER]
    assert (st.attempts, st.failures) == (1, 1)
    assert st.last_failure == "connection refused or reset before the peer's OPEN"
    b.on_event(state(SessionState.CONNECTED))
    b.on_event(PeerGracefulRestart(PEER, 120))
    b.on_event(PeerNotification(PEER, 2, 2, "bad peer AS"))
    b.on_event(state(SessionState.DOWN, "notification received (2,2)"))
    st = b.snapshot()[PEER]
    assert (st.attempts, st.failures) == (2, 2)
    assert st.last_failure == "NOTIFICATION received 2/2 (OPEN message error: bad peer AS)"
    b.on_event(state(SessionState.CONNECTED))
    b.on_event(state(SessionState.DOWN, "notification sent (1,1)"))
    assert b.snapshot()[PEER].last_failure.startswith("no answer to OPEN")
    # GTSM at the peer only: its OPEN arrives, ours never does; our hold timer expires
    b.on_event(state(SessionState.CONNECTED))
    b.on_event(PeerGracefulRestart(PEER, 120))
    b.on_event(state(SessionState.DOWN, "notification sent (4,0)"))
    st = b.snapshot()[PEER]
    assert st.last_failure == "hold timer expired (NOTIFICATION 4/0 sent)"
    assert st.hint == ONE_WAY_HINT and st.attempts == 4
    b.restarting()  # an ExaBGP restart keeps the run
    assert b.snapshot()[PEER].attempts == 4 and b.snapshot()[PEER].info == "Idle: restarting"


def test_unanswered_syn_is_seen_in_the_kernel_and_hinted() -> None:
    b = book()
    syn = [Conn(LOCAL, 40001, PEER, 179, "SYN_SENT")]
    drops = {"TCPMD5Failure": 0, "TCPMinTTLDrop": 5, "AttemptFails": 0}
    b.probe(syn, drops, TARGETS, now=1000.0)
    st = b.snapshot()[PEER]
    assert st.attempts == 1 and st.hint == ""  # a handshake may be in flight
    b.probe(syn, {**drops, "TCPMinTTLDrop": 8}, TARGETS, now=1003.0)
    st = b.snapshot()[PEER]
    assert st.last_failure == "no answer to our TCP SYN for 3 s" and st.info == "Connect: no answer"
    assert (
        st.hint.startswith(NO_ANSWER_HINT) and "dropped 3 segments below the minimum TTL" in st.hint
    )
    # the kernel gave up on that socket (no CONNECTED came): a timed-out attempt
    b.probe([Conn(LOCAL, 40002, PEER, 179, "SYN_SENT")], drops, TARGETS, now=1130.0)
    st = b.snapshot()[PEER]
    assert (st.attempts, st.failures) == (2, 1)
    # another port or peer is not ours
    b.probe([Conn(LOCAL, 40003, PEER, 1179, "SYN_SENT")], drops, TARGETS, now=1131.0)
    assert b.snapshot()[PEER].attempts == 2


def test_refused_is_told_from_reset_by_attempt_fails() -> None:
    b = book()
    b.probe([], {"AttemptFails": 10}, TARGETS, now=1.0)
    b.on_event(state(SessionState.CONNECTED))
    b.on_event(state(SessionState.DOWN, "closing connection"))
    b.probe([], {"AttemptFails": 11}, TARGETS, now=2.0)
    assert b.snapshot()[PEER].last_failure == REFUSED


def test_proc_net_parsing() -> None:
    tcp = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 02014D0A:9C41 01014D0A:00B3 02 00000000:00000000 01:00000000 00000000     0\n"
    )
    (c,) = parse_tcp(tcp)
    assert c == Conn(ip("10.77.1.2"), 40001, ip("10.77.1.1"), 179, "SYN_SENT")
    tcp6 = (
        "  sl  local_address                         remote_address                        st\n"
        "   0: 000077FD000000000000000002000000:9C41 000077FD000000000000000001000000:00B3 01\n"
    )
    (c6,) = parse_tcp(tcp6)
    assert (c6.local, c6.remote, c6.state) == (ip("fd77::2"), ip("fd77::1"), "ESTABLISHED")
    netstat = "TcpExt: SyncookiesSent TCPMinTTLDrop\nTcpExt: 0 7\nIpExt: InNoRoutes\nIpExt: 1\n"
    assert parse_netstat(netstat) == {"SyncookiesSent": 0, "TCPMinTTLDrop": 7}
    assert parse_netstat(netstat, "IpExt") == {"InNoRoutes": 1}
