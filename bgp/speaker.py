"""The supervised ExaBGP process (the I/O half of the bgp package). See docs/design/bgp-speaker.md.

``Speaker`` runs ``exabgp server`` (through ``bgp.supervisor``) with ``bgp.relay`` as its
API process; the relay connects back to ``<workdir>/relay.sock``. Commands go out through
it (``bgp.codec``), chosen by ``bgp.adjout.AdjRibOut``; events come back and are passed to
``on_event`` in ExaBGP's order (a run of withdrawal-only UPDATEs merged: bgp.withdrawals).

Invariants:
- At most ``WINDOW`` commands await their ack. One whose ack may come synchronously
  (eor, route-refresh, reload, show) goes alone, so acks map to commands in order;
  ``version`` (ping, barrier) is told apart by its reply line, written just before its ack.
- Only the relay of the ExaBGP this speaker runs is served: a connection whose peer process
  (``SO_PEERCRED``) is not a child of that ExaBGP is closed at once. After a SIGKILL of
  fabricd its dying ExaBGP's relay reconnected to the new fabricd's ``relay.sock``: served,
  it took over, and the dying ExaBGP's events came back as the new one's.
- Each relay connection starts with a ``version`` barrier; acks before its answer are
  stale. A second connection (respawned relay) or lost lines mean ExaBGP's state is
  unknown: everything is sent again and established peers are asked for a route refresh.
- A reconfigure is a reload checked by ``show neighbor configuration`` and retried:
  ExaBGP 5.0.15 skips a reload while any neighbor has routes waiting to go out.
"""

# ruff: noqa: ASYNC109 (timeouts are part of the documented API: ping(timeout=1.0))
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from bgp import codec
from bgp.adjout import AdjRibOut, Command
from bgp.announced import Covered
from bgp.codec import Ack, RelayNotice, Reply, SpeakerShutdown
from bgp.errors import SpeakerError
from bgp.model import Advert, Event, IPAddress, PeerState, Session, SessionState, SpeakerRestarted
from bgp.reload import ReloadCheck
from bgp.render import exabgp_env, render_config
from bgp.sessions import SessionBook, SessionStatus
from bgp.supervisor import Supervisor
from bgp.tcpstate import peer_parent, read_connections, read_drops
from bgp.withdrawals import WithdrawalRun

WINDOW = 4  # commands awaiting an ack: the probe's best (3k prefixes/s on 5.0.15)
PROBE_INTERVAL = 1.0  # s: kernel socket probe while a session is not up
MAX_PINGS = 8  # unanswered pings; more would only pile up in a stopped ExaBGP's pipe
RELAY_ENV = "FABRIC_RELAY_SOCKET"
READ_SIZE = 256 * 1024
RELAY_SCRIPT = Path(__file__).with_name("relay.py")
EXABGP_SCRIPT = Path(__file__).with_name("exabgp_main.py")  # ExaBGP, debug logging free


