"""The lab by hand, through its command line as a person types it: ``python -m lab up
two-rack --fabric``, ``python -m lab pod add|list|del``, ``python -m lab fabricd
stop|start|restart`` (docs/lab.md, "A walk-through")."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from lab_checks import lab_name

from lab import netns
from lab.runner import Lab, teardown
from lab.state import lab_dir

pytestmark = [pytest.mark.lab, pytest.mark.root]


def lab_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def ok(*args: str) -> str:
    r = lab_cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def name(need_root: None) -> Iterator[str]:
    n = lab_name("by-hand")
    try:
        ok("up", "two-rack", "--name", n, "--fabric")
        yield n
    finally:
        teardown(lab_dir(n))


def pod_list(name: str, *args: str) -> list[dict[str, Any]]:
    return list(json.loads(ok("pod", "list", "--lab", name, "-o", "json", *args)))


def test_up_fabric_then_pods_across_racks(name: str) -> None:
    lab = Lab.attach(name)
    assert all(lab.fabricd_running(h) for h in lab.nodes("node"))
    out = ok("pod", "add", "--lab", name, "--node", "node1", "--name", "web", "--ns", "shop")
    assert out.splitlines()[0].split() == ["NODE", "NAMESPACE", "NAME", "IP", "INTERFACE",
                                           "PHASE"]  # fmt: skip
    assert out.splitlines()[1].split()[:3] == ["node1", "shop", "web"]
    ok("pod", "add", "--lab", name, "--node", "node3", "--name", "db")
    (web,) = pod_list(name, "--name", "web")
    (db,) = pod_list(name, "--node", "node3")
    assert web["namespace"] == "shop" and web["phase"] == "ready"
    db_ip = db["ips"][0].split("/")[0]
    web_ns = web["netns"].rsplit("/", 1)[1]
    lab.wait_for(lambda: lab.exec("node1", ["ip", "netns", "exec", web_ns, "ping", "-c1", "-W1",
                                            db_ip]).returncode == 0, 60, 0.5, "web -> db")  # fmt: skip
    r = lab_cli("pod", "add", "--lab", name, "--node", "node1", "--name", "web")
    assert r.returncode == 1 and "already attached" in r.stderr and "Traceback" not in r.stderr
    r = lab_cli("pod", "add", "--lab", name, "--node", "tor1")
    assert r.returncode == 1 and "is not a host" in r.stderr
    ok("pod", "del", "--lab", name, "web", "db")
    assert pod_list(name) == []
    assert not netns.exists(f"{lab.plan.prefix}pweb") and not netns.exists(f"{lab.plan.prefix}pdb")


def test_fabricd_stop_start_restart(name: str) -> None:
    ok("pod", "add", "--lab", name, "--node", "node2", "--name", "keep")
    ok("pod", "add", "--lab", name, "--node", "node2", "--name", "gone")
    out = ok("fabricd", "stop", "node2", "--name", name, "--signal", "KILL")
    assert "stopped (SIGKILL)" in out and not Lab.attach(name).fabricd_running("node2")
    r = lab_cli("pod", "add", "--lab", name, "--node", "node2", "--name", "late")
    assert r.returncode == 1 and "failed: error 11: fabricd is not reachable" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    ok("pod", "del", "--lab", name, "gone")  # recorded while fabricd is down
    assert "ready" in ok("fabricd", "start", "node2", "--name", name)
    assert [p["name"] for p in pod_list(name, "--node", "node2")] == ["keep"]
    old = Lab.attach(name).fabricd_pid("node2")
    assert "ready" in ok("fabricd", "restart", "node2", "--name", name)
    assert Lab.attach(name).fabricd_pid("node2") != old
    ok("pod", "del", "--lab", name, "keep")
    r = lab_cli("fabricd", "stop", "nosuch", "--name", name)
    assert r.returncode == 1 and "not a host" in r.stderr
