"""Every bundled topology comes up and goes down leaving nothing; a second down is harmless."""

from __future__ import annotations

import subprocess
import sys

import pytest
from lab_checks import assert_gone, lab_name, root_links, snapshot

from lab import netns
from lab.runner import Lab
from lab.topology import Role
from lab.view import LabError

pytestmark = [pytest.mark.lab, pytest.mark.root]


@pytest.mark.parametrize("topology", ["mesh3", "two-rack", "rr", "dual-homed"])
def test_up_down_leaves_nothing(need_root: None, topology: str) -> None:
    links = root_links()
    lab = Lab(topology, name=lab_name(topology))
    with lab:
        state = snapshot(lab.dir)
        assert state.phase == "up"
        assert all(netns.exists(ns) for ns in lab.plan.namespaces)
        rows = lab.status()
        dead = [(r["node"], p) for r in rows for p, alive in r["processes"].items() if not alive]
        assert dead == []
        routers = [n for n in lab.nodes() if lab.node(n).role.is_router]
        assert sum(len(lab.processes(r)) for r in routers) >= len(routers)
        for n in lab.nodes(Role.NODE):
            assert lab.fabricd_config_path(n).is_file()
        with pytest.raises(LabError, match="already exists"):
            Lab(topology, name=lab.name).up()
    assert_gone(state, links)
    assert lab.down() is False


def test_mesh3_hosts_reach_each_other_on_the_segment(make_lab) -> None:  # type: ignore[no-untyped-def]
    lab = make_lab("mesh3")
    for other in ("node2", "node3"):
        r = lab.exec("node1", ["ping", "-c1", "-W2", lab.address(other)])
        assert r.returncode == 0, r.stdout + r.stderr


def test_cli_up_status_exec_down(need_root: None) -> None:
    name = lab_name("cli")
    links = root_links()
    run = [sys.executable, "-m", "lab"]
    up = subprocess.run(
        [*run, "up", "mesh3", "--name", name], check=False, capture_output=True, text=True
    )
    assert up.returncode == 0, up.stderr
    assert "is up" in up.stderr and "node1" in up.stdout
    state = snapshot(Lab("mesh3", name=name).dir)
    try:
        st = subprocess.run(
            [*run, "status", name, "-o", "json"], check=False, capture_output=True, text=True
        )
        assert '"etcd-m0": true' in st.stdout
        ex = subprocess.run(
            [*run, "exec", "--name", name, "node1", "--", "ip", "-o", "addr"],
            check=False,
            capture_output=True,
            text=True,
        )
        assert "10.255.8.1/24" in ex.stdout
    finally:
        down = subprocess.run([*run, "down", name], check=False, capture_output=True, text=True)
    assert down.returncode == 0 and "is down" in down.stdout
    again = subprocess.run([*run, "down", name], check=False, capture_output=True, text=True)
    assert again.returncode == 0 and "was not up" in again.stdout
    assert_gone(state, links)
