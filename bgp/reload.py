"""The checked reload of ExaBGP's configuration (part of ``bgp.speaker``).

ExaBGP 5.0.15 silently skips a ``reload`` while any neighbor has routes waiting to go out
(``_pending_adjribout()`` in ``reactor/loop.py``), and still answers ``done``. So a reload
is followed by ``show neighbor configuration``: every neighbor's description ends with the
generation of the file (``<name> gen <n>``), and the reload counts once each configured
peer shows the expected one. Otherwise it is sent again after 0.2 s, doubling to 5 s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from enum import StrEnum

from bgp import codec
from bgp.adjout import Command
from bgp.model import IPAddress


class Reload(StrEnum):
    """Where a pending reconfigure stands (``None``: no reload pending)."""

    SEND = "send"  # to be sent once the command window is empty
    SENT = "sent"  # `reload` sent, its ack awaited
    VERIFY = "verify"  # acked: `show neighbor configuration` to be sent
    VERIFYING = "verifying"  # its lines are being collected
    WAIT = "wait"  # ExaBGP skipped it: a retry is scheduled


class ReloadCheck:
    """``state`` is a ``Reload``, or None when nothing is pending. The speaker asks for
    ``command(idle)`` before its routes while ``wants_window``."""

    def __init__(self, log: logging.Logger, wake: Callable[[], None]) -> None:
        self.log = log
        self.wake = wake  # schedule the speaker's pump
        self.state: Reload | None = None
        self.tries = 0
        self.generation = 0
        self.peers: Collection[IPAddress] = ()
        self.done = asyncio.Event()  # the current generation runs (or none is pending)
        self._collect: list[str] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.reset()

    def request(self, generation: int, peers: Collection[IPAddress]) -> None:
        self.generation, self.peers = generation, peers
        self.state, self.tries = Reload.SEND, 0
        self.done.clear()

    def reset(self) -> None:
        """A new ExaBGP reads the newest file: nothing to check."""
        self.state, self.tries, self._collect = None, 0, None
        self.done.set()
        self.cancel()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def resend(self) -> None:
        """The relay was replaced: whatever was in flight is lost."""
        if self.state is not None:
            self.state = Reload.SEND

    @property
    def wants_window(self) -> bool:
        return self.state in (Reload.SEND, Reload.VERIFY)

    def collect(self, text: str) -> bool:
        """A reply line; True if it belonged to ``show neighbor configuration``."""
        if self._collect is None:
            return False
        self._collect.append(text)
        return True

    def command(self, idle: bool) -> Command | None:
        if self.state is Reload.SEND and idle:
            self.state, self.tries = Reload.SENT, self.tries + 1
            return Command("reload", exclusive=True, then=self._sent)
        if self.state is Reload.VERIFY and idle:
            self.state, self._collect = Reload.VERIFYING, []
            return Command("show neighbor configuration", exclusive=True, then=self._verify)
        return None

    def _sent(self, ok: bool) -> None:
        if ok:
            self.state = Reload.VERIFY
        else:
            self._retry()

    def _verify(self, ok: bool) -> None:
        lines, self._collect = self._collect or [], None
        got = {ip: d.split()[-2:] for ip, d in codec.neighbor_descriptions(lines).items()}
        want = {ip: ["gen", str(self.generation)] for ip in self.peers}
        if ok and got == want:
            self.state = None
            self.done.set()
            self.log.info("ExaBGP runs configuration %d", self.generation)
        else:
            self._retry()

    def _retry(self) -> None:
        delay = min(0.2 * 2 ** min(self.tries, 5), 5.0)
        log = self.log.warning if self.tries >= 3 else self.log.info
        log("ExaBGP skipped reload %d (try %d); retrying", self.generation, self.tries)
        self.state = Reload.WAIT

        def again() -> None:
            self._timer = None
            if self.state is Reload.WAIT:
                self.state = Reload.SEND
                self.wake()

        self._timer = asyncio.get_running_loop().call_later(delay, again)
