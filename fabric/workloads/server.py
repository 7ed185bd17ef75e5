"""fabricd's end of the CNI plugin: a unix socket server that answers one framed request
(cni/protocol.py) per connection.

- The socket (mode 0600) is bound under a temporary name and renamed into place, so it is
  never reachable with a wider mode; a stale socket file is replaced, a live one (another
  fabricd) is refused.
- Bounded everywhere: the frame's sizes (MAX_ENV, MAX_STDIN), the time a client may take to
  send it (READ_TIMEOUT), the requests handled at once (max_concurrent; more wait), and the
  time until an answer (request_timeout: the runtime gets 11, try again later, while the
  verb runs on to its end under its attachment's lock, so nothing is left half done).
- ``stop()`` first stops accepting (and removes the socket, so plugins get 11 at once), then
  lets requests in flight finish for up to ``drain`` seconds, then cancels them (an ADD that
  is cancelled rolls back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from cni.errors import LATEST, CNIError, Code
from cni.protocol import (
    HEADER,
    PLUGIN_VAR,
    STDIN_TOO_LARGE,
    FramingError,
    decode_env,
    decode_header,
    encode_reply,
)
from cni.spec import Verb, error_version, parse_request, version_answer
from fabric.workloads.errors import cni_error
from fabric.workloads.verbs import Workloads
from ipam.errors import DatastoreUnavailable

READ_TIMEOUT = 5.0  # the shim sends its whole request at once
REQUEST_TIMEOUT = 50.0  # below the shim's REPLY_TIMEOUT (60 s), so fabricd answers first
DRAIN = 10.0
MAX_CONCURRENT = 64

Handler = Callable[[Mapping[str, str], bytes, int], Coroutine[Any, Any, tuple[int, bytes]]]
Observe = Callable[[str, str, float], None]
log = logging.getLogger("fabric.cni")


async def answer(
    workloads: Workloads, observe: Observe, env: Mapping[str, str], stdin: bytes, flags: int
) -> tuple[int, bytes]:
    """(exit code, stdout) for one request; every failure is a CNI error document."""
    started = time.monotonic()
    raw_verb = env.get("CNI_COMMAND", "")
    verb = raw_verb if raw_verb in Verb.__members__ else "invalid"
    too_large = bool(flags & STDIN_TOO_LARGE)
    try:
        if too_large:
            raise CNIError(Code.IO_FAILURE, "stdin (the network config) is larger than 4 MiB")
        if raw_verb == Verb.VERSION:
            return 0, version_answer()
        req = parse_request(env, stdin)
        out = await workloads.run(env.get(PLUGIN_VAR, "fabric"), req)
        code, result = 0, "ok"
    except Exception as e:
        err = cni_error(e)
        if raw_verb == Verb.DEL and _record_del(workloads, env, stdin, e):
            observe(verb, "recorded", time.monotonic() - started)
            return 0, b""
        if err.code == Code.INTERNAL:
            log.error("CNI %s failed with an internal error", verb, exc_info=e)
        else:
            log.info("CNI %s %s: error %d: %s", verb, _who(env), err.code, err.msg)
        out = err.to_json(LATEST if too_large else error_version(stdin))
        code, result = 1, str(err.code)
    seconds = time.monotonic() - started
    observe(verb, result, seconds)
    log.debug("CNI %s %s: %s in %.1f ms", verb, _who(env), result, seconds * 1000)
    return code, out


def _record_del(workloads: Workloads, env: Mapping[str, str], stdin: bytes,
                exc: Exception) -> bool:  # fmt: skip
    """A DEL that failed only because etcd did not answer: the dataplane is down already
    (the teardown removes routes and interfaces before it reports the release's failure)
    and the state record, marked ``deleting``, keeps the allocations' sequence numbers.
    Record the request for the sweeper (pending.py) and answer success, as the plugin does
    when fabricd is down; the release happens when etcd is back, before any ADD of the same
    attachment. False (answer the error) without a pending dir or when the write fails."""
    if not isinstance(exc, DatastoreUnavailable):
        return False
    pending = workloads.d.pending
    if pending is None:
        return False
    try:
        pending.record(env, stdin)
    except OSError as e:
        log.error("CNI DEL %s: etcd is unreachable and recording the DEL in %s failed: %s",
                  _who(env), pending.path, e)  # fmt: skip
        return False
    log.warning("CNI DEL %s: etcd is unreachable; interfaces and routes removed, the "
                "release recorded in %s (finished when etcd answers)", _who(env), pending.path)  # fmt: skip
    return True


def _who(env: Mapping[str, str]) -> str:
    return f"{env.get('CNI_CONTAINERID', '')}/{env.get('CNI_IFNAME', '')}"


class CNIServer:
    def __init__(
        self,
        path: Path,
        handler: Handler,
        request_timeout: float = REQUEST_TIMEOUT,
        max_concurrent: int = MAX_CONCURRENT,
    ) -> None:
        self.path = path
        self.handler = handler
        self.request_timeout = request_timeout
        self._sem = asyncio.Semaphore(max_concurrent)
        self._server: asyncio.base_events.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._work: set[asyncio.Task[tuple[int, bytes]]] = set()

    async def start(self) -> None:
        sock = _bind(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        log.info("serving CNI requests on %s", self.path)

    async def stop(self, drain: float = DRAIN) -> None:
        """Stop accepting, remove the socket, let requests in flight finish (up to
        ``drain`` s), cancel the rest. Idempotent."""
        if self._server is not None:
            self._server.close()
            self._server = None
            self._unlink()
        if self._work:
            log.info("waiting for %d CNI requests in flight", len(self._work))
            _, pending = await asyncio.wait(set(self._work), timeout=drain)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # not a successor's socket
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                h = decode_header(await reader.readexactly(HEADER))
                body = await reader.readexactly(h.env_len + h.stdin_len)
            env = decode_env(body[: h.env_len])
            reply = await self._run(env, body[h.env_len :], h.flags)
            writer.write(reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, FramingError, ConnectionError, TimeoutError) as e:
            log.info("dropped a CNI connection: %s", e or type(e).__name__)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _run(self, env: Mapping[str, str], stdin: bytes, flags: int) -> bytes:
        async with self._sem:
            task = asyncio.create_task(self.handler(env, stdin, flags))
            self._work.add(task)
            task.add_done_callback(self._work.discard)
            done, _ = await asyncio.wait({task}, timeout=self.request_timeout)
        if task in done:
            code, out = task.result()
            return encode_reply(code, out)
        log.warning("CNI %s %s still running after %.0f s: answered 11; it runs on",
                    env.get("CNI_COMMAND"), _who(env), self.request_timeout)  # fmt: skip
        err = CNIError(Code.TRY_AGAIN_LATER, "fabricd did not finish the request in time")
        return encode_reply(1, err.to_json(error_version(stdin)))


def _bind(path: Path) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600, never visible with another mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_socket() and _answers(path):
        raise RuntimeError(f"another process serves CNI requests on {path}")
    if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
        raise RuntimeError(f"{path} exists and is not a socket; not replacing it")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)  # also replaces a stale socket file
        sock.listen(512)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        tmp.unlink(missing_ok=True)
        raise
    return sock


def _answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
