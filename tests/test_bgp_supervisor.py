"""bgp.supervisor with real child processes: restart with backoff, SIGTERM then SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from bgp import supervisor
from bgp.supervisor import Supervisor

LOG = logging.getLogger("test")


def test_restarts_with_backoff_and_logs_output(tmp_path: Path) -> None:
    exits: list[tuple[float, int | None]] = []
    spawns: list[float] = []

    async def run() -> None:
        sup = Supervisor(
            ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
            dict(os.environ),
            tmp_path / "child.out",
            on_spawn=lambda: spawns.append(time.monotonic()),
            on_exit=lambda status: exits.append((time.monotonic(), status)),
            log=LOG,
        )
        await sup.start()
        deadline = time.monotonic() + 10
        while sup.restarts < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await sup.stop(1.0)
        assert sup.pid is None
        n = sup.restarts
        await asyncio.sleep(1.0)
        assert sup.restarts == n  # no restart after stop

    asyncio.run(run())
    assert [s for _, s in exits[:3]] == [3, 3, 3]
    gaps = [spawns[i + 1] - exits[i][0] for i in range(2)]
    assert supervisor.BACKOFF_MIN <= gaps[0] < supervisor.BACKOFF_MIN + 0.4
    assert 2 * supervisor.BACKOFF_MIN <= gaps[1] < 2 * supervisor.BACKOFF_MIN + 0.4
    out = (tmp_path / "child.out").read_text()
    assert out.count("out\n") >= 3 and out.count("err\n") >= 3


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    async def run() -> None:
        sup = Supervisor(
            ["/bin/sh", "-c", "trap '' TERM; echo ready; sleep 30"],
            dict(os.environ),
            tmp_path / "child.out",
            on_spawn=lambda: None,
            on_exit=lambda status: None,
            log=LOG,
        )
        await sup.start()
        await asyncio.sleep(0.5)  # the shell must have set its trap
        t = time.monotonic()
        await sup.stop(0.5)
        assert 0.5 <= time.monotonic() - t < 3
        assert sup.proc is not None and sup.proc.returncode == -9
        assert sup.restarts == 0

    asyncio.run(run())


FORK_PROBE = """
import asyncio, os, sys
import ipam.store  # sets gRPC's fork support off (unless the environment says otherwise)
import grpc

async def main():
    ch = grpc.aio.insecure_channel("127.0.0.1:1")  # RPCs in flight: gRPC's threads busy
    async def rpcs():
        while True:
            try:
                await ch.unary_unary("/probe/Call")(b"", timeout=0.01)
            except grpc.RpcError:
                pass
    busy = asyncio.create_task(rpcs())
    bad = 0
    for _ in range(150):  # a preexec_fn: fork() with Python in the child, the worst case
        p = await asyncio.create_subprocess_exec("/bin/true", preexec_fn=lambda: None)
        bad += await p.wait() != 0
    busy.cancel()
    print(bad)

asyncio.run(main())
"""


def test_children_spawned_while_grpc_is_busy_all_run() -> None:
    """With gRPC's fork support on (grpcio's default), its fork handlers restart its threads
    in a forked child: 4 of 150 such children failed here, with epoll errors from gRPC's
    event-engine threads (and segfaults in fabricd's children in the kernel log). ipam.store
    turns it off; bgp.supervisor does not run Python in the child at all."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    r = subprocess.run([sys.executable, "-c", FORK_PROBE], capture_output=True, text=True,
                       timeout=120, env=env, cwd=Path(__file__).parents[1], check=True)  # fmt: skip
    assert r.stdout.strip() == "0", r.stderr[-2000:]
    assert "fork_posix" not in r.stderr and "epoll_wait error" not in r.stderr
