"""Runs one child process and restarts it when it exits unexpectedly (the only place in
the bgp package that spawns anything). Used by ``bgp.speaker`` for ``exabgp server``.

Contract:
- The child dies with us: it runs under ``setpriv --pdeathsig TERM`` (util-linux), which
  sets PR_SET_PDEATHSIG=SIGTERM and execs it, so it gets SIGTERM when the thread that
  spawned it exits, even when fabricd is SIGKILLed. The setting survives exec of
  non-setuid programs (``ip netns exec``, python). ``$FABRIC_SUPERVISOR_PID`` tells the
  child our pid: a child that can (``bgp/exabgp_main.py``) exits at once when its parent
  is already another, i.e. we died before the setting was made.
- No Python runs between fork and exec (no ``preexec_fn``): the spawn is a vfork, and no
  fork handler of a library we loaded (gRPC's restarts its threads in a forked child,
  which crashed there) runs in the child.
- It runs in its own session, so a terminal's ^C reaches fabricd only, and its stdout and
  stderr are appended to ``out_path`` (rotated to ``.1`` past 1 MiB at each start).
- An unexpected exit calls ``on_exit(status)``, then the child is started again after a
  delay: 0.5 s doubling to 10 s, back to 0.5 s after a run of 60 s or more.
- ``stop`` sends SIGTERM, then SIGKILL after ``timeout`` s; no restart follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

BACKOFF_MIN, BACKOFF_MAX = 0.5, 10.0  # restart delay, doubling per unstable exit
STABLE_AFTER = 60.0  # a run this long resets the backoff
OUT_ROTATE = 1024 * 1024


SETPRIV = "/usr/bin/setpriv"
PARENT_ENV = "FABRIC_SUPERVISOR_PID"


class Supervisor:
    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str],
        out_path: Path,
        on_spawn: Callable[[], None],
        on_exit: Callable[[int | None], None],
        log: logging.Logger,
    ) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.out_path = out_path
        self.on_spawn = on_spawn
        self.on_exit = on_exit
        self.log = log
        self.restarts = 0  # unexpected exits
        self.proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    async def start(self) -> None:
        """Spawn the child and supervise it. Raises ``OSError`` if it cannot be spawned."""
        proc = await self._spawn()
        self._task = asyncio.create_task(self._supervise(proc), name="supervisor")

    async def _spawn(self) -> asyncio.subprocess.Process:
        self.on_spawn()
        if self.out_path.exists() and self.out_path.stat().st_size > OUT_ROTATE:
            os.replace(self.out_path, self.out_path.with_name(self.out_path.name + ".1"))
        out = os.open(self.out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                SETPRIV, "--pdeathsig", "TERM", "--", *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, PARENT_ENV: str(os.getpid())},
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(out)
        self.log.info("started %s: pid %d", self.argv[0], self.proc.pid)
        return self.proc

    async def _supervise(self, proc: asyncio.subprocess.Process | None) -> None:
        delay = BACKOFF_MIN
        while True:
            started = time.monotonic()
            status = await proc.wait() if proc is not None else None
            if self._stopping:
                return
            self.restarts += 1
            if time.monotonic() - started > STABLE_AFTER:
                delay = BACKOFF_MIN
            self.log.error("%s exited (status %s); restart in %.1f s", self.argv, status, delay)
            self.on_exit(status)
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)
            try:
                proc = await self._spawn()
            except OSError as e:
                self.log.error("failed to start %s: %s", self.argv, e)
                proc = None

    async def stop(self, timeout: float) -> None:  # noqa: ASYNC109
        """SIGTERM, SIGKILL after ``timeout`` s, wait. Idempotent; no restart follows."""
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                self.log.warning("pid %d ignored SIGTERM for %.0f s; killing it", proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
