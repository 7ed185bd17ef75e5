"""Runs ExaBGP (``python exabgp_main.py server <conf>``, as ``python -m exabgp`` would),
with four changes to what it spends CPU on. Each leaves ExaBGP's behaviour on the wire alone,
checks that what it replaces exists (ExaBGP 5.0; otherwise that change is skipped) and is
tested in tests/test_bgp_exabgp_main.py.

- **Debug logging free** (``quiet_debug``) while the log level is above DEBUG: ExaBGP runs
  its logger's checks (~1 us) for each received NLRI even when debug is off, ~10% of its
  CPU when 100,000 routes arrive. At DEBUG nothing is changed.
- **Received UPDATEs not parsed** (``raw_updates``) when ``$FABRIC_EXABGP_RAW_UPDATES`` is
  1 (``bgp.render.exabgp_env``): fabricd's configuration asks for ``receive { packets; }``
  without ``parsed`` and without an Adj-RIB-In, so ExaBGP's parse of a received UPDATE
  (an object per NLRI, ~45% of its CPU per learned route) fed nothing; fabricd decodes the
  bytes it is handed (``bgp.wire``). The hold timer still sees every UPDATE.
- **Hex in C** (``fast_hex``): the packets ExaBGP hands over are hex text, formatted one
  ``'{:02X}'.format`` per byte (4,096 calls per full UPDATE); ``bytes.hex`` gives the same
  text.
- **Idle reactor** (``idle_reactor``): ExaBGP's loop polls every 10 ms (``reactor.speed``
  1.0), 100 wake-ups a second with nothing to do: 1.5% of a core per node. Once no turn
  has asked to run again at once (a peer or an API command with more to do) for
  ``IDLE_AFTER`` s and no API command is half done, it polls every ``IDLE_POLL`` s instead.
  While every peer is established, ``ESTABLISHED_AFTER`` and ``ESTABLISHED_POLL`` apply:
  each received keepalive is such a turn (a message read: ExaBGP asks to read again), and
  0.1 s of 10 ms polls after each one was most of an established node's idle CPU. Sockets
  of established peers and the API pipe are in the poll set, so a message or a command
  still wakes it at once; only its timers (keepalives, hold time, connection retries, a
  listening socket) run up to a poll interval late, and BGP's are whole seconds (a hold
  time of at least 3 s: a keepalive at least every second, which wakes the peer anyway).
  A peer that is connecting or opening relies on the 10 ms poll (ExaBGP asks to come back
  "later" while its connect is in flight), so the short window and the long poll wait for
  every peer to be established.

It also exits at once, before ExaBGP starts, when the supervisor that spawned it is already
gone (``orphaned``: see bgp/supervisor.py). Run by path, so it needs nothing but ExaBGP
importable.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

RAW_ENV = "FABRIC_EXABGP_RAW_UPDATES"
PARENT_ENV = "FABRIC_SUPERVISOR_PID"  # bgp.supervisor.PARENT_ENV (run by path: no import)
IDLE_AFTER = 0.1  # s without a turn that asked to run again before the loop polls slowly
IDLE_POLL = 0.5  # s between polls when idle: BGP timers are whole seconds
ESTABLISHED_AFTER = 0.02  # the same while every peer is established: two 10 ms polls
ESTABLISHED_POLL = 1.0


def quiet_debug(level: str | None) -> bool:
    """Make ExaBGP's ``log.debug`` a no-op unless ``level`` is DEBUG; whether it did."""
    if (level or "INFO").strip().upper() == "DEBUG":
        return False
    from exabgp.logger import log

    def debug(cls: type, message: object, source: str = "", level: str = "DEBUG") -> None:
        return None

    log.debug = classmethod(debug)
    return True


def raw_updates(enabled: str | None) -> bool:
    """Received UPDATEs become empty ``Update`` objects (not parsed) when ``enabled`` is
    "1"; whether it did. Sent UPDATEs (and every other message) are parsed as before."""
    if (enabled or "").strip() != "1":
        return False
    from exabgp.bgp.message.direction import Direction
    from exabgp.bgp.message.update import Update
    from exabgp.bgp.message.update.attribute import Attributes

    parse = Update.unpack_message

    def unpack_message(cls: type, data: bytes, direction: int, negotiated: Any) -> Any:
        if direction == Direction.IN:
            return Update([], Attributes())
        return parse(data, direction, negotiated)

    Update.unpack_message = classmethod(unpack_message)
    return True


def fast_hex() -> bool:
    """ExaBGP's JSON encoder formats packets with ``bytes.hex`` (same text); whether it did."""
    from exabgp.reactor.api.response import json as encoder

    if not hasattr(encoder, "hexstring"):
        return False

    def hexstring(value: bytes) -> str:
        return "0x" + bytes(value).hex().upper()

    encoder.hexstring = hexstring
    return True


def idle_reactor(
    after: float = IDLE_AFTER,
    poll: float = IDLE_POLL,
    established_after: float = ESTABLISHED_AFTER,
    established_poll: float = ESTABLISHED_POLL,
) -> bool:
    """ExaBGP's loop polls every ``poll`` s once idle for ``after`` s, and every
    ``established_poll`` s once idle for ``established_after`` s while every peer is
    established (see the module docstring); whether it did."""
    from exabgp.bgp.fsm import FSM
    from exabgp.reactor.loop import Reactor

    wait = getattr(Reactor, "_wait_for_io", None)
    if wait is None:
        return False
    busy_at = [time.monotonic()]
    up = FSM.ESTABLISHED

    def _wait_for_io(self: Any, sleeptime: int) -> Iterator[int]:
        now = time.monotonic()
        if sleeptime == 0 or not self.asynchronous.ready():
            busy_at[0] = now
        else:
            peers = getattr(self, "_peers", None) or {}
            steady = bool(peers) and all(
                getattr(getattr(p, "fsm", None), "state", None) == up for p in peers.values()
            )
            if now - busy_at[0] >= (established_after if steady else after):
                sleeptime = int((established_poll if steady else poll) * 1000)
        # A socket that became readable is not work in itself (a peer's keepalive every
        # few seconds would keep the 10 ms tick forever): the next turn reads it, and a peer
        # or command with more to do asks for sleeptime 0, which is.
        yield from wait(self, sleeptime)

    Reactor._wait_for_io = _wait_for_io
    return True


def orphaned(env: Mapping[str, str]) -> bool:
    """True when the supervisor that started us (``$FABRIC_SUPERVISOR_PID``) is gone: it
    died before ``setpriv`` set our death signal, which would never come."""
    try:
        os.kill(int(env.get(PARENT_ENV, "")), 0)
    except ValueError:
        return False  # not started by bgp.supervisor
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def main() -> int:
    env = os.environ  # ExaBGP reads both spellings
    if orphaned(env):
        return 0
    quiet_debug(env.get("exabgp.log.level") or env.get("exabgp_log_level"))
    raw_updates(env.get(RAW_ENV))
    fast_hex()
    idle_reactor()
    from exabgp.application.main import main as exabgp_main

    sys.argv[0] = "exabgp"
    try:
        return int(exabgp_main() or 0)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
