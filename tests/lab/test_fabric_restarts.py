"""Restarts in two-rack: fabricd killed and restarted keeps its kernel routes throughout;
ExaBGP killed is restarted and everything re-announced; an FRR ToR restarted: routes
come back."""

from __future__ import annotations

import os
import signal
import time

import pytest
from fabric_helpers import allocate, fabric_lab, status, watching

from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node2", "node3", "node4")


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
    return lab


@pytest.fixture(scope="module")
def blocks(lab: Lab) -> dict[str, str]:
    got = {h: allocate(lab, h, f"t.{h}.eth0")[0][1] for h in HOSTS}
    for owner, block in got.items():
        for other in HOSTS:
            if other != owner:
                lab.wait_for(
                    lambda o=other, b=block: b in lab.kernel_routes(o),
                    30,
                    what=f"{block} on {other}",
                )
    return got


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_fabricd_restart_keeps_kernel_routes(lab: Lab, blocks: dict[str, str], sig: int) -> None:
    node = "node3"
    before = lab.kernel_routes(node)
    assert blocks["node1"] in before and before[blocks[node]] == "blackhole"

    def intact() -> bool:
        now = lab.kernel_routes(node)
        elsewhere = blocks[node] in lab.kernel_routes("node1")
        return all(now.get(k) == v for k, v in before.items()) and elsewhere

    with watching(intact) as failures:
        lab.stop_fabricd(node, sig)
        assert not lab.fabricd_running(node)
        time.sleep(1.0)
        lab.start_fabricd(node)
        lab.wait_for(lambda: lab.health(node, "/readyz")[0] == 200, 60, what="fabricd ready again")
        time.sleep(2.0)
    assert failures == [], f"routes missing at {len(failures)} samples"
    assert lab.kernel_routes(node) == before


def test_exabgp_killed_is_restarted_and_reannounces(lab: Lab, blocks: dict[str, str]) -> None:
    node = "node4"
    doc = status(lab, node)
    pid, restarts = doc["speaker"]["pid"], doc["speaker"]["restarts"]
    os.kill(pid, signal.SIGKILL)
    lab.wait_for(
        lambda: (
            status(lab, node)["speaker"]["restarts"] > restarts
            and status(lab, node)["speaker"]["pid"] != pid
        ),
        30,
        what="ExaBGP restarted",
    )
    lab.wait_for(lambda: lab.health(node, "/readyz")[0] == 200, 60, what="ready again")
    for other in ("node1", "node3"):
        lab.wait_for(
            lambda o=other: blocks[node] in lab.kernel_routes(o),
            30,
            what=f"re-announced to {other}",
        )
    assert lab.kernel_routes(node).get(blocks["node1"]), "learned routes on node4 back"


def test_frr_tor_restart_routes_come_back(lab: Lab, blocks: dict[str, str]) -> None:
    lab.restart_router("tor1")
    lab.wait_for(lambda: lab.established("tor1"), 60, what="tor1 sessions")
    for node in ("node1", "node2"):
        for owner in ("node3", "node4"):
            lab.wait_for(
                lambda n=node, o=owner: blocks[o] in lab.kernel_routes(n),
                60,
                what=f"{blocks[owner]} on {node}",
            )
    for other in ("node3", "node4"):
        lab.wait_for(
            lambda o=other: blocks["node1"] in lab.kernel_routes(o),
            60,
            what=f"node1's block on {other}",
        )
