"""bgp.relay, run as ExaBGP runs it (a child with pipes) against a real unix socket."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import BinaryIO

from bgp.relay import Relay

RELAY = Path(__file__).parents[1] / "bgp" / "relay.py"


def recv_lines(reader: BinaryIO, n: int) -> list[bytes]:
    out = [reader.readline() for _ in range(n)]
    assert all(line.endswith(b"\n") for line in out), "socket closed early"
    return [line[:-1] for line in out]


def listen(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    srv.settimeout(10)
    return srv


def accept(srv: socket.socket) -> tuple[socket.socket, BinaryIO]:
    conn, _ = srv.accept()
    conn.settimeout(10)
    return conn, conn.makefile("rb")


def test_buffers_until_connected_relays_both_ways_and_exits_on_eof(tmp_path: Path) -> None:
    path = tmp_path / "relay.sock"
    env = {"FABRIC_RELAY_SOCKET": str(path), "PATH": os.environ.get("PATH", "")}
    proc = subprocess.Popen(
        ["/usr/bin/python3", "-IS", str(RELAY)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # no socket yet: the relay must keep draining (a blocked ExaBGP loses its sessions)
        burst = b"".join(b'{"n": %d}\n' % i for i in range(20_000))  # ~200 KiB > pipe size
        t = time.monotonic()
        proc.stdin.write(burst)
        proc.stdin.flush()
        assert time.monotonic() - t < 5
        with listen(path) as srv:
            conn, rd = accept(srv)  # it retries with backoff until we listen
            with conn, rd:
                first, *rest = recv_lines(rd, 20_001)
                hello = json.loads(first)
                assert hello["type"] == "relay" and hello["connected"] is True
                assert hello["dropped"] == 0 and hello["pid"] == proc.pid
                assert rest[0] == b'{"n": 0}' and rest[-1] == b'{"n": 19999}'
                # commands: complete lines only reach ExaBGP
                conn.sendall(b"announce route 10.0.0.0/24 next-hop self\nver")
                assert proc.stdout.readline() == b"announce route 10.0.0.0/24 next-hop self\n"
                conn.sendall(b"sion\n")
                assert proc.stdout.readline() == b"version\n"
                proc.stdin.write(b"done\n")
                proc.stdin.flush()
                assert recv_lines(rd, 1) == [b"done"]
            # fabricd went away: the relay reconnects and says hello again
            conn, rd = accept(srv)
            with conn, rd:
                assert json.loads(recv_lines(rd, 1)[0])["connected"] is True
                proc.stdin.write(b"after\n")
                proc.stdin.close()  # ExaBGP exits: lines still held are passed on first
                assert recv_lines(rd, 1) == [b"after"]
                assert proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


def test_drops_oldest_when_full_and_reports_it(tmp_path: Path) -> None:
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    relay = Relay(str(tmp_path / "relay.sock"), stdin_fd=r_in, stdout_fd=w_out, limit=10_000)
    thread = threading.Thread(target=relay.run, daemon=True)
    thread.start()
    try:
        written = 0
        for batch in range(20):  # about 21 KB, twice the limit, read as separate chunks
            data = b"".join(b"line %05d .........\n" % (batch * 50 + i) for i in range(50))
            os.write(w_in, data)
            written += len(data)
            deadline = time.monotonic() + 5
            while relay.size + 21 * relay.dropped < written:  # wait until it was read
                assert time.monotonic() < deadline
                time.sleep(0.001)
        assert relay.dropped > 0 and relay.size <= 10_000
        with listen(tmp_path / "relay.sock") as srv:
            conn, rd = accept(srv)
            with conn, rd:
                hello = json.loads(recv_lines(rd, 1)[0])
                kept = 1000 - hello["dropped"]
                assert 0 < hello["dropped"] < 1000
                lines = recv_lines(rd, kept)
                assert lines[-1] == b"line 00999 ........."  # the newest survive
                os.close(w_in)
                thread.join(5)
                assert not thread.is_alive()
    finally:
        for fd in (r_in, r_out, w_out):
            os.close(fd)


def test_a_connection_closed_at_once_is_retried_with_backoff(tmp_path: Path) -> None:
    """fabricd refuses the relay of an ExaBGP it does not run (closes at once): the relay
    retries with its backoff (50 ms doubling), not in a tight loop."""
    path = tmp_path / "relay.sock"
    env = {"FABRIC_RELAY_SOCKET": str(path), "PATH": os.environ.get("PATH", "")}
    with listen(path) as srv:
        srv.listen(64)
        proc = subprocess.Popen(["/usr/bin/python3", "-IS", str(RELAY)],
                                stdin=subprocess.PIPE, env=env)  # fmt: skip
        try:
            accepted: list[float] = []
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                srv.settimeout(max(0.01, end - time.monotonic()))
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    break
                accepted.append(time.monotonic())
                conn.close()
        finally:
            proc.kill()
            proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
    # 50 + 100 + 200 + 400 + 800 ms of backoff: 5-6 connections in 2 s (was one per
    # round trip, thousands)
    assert 2 <= len(accepted) <= 8, f"{len(accepted)} connections in 2 s"
    gaps = [b - a for a, b in itertools.pairwise(accepted)]
    assert all(g >= 0.04 for g in gaps), gaps
