"""Runs one child process and restarts it when it exits unexpectedly (the only place in
the bgp package that spawns anything). Used by ``bgp.speaker`` for ``exabgp server``.

Contract:
- The child dies with us: PR_SET_PDEATHSIG=SIGTERM is set between fork and exec, so it
  gets SIGTERM when the thread that forked it exits, even when fabricd is SIGKILLed. The
  setting survives exec of non-setuid programs (``ip netns exec``, python).
- It runs in its own session, so a terminal's ^C reaches fabricd only, and its stdout and
  stderr are appended to ``out_path`` (rotated to ``.1`` past 1 MiB at each start).
- An unexpected exit calls ``on_exit(status)``, then the child is started again after a
  delay: 0.5 s doubling to 10 s, back to 0.5 s after a run of 60 s or more.
- ``stop`` sends SIGTERM, then SIGKILL after ``timeout`` s; no restart follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
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
PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int, libc: ctypes.CDLL) -> Callable[[], None]:
    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


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
        self._libc = ctypes.CDLL(None, use_errno=True)  # loaded here, not in the child

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
                *self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                preexec_fn=_die_with_parent(os.getpid(), self._libc),
                start_new_session=True,
            )
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
