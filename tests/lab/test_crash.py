"""A runner SIGKILLed in the middle of `up`, then `down`, leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lab_checks import assert_gone, lab_name, root_links

from lab.runner import Lab
from lab.state import LabState

pytestmark = [pytest.mark.lab, pytest.mark.root]


def _stage_reached(path: os.PathLike[str], stage: str) -> bool:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return False
    if stage == "namespaces":
        return bool(data["namespaces"])
    return any(p["what"] == stage for p in data["procs"])


@pytest.mark.parametrize("stage", ["namespaces", "etcd-m0", "zebra", "bird"])
def test_sigkill_during_up_then_down_leaves_nothing(need_root: None, stage: str) -> None:
    name = lab_name(f"kill-{stage}")
    lab_dir = Lab("two-rack", name=name).dir
    links = root_links()
    runner = subprocess.Popen(
        [sys.executable, "-m", "lab", "up", "two-rack", "--name", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _stage_reached(lab_dir / "state.json", stage):
            assert runner.poll() is None, "runner finished before the stage was reached"
            assert time.monotonic() < deadline, f"stage {stage} not reached"
            time.sleep(0.005)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        state = LabState.load(lab_dir)
        assert state.phase == "creating"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        down = subprocess.run(
            [sys.executable, "-m", "lab", "down", name], check=False, capture_output=True, text=True
        )
    assert down.returncode == 0, down.stderr
    assert_gone(state, links)
