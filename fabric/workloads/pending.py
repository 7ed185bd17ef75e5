"""DELs recorded by the plugin while fabricd was unreachable (cni/shim.py writes them).

Each file in ``<stateDir>/pending-del/`` is one request, framed exactly as the plugin would
have sent it on the socket (cni/protocol.py), written atomically (temporary name, fsync,
rename). fabricd reads them back through the same decoder and request parser as a live
request, runs the DEL, and removes the file only when the DEL succeeded; a file that is not a
request is renamed ``*.bad`` (kept for a person) and skipped. Temporary files older than a
minute are the remains of a plugin killed mid-write: removed.

fabricd records a DEL here itself when the DEL reached it but etcd did not answer
(``record``; server.py): the dataplane is torn down at once, the release waits here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cni import shim
from cni.errors import CNIError, Code
from cni.install import PENDING_DIR
from cni.protocol import (
    HEADER,
    PLUGIN_VAR,
    STDIN_TOO_LARGE,
    FramingError,
    decode_env,
    decode_header,
    encode_request,
)
from cni.spec import Request, Verb, parse_request
from fabric.workloads.pod_ipam import Owner

SUFFIX = ".del"
INTERVAL = 5.0  # s between sweeps of the recorded DELs (the ADD path checks too)
STALE_TMP = 60.0


@dataclass(frozen=True, slots=True)
class PendingDel:
    path: Path
    plugin: str  # fabric or fabric-ipam
    request: Request


class BadRecord(ValueError):
    """A pending-DEL file that is not a DEL request."""


class PendingDir:
    """The recorded DELs of one state dir."""

    def __init__(self, state_dir: Path, log: logging.Logger | None = None) -> None:
        self.path = state_dir / PENDING_DIR
        self.log = log or logging.getLogger(__name__)

    def files(self) -> list[Path]:
        """The recorded DELs, oldest first (names start with the time they were written)."""
        try:
            entries = list(os.scandir(self.path))
        except FileNotFoundError:
            return []
        out = []
        now = time.time()
        for e in entries:
            if e.name.endswith(SUFFIX) and not e.name.startswith("."):
                out.append(Path(e.path))
            elif e.name.endswith(".tmp"):
                try:
                    if now - e.stat().st_mtime > STALE_TMP:
                        os.unlink(e.path)
                except FileNotFoundError:
                    pass
        return sorted(out)

    def read(self, path: Path) -> PendingDel:
        """Raises BadRecord (file not a DEL request) or OSError."""
        raw = path.read_bytes()
        try:
            h = decode_header(raw[:HEADER])
            if len(raw) != HEADER + h.env_len + h.stdin_len:
                raise FramingError(f"{len(raw)} bytes, the header says otherwise")
            if h.flags & STDIN_TOO_LARGE:
                raise FramingError("the network config was too large to record")
            env = decode_env(raw[HEADER : HEADER + h.env_len])
            req = parse_request(env, raw[HEADER + h.env_len :])
        except (FramingError, CNIError) as e:
            raise BadRecord(str(e)) from e
        if req.env.command is not Verb.DEL:
            raise BadRecord(f"a {req.env.command} request, not DEL")
        return PendingDel(path, env.get(PLUGIN_VAR, "fabric"), req)

    def record(self, env: Mapping[str, str], stdin: bytes) -> None:
        """Record a DEL fabricd could not finish (etcd unreachable) exactly as the plugin
        records one it cannot deliver (``cni.shim.record``: same framing, same atomic
        write). Raises OSError."""
        shim.record(str(self.path), encode_request(env, stdin))

    def done(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def bad(self, path: Path, why: str) -> None:
        self.log.error("recorded DEL %s is unreadable (%s): renamed to .bad", path, why)
        with contextlib.suppress(FileNotFoundError):
            path.rename(path.with_name(path.name + ".bad"))

    async def finish(self, run: Callable[[PendingDel], Awaitable[object]]) -> set[str]:
        """``run`` every recorded DEL, oldest first; remove each that succeeded. Returns the
        handles whose DEL failed (kept, retried on the next call)."""
        left: set[str] = set()
        for path in self.files():
            try:
                p = self.read(path)
            except BadRecord as e:
                self.bad(path, str(e))
                continue
            except FileNotFoundError:  # finished by a concurrent call
                continue
            handle = Owner.of(p.request.conf.name, p.request.env).handle
            try:
                await run(p)
            except Exception as e:
                self.log.warning("recorded DEL of %s failed (kept, retried): %s", handle, e)
                left.add(handle)
                continue
            self.log.info("finished the DEL of %s recorded while fabricd was down", handle)
            self.done(path)
        return left


class Sweeper:
    """When recorded DELs run: ``finish`` (at start, before the socket opens), ``loop`` (every
    INTERVAL s), ``before_add`` (an ADD of a handle whose recorded DEL cannot be finished
    answers 11). ``run`` is the verbs' DEL of one record, under the attachment's lock."""

    def __init__(self, pending: PendingDir | None,
                 run: Callable[[PendingDel], Awaitable[object]], log: logging.Logger) -> None:  # fmt: skip
        self.dir, self.run, self.log = pending, run, log
        self._lock = asyncio.Lock()
        self.left: set[str] = set()  # handles whose recorded DEL failed

    async def finish(self) -> int:
        """Run every recorded DEL; returns how many failed (kept for the next sweep)."""
        if self.dir is None:
            return 0
        async with self._lock:
            self.left = await self.dir.finish(self.run)
        return len(self.left)

    async def loop(self, interval: float = INTERVAL) -> None:
        """Sweep every ``interval`` s (a DEL recorded while fabricd was starting, or one that
        failed because etcd was down). Runs until cancelled."""
        while True:
            await asyncio.sleep(interval)
            if self.dir is not None and (self.left or self.dir.files()):
                await self.finish()

    async def before_add(self, handle: str) -> None:
        """One directory scan when nothing is recorded; else finish first."""
        if self.dir is None:
            return
        if handle in self.left or self.dir.files():
            await self.finish()
        if handle in self.left:
            raise CNIError(Code.TRY_AGAIN_LATER,
                           f"a DEL of {handle} recorded while fabricd was down is not finished")  # fmt: skip
