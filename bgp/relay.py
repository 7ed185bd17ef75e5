"""The ExaBGP API process: relays between ExaBGP's pipes and fabricd's unix socket.

ExaBGP execs this file (``<python> -IS .../bgp/relay.py``) as its only API process.
Standard library only, no package imports, so it starts in a few milliseconds and cannot
break when fabricd's environment changes.

Contract:
- Lines ExaBGP writes to our stdin go to the socket named by ``$FABRIC_RELAY_SOCKET``
  (inherited from ExaBGP's environment); lines read from the socket go to our stdout,
  one complete line per write (ExaBGP reads commands line by line).
- Stdin is drained by a dedicated thread at all times: ExaBGP blocks on a full pipe and
  then misses keepalives (the probe lost a session to "hold timer expired" in 8 s).
  While the socket is absent or slow, lines are buffered up to ``BUFFER_BYTES`` (give or
  take one read of ``READ_SIZE``); beyond that the oldest are dropped and counted.
- On every connect the relay first sends
  ``{"type": "relay", "pid": P, "connected": true, "dropped": N}``; after drops while
  connected it sends the same with ``"connected": false``. N is cumulative.
- It never exits while ExaBGP runs (ExaBGP stops its peers when the API process dies):
  socket errors lead to a reconnect with backoff (50 ms doubling to 1 s), and so does a
  connection closed within a second (fabricd refuses the relay of an ExaBGP it does not
  run: the old one of a fabricd that was killed, still shutting down). It exits on
  EOF on stdin (ExaBGP is gone), after trying for up to ``EOF_GRACE`` s to pass on what
  it still holds (ExaBGP's shutdown notice, for instance).
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import sys
import threading
import time

ENV_SOCKET = "FABRIC_RELAY_SOCKET"
# 64 MiB holds about 3M received prefixes of ExaBGP JSON: far more than any burst fabricd
# takes more than a few seconds to read, small next to ExaBGP's own memory use.
BUFFER_BYTES = 64 * 1024 * 1024
READ_SIZE = 256 * 1024
BACKOFF_MIN = 0.05
BACKOFF_MAX = 1.0
EOF_GRACE = 1.0
# s the sender waits for lines: None, no limit. Every line, EOF and a broken socket notify
# it under the condition's lock, so no wake-up can be missed; a limit only woke an idle
# relay for nothing (5 s: 12 wake-ups a minute, 0.5 s before that: 120)
PUMP_WAIT: float | None = None


class Relay:
    def __init__(
        self, path: str, stdin_fd: int = 0, stdout_fd: int = 1, limit: int = BUFFER_BYTES
    ) -> None:
        self.path = path
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.limit = limit
        self.cond = threading.Condition()
        self.chunks: collections.deque[bytes] = collections.deque()  # runs of whole lines
        self.size = 0
        self.dropped = 0
        self.reported = 0
        self.eof_at: float | None = None
        self.broken = False  # the current socket's reader saw it close
        self.out_lock = threading.Lock()

    # ------------------------------------------------------------- ExaBGP -> socket

    def read_stdin(self) -> None:
        """Drain stdin forever; never blocks on anything but the pipe itself."""
        partial = b""
        while True:
            try:
                data = os.read(self.stdin_fd, READ_SIZE)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                with self.cond:
                    self.eof_at = time.monotonic()
                    self.cond.notify_all()
                return
            cut = data.rfind(b"\n")
            if cut < 0:
                partial += data
                continue
            chunk = partial + data[: cut + 1]
            partial = data[cut + 1 :]
            with self.cond:
                self.chunks.append(chunk)
                self.size += len(chunk)
                while self.size > self.limit and len(self.chunks) > 1:
                    old = self.chunks.popleft()
                    self.size -= len(old)
                    self.dropped += old.count(b"\n")
                self.cond.notify_all()

    def _take(self, timeout: float | None) -> bytes:
        """Everything buffered (possibly b""), waiting up to ``timeout`` (None: until
        notified) for something."""
        with self.cond:
            if not self.chunks and self.eof_at is None and not self.broken:
                self.cond.wait(timeout)
            data = b"".join(self.chunks)
            self.chunks.clear()
            self.size = 0
            return data

    def _unread(self, data: bytes) -> None:
        """Put back what could not be sent, ahead of anything newer."""
        if data:
            with self.cond:
                self.chunks.appendleft(data)
                self.size += len(data)

    def notice(self, connected: bool) -> bytes:
        self.reported = self.dropped
        return (
            f'{{"type": "relay", "pid": {os.getpid()}, "connected": '
            f'{"true" if connected else "false"}, "dropped": {self.dropped}}}\n'
        ).encode()

    def pump(self, sock: socket.socket) -> None:
        """Send buffered lines until the socket fails or stdin hit EOF and all is sent."""
        sock.sendall(self.notice(True))
        while True:
            data = self._take(PUMP_WAIT)
            if self.broken:
                self._unread(data)
                raise ConnectionResetError("fabricd closed the socket")
            if self.dropped != self.reported:
                data = self.notice(False) + data
            if data:
                try:
                    sock.sendall(data)
                except OSError:
                    self._unread(data)
                    raise
            elif self.eof_at is not None:
                return

    # ------------------------------------------------------------- socket -> ExaBGP

    def write_out(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.stdout_fd, view)
            except InterruptedError:
                continue
            view = view[n:]

    def read_socket(self, sock: socket.socket) -> None:
        """Forward complete command lines to ExaBGP; a partial line dies with its socket."""
        partial = b""
        while True:
            try:
                data = sock.recv(READ_SIZE)
            except OSError:
                data = b""
            if not data:
                break
            cut = data.rfind(b"\n")
            if cut < 0:
                partial += data
                continue
            lines = partial + data[: cut + 1]
            partial = data[cut + 1 :]
            try:
                with self.out_lock:
                    self.write_out(lines)
            except OSError:
                # ExaBGP closed our stdout: it is going away, EOF on stdin follows.
                break
        with self.cond:
            self.broken = True
            self.cond.notify_all()

    # ------------------------------------------------------------- lifecycle

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock

    def run(self) -> None:
        threading.Thread(target=self.read_stdin, name="stdin", daemon=True).start()
        backoff = BACKOFF_MIN
        while True:
            if self.eof_at is not None and (
                not self.chunks or time.monotonic() - self.eof_at > EOF_GRACE
            ):
                return
            try:
                sock = self.connect()
            except OSError:
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            connected = time.monotonic()
            self.broken = False
            reader = threading.Thread(target=self.read_socket, args=(sock,), daemon=True)
            reader.start()
            try:
                self.pump(sock)
                return  # EOF on stdin and everything passed on
            except OSError as e:
                log(f"socket {self.path}: {e}; reconnecting")
            finally:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                reader.join(1.0)
            if time.monotonic() - connected >= BACKOFF_MAX:
                backoff = BACKOFF_MIN
            else:  # closed at once (a fabricd that is not ours refuses us): no tight loop
                time.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)


def log(msg: str) -> None:
    try:
        sys.stderr.write(f"fabric relay {os.getpid()}: {msg}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def main() -> None:
    path = os.environ.get(ENV_SOCKET)
    if not path:
        # Still drain stdin so ExaBGP never blocks; nothing to relay to.
        log(f"${ENV_SOCKET} is not set; discarding ExaBGP output")
        path = "\0fabric-relay-unset"
    with contextlib.suppress(KeyboardInterrupt):
        Relay(path).run()
    # Daemon threads may sit in blocking reads; leave without joining them.
    os._exit(0)


if __name__ == "__main__":
    main()