class Speaker:
    """Supervises one ExaBGP (see the module docstring).

    Call it from one event loop; ``start`` forks from that loop's thread and the
    parent-death signal fires when that thread exits, so run it in the main thread.
    ``exabgp_argv`` is the command before ``server <conf>`` (default: this Python running
    ``bgp/exabgp_main.py``, ExaBGP's entry point with debug logging made free; prefix
    ``ip netns exec <ns>`` to run it in a namespace).
    """

    def __init__(
        self,
        workdir: Path,
        on_event: Callable[[Event], None],
        exabgp_argv: Sequence[str] | None = None,
        log: logging.Logger | None = None,
        *,
        relay_argv: Sequence[str] | None = None,
        stop_timeout: float = 5.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.on_event = on_event
        self.exabgp_argv = list(exabgp_argv or [sys.executable, "-I", str(EXABGP_SCRIPT)])
        self.relay_argv = list(relay_argv or [sys.executable, "-IS", str(RELAY_SCRIPT)])
        self.log = log or logging.getLogger("bgp.speaker")
        self.stop_timeout = stop_timeout
        self.conf_path = self.workdir / "exabgp.conf"
        self.sock_path = self.workdir / "relay.sock"
        self.log_path = self.workdir / "exabgp.log"
        self.out_path = self.workdir / "exabgp.out"
        # counters, for metrics (and `restarts`)
        self.errors = 0  # `error` acks
        self.decode_errors = 0
        self.relay_drops = 0  # lines the relay dropped (its buffer was full)
        self.stale_relays = 0  # connections refused: not our ExaBGP's relay
        self.commands_sent = 0
        self._sessions: dict[IPAddress, Session] = {}
        self._router_id: IPAddress | None = None
        self._generation = 0
        self._config = ""  # the text in conf_path
        self._rib = AdjRibOut()
        self._covered = Covered(lambda: self._rib.acked)
        self._book = SessionBook()
        self._held = WithdrawalRun(self._emit)  # withdrawal-only UPDATEs, merged
        env = {**os.environ, **exabgp_env(self.log_path), RELAY_ENV: str(self.sock_path)}
        argv = [*self.exabgp_argv, "server", str(self.conf_path)]
        self._child = Supervisor(
            argv, env, self.out_path, self._reset_process_state, self._exited, self.log
        )
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stopping = False
        self._ready = asyncio.Event()  # the current ExaBGP's relay passed the barrier
        self._idle = asyncio.Event()
        self._pump_soon = False
        self._pings: deque[asyncio.Future[bool]] = deque()
        self._relay_seen: dict[int, int] = {}  # relay pid -> lines it reported dropped
        self._inflight: deque[Command] = deque()
        self._reload = ReloadCheck(self.log, self._schedule_pump)
        self._probe_timer: asyncio.TimerHandle | None = None
        self._reset_process_state()

    # ------------------------------------------------------------------ public API

    @property
    def pid(self) -> int | None:
        """ExaBGP's pid (``ip netns exec`` execs, so it is ExaBGP's even then)."""
        return self._child.pid

    @property
    def restarts(self) -> int:
        """How many times ExaBGP exited unexpectedly (and was started again)."""
        return self._child.restarts

    async def start(
        self,
        sessions: Sequence[Session],
        router_id: IPAddress,
        timeout: float = 30.0,
        adverts: Iterable[Advert] | None = None,
    ) -> None:
        """Write the configuration, listen for the relay, spawn ExaBGP, wait until it answers.
        ``adverts``: the desired set, in place before ExaBGP starts (else the first
        ``set_announcements``); no End-of-RIB goes out before one of the two. Raises
        ``ConfigRenderError``, ``ValidationError`` (an advert), or ``SpeakerError`` (ExaBGP
        did not start or answer within ``timeout``; it is stopped again)."""
        if len(str(self.sock_path)) > 100:
            raise SpeakerError(f"failed to start ExaBGP: socket path {self.sock_path} too long")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if adverts is not None:
            self.set_announcements(adverts)
        self._router_id = router_id
        self._write_config(self._render(list(sessions), self._generation))
        self._set_sessions(sessions)
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        self._server = await asyncio.start_unix_server(self._on_connect, path=str(self.sock_path))
        os.chmod(self.sock_path, 0o600)
        try:
            await self._child.start()
        except OSError as e:
            await self.stop()
            raise SpeakerError(f"failed to start ExaBGP {self.exabgp_argv}: {e}") from e
        if not await _wait(self._ready, timeout):
            await self.stop()
            logs = f"see {self.log_path}, {self.out_path}"
            raise SpeakerError(f"failed to start ExaBGP: no answer within {timeout} s ({logs})")

    async def reconfigure(self, sessions: Sequence[Session], timeout: float = 10.0) -> bool:
        """Apply a new plan (MD5 files are read again); unchanged sessions stay up with their
        routes. Added or changed neighbors get the whole announced set when they come up.
        True once ExaBGP runs the plan (checked), False after ``timeout`` s (retried in the
        background). ``ConfigRenderError``: nothing changed."""
        new = {s.peer_ip: s for s in sessions}
        if self._render(list(new.values()), self._generation) != self._config:
            text = self._render(list(new.values()), self._generation + 1)
            self._generation += 1
            self._rib.mark_fresh(ip for ip, s in new.items() if self._sessions.get(ip) != s)
            self._write_config(text)
            self._set_sessions(sessions)
            self._reload.request(self._generation, list(self._sessions))
            self._schedule_pump()
        if not await _wait(self._reload.done, timeout):
            self.log.warning("ExaBGP does not run configuration %d yet", self._generation)
            return False
        return True

    def set_announcements(self, adverts: Iterable[Advert]) -> None:
        """Replace the desired set (the last advert for a prefix wins). Only the difference
        to what ExaBGP holds is sent, as soon as the window allows; rapid calls coalesce.
        Raises ``ValidationError`` for a malformed community (nothing changes then)."""
        desired = {a.prefix: a for a in adverts}
        for comms in {a.communities for a in desired.values()}:
            codec.community_clause(comms)
        self._rib.set_desired(desired)
        self._schedule_pump()

    def announced(self) -> set[Advert]:
        """The adverts ExaBGP acknowledged (and was not asked to withdraw since)."""
        return set(self._rib.acked.values())

    def covered_since(self, ip: IPAddress) -> float | None:
        """When the acked advert covering ``ip`` was acked (bgp/announced.py; None: none)."""
        return self._covered.since(ip)

    async def wait_covered(self, ip: IPAddress, timeout: float) -> bool:
        """True once an advert ExaBGP acknowledged covers ``ip`` (bgp/announced.py)."""
        return await self._covered.wait(ip, timeout)

    async def wait_idle(self, timeout: float = 30.0) -> bool:
        """True once nothing is queued or awaiting an ack (refused commands included)."""
        return await _wait(self._idle, timeout)

    async def ping(self, timeout: float = 1.0) -> bool:
        """True if ExaBGP answers ``version`` within ``timeout``; False when it is stopped,
        stuck, restarting, or has no relay."""
        if not self._synced or self._writer is None or len(self._pings) >= MAX_PINGS:
            return False
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pings.append(fut)
        self._write(codec.VERSION_COMMAND)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return False

    def sessions_status(self) -> dict[IPAddress, SessionStatus]:
        """State of each configured session, from ExaBGP's neighbor-changes events."""
        return self._book.snapshot()

    async def stop(self) -> None:
        """SIGTERM ExaBGP (with GR negotiated it closes sessions without a NOTIFICATION,
        so peers keep our routes as stale: a graceful restart), SIGKILL after
        ``stop_timeout`` s; close the socket. Idempotent."""
        self._stopping = True
        self._reload.cancel()
        if self._probe_timer is not None:
            self._probe_timer.cancel()
        await self._child.stop(self.stop_timeout)
        for closing in (self._writer, self._server):
            if closing is not None:
                closing.close()
        self._writer = self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.sock_path.unlink()
        self._fail_pings()

    async def withdraw_all_and_stop(self, timeout: float = 10.0, settle: float = 1.0) -> None:
        """Planned decommission: withdraw everything, wait for the acks (up to ``timeout``)
        and ``settle`` s more for the UPDATEs to leave, then ``stop``. Peers then hold no
        route of ours, so the GR-style close leaves nothing stale behind."""
        self.set_announcements(())
        if not await self.wait_idle(timeout):
            self.log.warning("withdrawals not all acknowledged within %.0f s", timeout)
        await asyncio.sleep(settle)
        await self.stop()

    # ------------------------------------------------------------------ process

    def _render(self, sessions: list[Session], generation: int) -> str:
        if self._router_id is None:
            raise SpeakerError("failed to configure ExaBGP: the speaker was not started")
        return render_config(sessions, self.relay_argv, self._router_id, generation)

    def _write_config(self, text: str) -> None:
        tmp = self.conf_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds MD5 keys
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, self.conf_path)
        self._config = text

    def _set_sessions(self, sessions: Sequence[Session]) -> None:
        self._sessions = {s.peer_ip: s for s in sessions}
        self._book.configure(self._sessions)
        self._probe_soon()
        self._rib.keep_peers(set(self._sessions))

    def _exited(self, status: int | None) -> None:
        if self._writer is not None:  # what the dead process's relay still holds is stale
            self._writer.close()
            self._writer = None
        self._reset_process_state()
        self._book.restarting()
        self._probe_soon()
        self._emit(SpeakerRestarted(self.restarts))

    def _reset_process_state(self) -> None:
        """A new ExaBGP holds nothing and reads the newest configuration file."""
        self._synced = self._synced_once = self._barrier_reply = False
        self._ready.clear()
        self._idle.clear()
        self._rib.reset()
        self._inflight.clear()
        self._version_acks = 0
        self._reload.reset()
        self._fail_pings()

    def _fail_pings(self) -> None:
        while self._pings:
            if not (fut := self._pings.popleft()).done():
                fut.set_result(False)

    # ------------------------------------------------------------------ relay socket

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parent = peer_parent(writer.get_extra_info("socket"))
        if parent is not None and parent != self.pid:
            self.stale_relays += 1
            if self.stale_relays == 1 or self.stale_relays % 100 == 0:
                self.log.warning("refused a relay of another ExaBGP (pid %d, ours %s): %d so "
                                 "far", parent, self.pid, self.stale_relays)  # fmt: skip
            writer.close()
            return
        if self._writer is not None:
            self._writer.close()  # a respawned relay replaces the old one
        self._writer = writer
        self._start_barrier()
        buf = b""
        try:
            while (data := await reader.read(READ_SIZE)) and self._writer is writer:
                lines = (buf + data).split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if line:
                        self._handle(line)
                        # read() returns at once while data is buffered and an UPDATE costs
                        # ~8 ms: a turn after each (held withdrawals: once released)
                        if not self._held.holding:
                            await asyncio.sleep(0)
                self._held.release()
                await asyncio.sleep(0)
        except OSError as e:
            self.log.warning("relay connection failed: %s", e)
        finally:
            self._held.release()
            if self._writer is writer:
                self._writer = None
                self._synced = False
            writer.close()

    def _start_barrier(self) -> None:
        self._synced = self._barrier_reply = False
        self._fail_pings()
        self._idle.clear()
        self._write(codec.VERSION_COMMAND)

    def _write(self, text: str) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(text.encode() + b"\n")
            self.commands_sent += 1

    def _handle(self, line: bytes) -> None:
        try:
            parsed = codec.parse_line(line)
        except SpeakerError as e:
            self.decode_errors += 1
            self.log.warning("%s", e)
            return
        if isinstance(parsed, list):
            for ev in parsed:
                if self._held.take(ev):  # a withdrawal, held; else what is held goes first
                    continue
                self._book.on_event(ev)
                if isinstance(ev, PeerState):
                    self._on_state(ev)
                self._emit(ev)
        elif isinstance(parsed, Ack):
            self._on_ack(parsed is Ack.DONE)
        elif isinstance(parsed, Reply):
            self._on_reply(parsed.text)
        elif isinstance(parsed, RelayNotice):
            self._on_notice(parsed)
        elif isinstance(parsed, SpeakerShutdown):
            self.log.info("ExaBGP is shutting down")

    def _emit(self, ev: Event) -> None:
        try:
            self.on_event(ev)
        except Exception:
            self.log.exception("on_event failed for %r", ev)

    def _on_notice(self, n: RelayNotice) -> None:
        drops = n.dropped - self._relay_seen.get(n.pid, 0)
        self._relay_seen[n.pid] = n.dropped
        if drops > 0:
            self.relay_drops += drops
            self.log.error("relay %d dropped %d lines; resynchronising", n.pid, drops)
            self._start_barrier()

    def _on_reply(self, text: str) -> None:
        if text.startswith("exabgp "):  # the answer to `version`; its `done` comes next
            if not self._synced:
                self._barrier_reply = True
                return
            self._version_acks += 1
            if self._pings and not (fut := self._pings.popleft()).done():
                fut.set_result(True)
        else:
            self._reload.collect(text)

    def _on_ack(self, ok: bool) -> None:
        if not self._synced:
            if self._barrier_reply:
                self._after_barrier()
            return
        if self._version_acks:
            self._version_acks -= 1
            return
        if not self._inflight:
            self.log.warning("ExaBGP acknowledged a command that was not sent")
            return
        cmd = self._inflight.popleft()
        if not ok:
            self.errors += 1
            self.log.error("ExaBGP refused: %.300s", cmd.text)
        if cmd.then is not None:
            cmd.then(ok)
        self._rib.settle(cmd, ok)
        self._covered.notify(a.prefix for a, _ in cmd.adds if ok)
        self._schedule_pump()

    def _after_barrier(self) -> None:
        self._synced = True
        self._inflight.clear()
        self._version_acks = 0
        if self._synced_once:  # a new relay, or lost lines: ExaBGP's state is unknown
            up = self._book.established()
            fams = {ip: self._sessions[ip].families for ip in up}
            self._rib.resync([codec.route_refresh_command(f, ip) for ip in up for f in fams[ip]],
                             fams)  # fmt: skip
            self._reload.resend()
        self._synced_once = True
        self._ready.set()
        self._schedule_pump()

    def _on_state(self, ev: PeerState) -> None:
        if ev.peer not in self._sessions:
            return
        if ev.state is SessionState.ESTABLISHED:
            self._rib.session_up(ev.peer, self._sessions[ev.peer].families)
            self._schedule_pump()
        else:
            self._rib.session_down(ev.peer)
            self._probe_soon()

    def _probe_soon(self) -> None:
        """Probe every PROBE_INTERVAL while a session is not up; armed wherever one may have
        left Established (configured, ExaBGP restarted, a state event), so an idle node
        whose sessions are all up has no timer here."""
        if self._probe_timer is None and not self._stopping:
            self._probe_timer = asyncio.get_running_loop().call_later(PROBE_INTERVAL, self._probe)

    def _probe(self) -> None:
        """While a session is not up, give the session book the kernel's view of ExaBGP's
        sockets: an attempt the peer never answers produces no ExaBGP event at all."""
        self._probe_timer = None
        if not self._book.pending():
            return
        if (pid := self.pid) is not None:
            targets = {ip: (s.peer_port, s.passive) for ip, s in self._sessions.items()}
            self._book.probe(read_connections(pid), read_drops(pid), targets)
        self._probe_soon()

    # ------------------------------------------------------------------ sending

    def _schedule_pump(self) -> None:
        self._idle.clear()
        if not self._pump_soon:
            self._pump_soon = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Send what the window allows: a due reload or its check first (alone), else
        AdjRibOut's commands (global diff, catch-ups, End-of-RIBs, route refreshes)."""
        self._pump_soon = False
        if not self._synced or self._writer is None or self._stopping:
            return
        while len(self._inflight) < WINDOW:
            if self._inflight and self._inflight[-1].exclusive:
                return
            idle = not self._inflight
            if self._reload.wants_window:  # drain the window, then send it alone
                cmd = self._reload.command(idle)
            else:  # routes keep flowing while a skipped reload waits for its retry
                cmd = self._rib.next_command(idle)
            if cmd is None:
                break
            if cmd.adds or cmd.dels:
                self._rib.on_sent(cmd)
            self._inflight.append(cmd)
            self._write(cmd.text)
        self._covered.notify()  # without neighbors, commands settle as they are planned
        if not self._inflight and self._reload.state is None and self._rib.quiet():
            self._idle.set()


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True
