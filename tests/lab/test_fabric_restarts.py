"""Restarts in two-rack: fabricd killed and restarted keeps its kernel routes throughout;
ExaBGP killed is restarted and everything re-announced; an FRR ToR restarted: routes
come back."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

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


def gone(pid: int) -> bool:
    """``pid`` exited (a zombie counts: reaping an orphan is init's business)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


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


def test_sigkill_while_the_old_exabgp_is_slow_to_stop(lab: Lab, blocks: dict[str, str]) -> None:
    """fabricd SIGKILLed: its ExaBGP gets SIGTERM but can take seconds to stop under load,
    and its relay keeps reconnecting to relay.sock, by then the new fabricd's. Held stopped
    here across the restart: the new fabricd must serve only its own ExaBGP's relay (served,
    the old ExaBGP's 'stop' of its session reached the new RIB: learned routes deleted for
    1.1 s and /readyz 503 for over 60 s in the run that found it)."""
    node = "node4"
    before = lab.kernel_routes(node)
    old = status(lab, node)["speaker"]["pid"]

    def intact() -> bool:
        now = lab.kernel_routes(node)
        return all(now.get(k) == v for k, v in before.items())

    with watching(intact) as failures:
        os.kill(old, signal.SIGSTOP)  # the parent-death SIGTERM stays pending
        try:
            lab.stop_fabricd(node, signal.SIGKILL)
            lab.start_fabricd(node)
            lab.wait_for(lambda: lab.health(node, "/readyz")[0] == 200, 60, what="ready again")
            time.sleep(2.0)  # the old relay retries within 1 s
        finally:
            os.kill(old, signal.SIGCONT)
        lab.wait_for(lambda: gone(old), 30, what="the old ExaBGP gone")
        time.sleep(2.0)
        assert lab.health(node, "/readyz")[0] == 200
    assert failures == [], f"routes missing at {len(failures)} samples"
    assert lab.kernel_routes(node) == before
    log = (lab.dir / node / "fabricd.out").read_text()
    assert "refused a relay of another ExaBGP" in log, "the old relay never came: not tested"


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
