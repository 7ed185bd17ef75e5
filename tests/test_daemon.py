"""fabricd as a process: start-up failures give one line and a non-zero exit (so systemd's
Restart=on-failure brings it back), never a traceback or a silent exit 0."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    name = "tfd" + secrets.token_hex(2)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_unreachable_etcd_exits_non_zero_with_one_line(netns: str, tmp_path: Path) -> None:
    cfg = tmp_path / "fabricd.yaml"
    cfg.write_text(
        "nodeName: n1\naddresses: {ipv4: 10.80.0.2/24}\n"
        "etcd: {endpoints: ['http://127.0.0.1:1'], timeout: 1.0}\n"
        f"runDir: {tmp_path}/run\ncni: {{socket: {tmp_path}/run/cni.sock, stateDir: {tmp_path}/state}}\n"
        "health: {listen: '127.0.0.1:0'}\n"
    )
    r = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "fabric.agent.daemon", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "fabricd exits:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "127.0.0.1:1" in r.stderr


def test_bad_config_names_field_and_line(tmp_path: Path) -> None:
    cfg = tmp_path / "fabricd.yaml"
    cfg.write_text("nodeName: n1\naddresses: {ipv4: 10.80.0.2/24}\netcd:\n  endpoints: [x]\n")
    r = subprocess.run(
        [sys.executable, "-m", "fabric.agent.daemon", "--config", str(cfg)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    assert "fabricd.yaml:4" in r.stderr and "etcd.endpoints" in r.stderr, r.stderr
