"""bgp.supervisor with real child processes: restart with backoff, SIGTERM then SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import os
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
