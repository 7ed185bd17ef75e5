"""In-process nft: libnftables (Debian's ``libnftables1``, a dependency of ``nftables``) via ctypes.

The same library the ``nft`` program is a thin front end of: ``nft_run_cmd_from_buffer`` parses
a script exactly as ``nft -f`` does and sends it as ONE kernel transaction (all or nothing),
and the error buffer holds the words nft would print. What it saves is the fork and exec of
``/usr/sbin/nft`` (3-5 ms per call, more on a loaded machine), which every CNI ADD paid.

A libnftables context is not thread-safe and its calls block (netlink round trips, parsing),
so each ``Worker`` owns one context on one dedicated thread: calls are serialized in the
order they are made and never run on the event loop. A worker for another network namespace
enters it (``setns``) on its thread before it creates the context: its netlink socket lives
there for good, whatever the rest of the process does.

Used only by fabric.dataplane.nft (``Nft``), which keeps exec'ing nft when the library cannot
be loaded. Design: docs/design/policy.md, "Dataplane".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

LIBRARY = "libnftables.so.1"
CTX_DEFAULT = 0
OUTPUT_STATELESS = 1 << 2  # nft -s
OUTPUT_HANDLE = 1 << 3  # nft -a
OUTPUT_JSON = 1 << 4  # nft -j
OUTPUT_TERSE = 1 << 11  # nft -t
FLAGS = {"-s": OUTPUT_STATELESS, "-a": OUTPUT_HANDLE, "-j": OUTPUT_JSON, "-t": OUTPUT_TERSE}
CLONE_NEWNET = 0x40000000


class LibraryError(OSError):
    """libnftables cannot be loaded or gives no context: use the nft program instead."""


_lib: ctypes.CDLL | None = None
_lib_error: LibraryError | None = None
_load_lock = threading.Lock()


def load() -> ctypes.CDLL:
    """The library with its prototypes declared; LibraryError when it cannot be (cached)."""
    global _lib, _lib_error
    with _load_lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise _lib_error
        try:
            lib = ctypes.CDLL(LIBRARY, use_errno=True)
            p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
            for name, res, args in (
                ("nft_ctx_new", p, [ctypes.c_uint32]),
                ("nft_ctx_free", None, [p]),
                ("nft_ctx_buffer_output", i, [p]),
                ("nft_ctx_buffer_error", i, [p]),
                ("nft_ctx_get_output_buffer", s, [p]),
                ("nft_ctx_get_error_buffer", s, [p]),
                ("nft_ctx_output_set_flags", None, [p, ctypes.c_uint]),
                ("nft_run_cmd_from_buffer", i, [p, s]),
                ("nft_run_cmd_from_filename", i, [p, s]),
            ):
                fn = getattr(lib, name)  # AttributeError: a library without this API
                fn.restype, fn.argtypes = res, args
        except (OSError, AttributeError) as e:
            _lib_error = LibraryError(f"cannot use {LIBRARY}: {e}")
            raise _lib_error from e
        _lib = lib
        return lib


@dataclass(frozen=True, slots=True)
class Result:
    """One command's outcome: ``rc`` 0 = done (nothing of a refused script was applied)."""

    rc: int
    out: str
    err: str


class Context:
    """One ``nft_ctx``; confined to the thread that made it (``Worker``)."""

    def __init__(self) -> None:
        self.lib = load()
        self.ctx = self.lib.nft_ctx_new(CTX_DEFAULT)
        if not self.ctx:
            raise LibraryError("nft_ctx_new failed")
        if self.lib.nft_ctx_buffer_output(self.ctx) or self.lib.nft_ctx_buffer_error(self.ctx):
            self.free()
            raise LibraryError("failed to buffer libnftables output")

    def run(self, command: str, flags: int = 0, script: bool = False) -> Result:
        """One command line, or (``script``) a file's worth of commands as ``nft -f``."""
        self.lib.nft_ctx_output_set_flags(self.ctx, flags)
        if script:
            rc = self._run_script(command)
        else:
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, command.encode())
        out = self.lib.nft_ctx_get_output_buffer(self.ctx) or b""
        err = self.lib.nft_ctx_get_error_buffer(self.ctx) or b""
        text = err.decode(errors="replace")
        if script:  # nft -f - names its input so: the same words as the exec'd nft
            text = _FD_NAME.sub("/dev/stdin:", text)
        return Result(rc, out.decode(errors="replace"), text)

    def _run_script(self, script: str) -> int:
        """A multi-line script is run from a file (an anonymous memfd): libnftables 1.0.6
        quotes the FIRST line of a buffer in every error, whichever line was refused, while
        for a file it names and quotes the right one, as ``nft -f`` does."""
        fd = os.memfd_create("nft", os.MFD_CLOEXEC)
        try:
            _write_all(fd, script)
            path = f"/proc/self/fd/{fd}"
            return int(self.lib.nft_run_cmd_from_filename(self.ctx, path.encode()))
        finally:
            os.close(fd)

    def free(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


_FD_NAME = re.compile(r"/proc/self/fd/\d+:")


def _write_all(fd: int, text: str) -> None:
    data = memoryview(text.encode())
    while data:
        data = data[os.write(fd, data) :]


def enter_netns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


_Job = tuple[Callable[[Context], Any], concurrent.futures.Future[Any]] | None


class Worker:
    """One thread, one context, in ``netns`` (a path; None: the process's namespace).
    ``run`` may be awaited from any event loop; calls execute one at a time, in order.
    The thread starts at the first call; ``close`` frees the context and ends it."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.calls = 0
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    async def run(self, command: str, flags: int = 0, script: bool = False) -> Result:
        """The command's result. LibraryError: no usable library; OSError: the netns could
        not be entered, or the worker is closed."""
        fut: concurrent.futures.Future[Result] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise OSError("libnftables worker closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name=f"libnftables {self.netns or 'own netns'}")  # fmt: skip
                self._thread.start()
            self.calls += 1
            self._jobs.put((lambda ctx: ctx.run(command, flags, script), fut))
        return await asyncio.wrap_future(fut)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread is not None:
                self._jobs.put(None)

    def _loop(self) -> None:
        ctx: Context | None = None
        failure: BaseException | None = None
        try:
            if self.netns is not None:
                enter_netns(self.netns)
            ctx = Context()
        except BaseException as e:  # every job gets it: the caller falls back or reports
            failure = e
        try:
            while (job := self._jobs.get()) is not None:
                fn, fut = job
                if not fut.set_running_or_notify_cancel():
                    continue
                if ctx is None:
                    kind = LibraryError if isinstance(failure, LibraryError) else OSError
                    fut.set_exception(kind(f"libnftables worker ({self.netns}): {failure}"))
                    continue
                try:
                    fut.set_result(fn(ctx))
                except BaseException as e:
                    fut.set_exception(e)
        finally:
            if ctx is not None:
                ctx.free()
