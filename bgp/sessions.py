"""What each configured session of the speaker is doing, as ``fabricctl bgp status`` shows
it: its state, and while it is not up, the current run of connection attempts (since when,
how many, how the last one failed, a hint where the peer fails silently). Pure: fed with
ExaBGP's events by ``bgp.speaker`` and with the kernel's view (``bgp.tcpstate``) by its
periodic probe; ``time.time()`` is read here for ``since``.

Sources, and what they can tell (ExaBGP 5.0.15):
- ``state connected`` / ``up`` / ``down <reason>``: ExaBGP reports "connected" once its
  connect() returned, even when the peer refused (then "down: closing connection" follows
  within milliseconds with no OPEN). "notification sent (4,0)" is our hold timer,
  "notification sent (1,1)" its OPEN wait timer (no OPEN from the peer).
- a received OPEN (``PeerGracefulRestart``) and a received NOTIFICATION (``PeerNotification``).
- the kernel: a socket to the peer in SYN-SENT is an attempt the peer does not answer
  (ExaBGP says nothing then); drop counters for MD5 and minimum TTL on this host.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from bgp.model import (
    Event,
    IPAddress,
    PeerGracefulRestart,
    PeerNotification,
    PeerState,
    SessionState,
)
from bgp.tcpstate import Conn

_INFO = {SessionState.CONNECTED: "Connected", SessionState.ESTABLISHED: "Established"}
NO_ANSWER_HINT = (
    "no answer: check the password and TTL security on the peer (its kernel drops such "
    "packets silently and counts them: TCPMD5Failure / TCPMinTTLDrop), or a filter"
)
ONE_WAY_HINT = (
    "the peer's OPEN arrived but it never answered ours: TTL security (GTSM) on the peer "
    "only (its kernel counts TCPMinTTLDrop), or a filter dropping our packets"
)
BEFORE_OPEN_HINT = (
    "the connection ends before the peer's OPEN: nothing listens (its BGP is down), or it "
    "does not accept us (address or AS not configured, TTL security (GTSM) or a password on "
    "one side only)"
)
REFUSED_HINT = "nothing listens on the peer's BGP port: is its BGP running and configured?"
BEFORE_OPEN = "connection refused or reset before the peer's OPEN"
REFUSED = "connection refused (the peer answered our SYN with a reset)"
SYN_QUIET = 2.0  # s: a SYN unanswered this long is "no answer", not a handshake in flight
# RFC 4271 section 4.5 codes, RFC 4486 Cease subcodes
_CODES = {1: "message header error", 2: "OPEN message error", 3: "UPDATE message error",
          4: "hold timer expired", 5: "FSM error", 6: "cease"}  # fmt: skip
_SUBCODES = {
    (2, 1): "unsupported version", (2, 2): "bad peer AS", (2, 3): "bad BGP identifier",
    (2, 4): "unsupported optional parameter", (2, 6): "unacceptable hold time",
    (2, 7): "unsupported capability", (6, 1): "maximum prefixes reached",
    (6, 2): "administrative shutdown", (6, 3): "peer de-configured",
    (6, 4): "administrative reset", (6, 5): "connection rejected",
    (6, 6): "other configuration change", (6, 7): "connection collision resolution",
    (6, 8): "out of resources", (6, 9): "hard reset",
}  # fmt: skip
_SENT = re.compile(r"notification sent \((\d+),(\d+)\)")


def notification_text(code: int, subcode: int) -> str:
    name = _CODES.get(code, "unknown code")
    sub = _SUBCODES.get((code, subcode))
    return f"{code}/{subcode} ({name}{': ' + sub if sub else ''})"


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """One session as ``fabricctl bgp status`` shows it; times are ``time.time()``.

    While the session is not up: ``connecting_since`` (first attempt of the current run),
    ``attempts`` (connection attempts in that run), ``last_failure`` and ``hint``.
    ``failures`` counts every failed attempt since the speaker was created (the metric)."""

    state: SessionState
    since: float
    info: str
    attempts: int = 0
    connecting_since: float | None = None
    last_failure: str = ""
    hint: str = ""
    failures: int = 0


@dataclass(slots=True)
class _Run:
    """The current run of attempts of one session (reset when it comes up)."""

    attempts: int = 0
    since: float | None = None
    last_failure: str = ""
    hint: str = ""
    failures: int = 0  # total, never reset
    open_seen: bool = False  # the current connection received the peer's OPEN
    notification: tuple[int, int] | None = None  # received on the current connection
    syn: dict[int, float] = field(default_factory=dict)  # local port -> first seen SYN-SENT
    drops: dict[str, int] = field(default_factory=dict)  # drop counters at the run's start


class SessionBook:
    """The status of every configured session (see the module docstring)."""

    def __init__(self) -> None:
        self._status: dict[IPAddress, SessionStatus] = {}
        self._runs: dict[IPAddress, _Run] = {}
        self._refused = 0  # AttemptFails at the last probe
        self._before_open: set[IPAddress] = set()  # failed before OPEN since the last probe

    def configure(self, peers: Iterable[IPAddress]) -> None:
        """The configured sessions: new ones start idle, kept ones keep their status."""
        now = time.time()
        self._status = {
            ip: self._status.get(ip) or SessionStatus(SessionState.IDLE, now, "Idle")
            for ip in peers
        }
        self._runs = {ip: self._runs.get(ip) or _Run(since=now) for ip in self._status}

    def restarting(self) -> None:
        """ExaBGP exited: every session is idle until the new one reports."""
        now = time.time()
        for ip in self._status:
            self._set(ip, SessionState.IDLE, now, "Idle: restarting")
            run = self._runs[ip]
            if run.since is None:
                run.since = now

    def on_event(self, ev: Event) -> None:
        if isinstance(ev, PeerState):
            self.on_state(ev)
        elif isinstance(ev, PeerNotification) and ev.peer in self._runs:
            self._runs[ev.peer].notification = (ev.code, ev.subcode)
        elif isinstance(ev, PeerGracefulRestart) and ev.peer in self._runs:
            self._runs[ev.peer].open_seen = True  # one per OPEN received

    def on_state(self, ev: PeerState) -> None:
        if ev.peer not in self._status:
            return
        now, run = time.time(), self._runs[ev.peer]
        was = self._status[ev.peer].state
        info = _INFO.get(ev.state) or (f"down: {ev.reason}" if ev.reason else "down")
        if ev.state is SessionState.ESTABLISHED:
            run.attempts, run.since, run.last_failure, run.hint = 0, None, "", ""
            run.syn.clear()
            run.drops = {}  # the next run takes its own baseline
        elif ev.state is SessionState.CONNECTED:
            if run.since is None:
                run.since = now
            if run.syn:  # the SYN we saw waiting was answered: same attempt
                run.syn.clear()
            else:
                run.attempts += 1
            run.open_seen, run.notification = False, None
        elif was is SessionState.ESTABLISHED:  # an established session lost
            run.since, run.attempts, run.hint = now, 0, ""
            run.last_failure = "session lost: " + self._why(run, ev.reason)
        else:  # an attempt failed
            run.failures += 1
            run.last_failure = self._why(run, ev.reason)
            run.hint = ""
            if run.open_seen and ev.reason == "notification sent (4,0)":
                run.hint = ONE_WAY_HINT
            elif run.last_failure == BEFORE_OPEN:
                run.hint = BEFORE_OPEN_HINT
            if run.last_failure == BEFORE_OPEN:
                self._before_open.add(ev.peer)
        self._set(ev.peer, ev.state, now, info)

    @staticmethod
    def _why(run: _Run, reason: str) -> str:
        """Plain words for how a connection ended."""
        if run.notification is not None:
            return "NOTIFICATION received " + notification_text(*run.notification)
        if m := _SENT.fullmatch(reason):
            code, sub = int(m.group(1)), int(m.group(2))
            if (code, sub) == (1, 1) and not run.open_seen:
                return "no answer to OPEN (NOTIFICATION 1/1 sent after ExaBGP's open wait)"
            if code == 4:
                return "hold timer expired (NOTIFICATION 4/0 sent)"
            return "NOTIFICATION sent " + notification_text(code, sub)
        if not run.open_seen:
            return BEFORE_OPEN + (
                f" ({reason})" if reason and reason != "closing connection" else ""
            )
        return f"connection closed or reset ({reason or 'no reason given'})"

    def probe(
        self,
        conns: Iterable[Conn],
        drops: Mapping[str, int],
        targets: Mapping[IPAddress, tuple[int, bool]],
        now: float | None = None,
    ) -> None:
        """The kernel's view: ``conns`` (every TCP socket of ExaBGP's namespace), ``drops``
        (its MD5/TTL drop counters) and, per session, (peer port, passive). A socket to the
        peer waiting in SYN-SENT is an attempt the peer does not answer."""
        now = time.time() if now is None else now
        # ExaBGP reports a refused connect as "connected" then "closing connection"; the
        # namespace's AttemptFails counter tells a refusal from a reset, when one session
        # alone failed that way since the last probe
        refused, self._refused = (
            drops.get("AttemptFails", 0) - self._refused,
            drops.get("AttemptFails", 0),
        )
        if refused > 0 and len(self._before_open) == 1:
            run = self._runs.get(next(iter(self._before_open)))
            if run is not None and run.last_failure == BEFORE_OPEN:
                run.last_failure, run.hint = REFUSED, REFUSED_HINT
        self._before_open.clear()
        waiting: dict[IPAddress, set[int]] = {}
        for c in conns:
            if c.state == "SYN_SENT" and targets.get(c.remote, (-1,))[0] == c.remote_port:
                waiting.setdefault(c.remote, set()).add(c.local_port)
        for ip, run in self._runs.items():
            st = self._status.get(ip)
            if st is None or st.state is SessionState.ESTABLISHED:
                continue
            if run.since is None:
                run.since = now
            if not run.drops:  # the counters when this run was first probed
                run.drops = dict(drops)
            ports = waiting.get(ip, set())
            for gone in set(run.syn) - ports:  # no CONNECTED came: it timed out
                del run.syn[gone]
                run.failures += 1
                run.last_failure = "timed out: the peer never answered our TCP SYN"
            for port in ports - set(run.syn):
                run.syn[port] = now
                run.attempts += 1
            if any(now - t >= SYN_QUIET for t in run.syn.values()):
                first = min(run.syn.values())
                run.last_failure = f"no answer to our TCP SYN for {now - first:.0f} s"
                run.hint = NO_ANSWER_HINT + self._drops_hint(run, drops)
                st = replace(st, info="Connect: no answer")
            elif (
                not run.syn
                and targets.get(ip, (0, False))[1]
                and st.state is not (SessionState.CONNECTED)
            ):
                run.hint = "passive: waiting for the peer to connect" + self._drops_hint(run, drops)
            self._status[ip] = self._with_run(st, run)

    @staticmethod
    def _drops_hint(run: _Run, drops: Mapping[str, int]) -> str:
        d = {k: v - run.drops.get(k, v) for k, v in drops.items()}
        md5 = d.get("TCPMD5NotFound", 0) + d.get("TCPMD5Unexpected", 0)
        md5 += d.get("TCPMD5Failure", 0)
        out = ""
        if md5 > 0:
            out += (
                f"; this host dropped {md5} segments failing TCP MD5 (wrong key, or a key on "
                "one side only)"
            )
        if d.get("TCPMinTTLDrop", 0) > 0:
            out += (
                f"; this host dropped {d['TCPMinTTLDrop']} segments below the minimum TTL (the "
                "peer does not send with TTL 255, or is more hops away than ttlSecurity)"
            )
        return out

    def _set(self, ip: IPAddress, state: SessionState, since: float, info: str) -> None:
        self._status[ip] = self._with_run(SessionStatus(state, since, info), self._runs[ip])

    @staticmethod
    def _with_run(st: SessionStatus, run: _Run) -> SessionStatus:
        up = st.state is SessionState.ESTABLISHED
        return SessionStatus(
            st.state,
            st.since,
            st.info,
            attempts=0 if up else run.attempts,
            connecting_since=None if up else run.since,
            last_failure="" if up else run.last_failure,
            hint="" if up else run.hint,
            failures=run.failures,
        )

    def established(self) -> list[IPAddress]:
        return [ip for ip, st in self._status.items() if st.state is SessionState.ESTABLISHED]

    def pending(self) -> bool:
        """Some session is not up (the speaker probes the kernel while this holds)."""
        return any(st.state is not SessionState.ESTABLISHED for st in self._status.values())

    def snapshot(self) -> dict[IPAddress, SessionStatus]:
        return dict(self._status)
