"""What each configured session of the speaker is doing, as ``fabricctl bgp status`` shows
it. Pure: fed with ExaBGP's neighbor-changes events by ``bgp.speaker``; ``since`` is
``time.time()``, read here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from bgp.model import IPAddress, PeerState, SessionState

_INFO = {SessionState.CONNECTED: "Connected", SessionState.ESTABLISHED: "Established"}


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """One session as ``fabricctl bgp status`` shows it; ``since`` is ``time.time()``."""

    state: SessionState
    since: float
    info: str


class SessionBook:
    """The status of every configured session, from ExaBGP's state events."""

    def __init__(self) -> None:
        self._status: dict[IPAddress, SessionStatus] = {}

    def configure(self, peers: Iterable[IPAddress]) -> None:
        """The configured sessions: new ones start idle, kept ones keep their status."""
        now = time.time()
        self._status = {
            ip: self._status.get(ip) or SessionStatus(SessionState.IDLE, now, "Idle")
            for ip in peers
        }

    def restarting(self) -> None:
        """ExaBGP exited: every session is idle until the new one reports."""
        now = time.time()
        for ip in self._status:
            self._status[ip] = SessionStatus(SessionState.IDLE, now, "Idle: restarting")

    def on_state(self, ev: PeerState) -> None:
        if ev.peer not in self._status:
            return
        info = _INFO.get(ev.state) or (f"down: {ev.reason}" if ev.reason else "down")
        self._status[ev.peer] = SessionStatus(ev.state, time.time(), info)

    def established(self) -> list[IPAddress]:
        return [ip for ip, st in self._status.items() if st.state is SessionState.ESTABLISHED]

    def snapshot(self) -> dict[IPAddress, SessionStatus]:
        return dict(self._status)
