"""A pod holding a borrowed address works from its first packet (docs/design/cni.md,
"Borrowed addresses"): its CNI ADD returns only once its /32 is announced, so pings from
the other rack, started the moment ADD returns, lose nothing. Without the wait the rest of
the fabric sent the first ~100 ms of its traffic to the block's owner, which blackholes its
block (issue 13, the soak's borrowed pods).

two-rack lab, fabricd on every host, the installed plugin exec'd as a runtime does: node2
owns the block of the ``IP=`` requests, node1 borrows from it, node3 (the other rack) pings.
"""

from __future__ import annotations

import re
import time

import pytest
from fabric_helpers import fabric_lab

from lab import pods
from lab.bench.soak_probe import COUNT, FirstPing
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
OWNER, BORROWER, REMOTE = "node2", "node1", "node3"
BLOCK = "10.244.250.0/26"  # a block no automatic choice takes first (the pool's far end)
ROUNDS = 6


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
    pods.install(lab, [OWNER, BORROWER, REMOTE])
    return lab


def announce_waits(lab: Lab, node: str) -> dict[str, float]:
    code, text = lab.health(node, "/metrics")
    assert code == 200, text
    found = re.findall(r'^fabric_cni_announce_waits_total\{result="(\w+)"\} (\S+)$', text, re.M)
    return {k: float(v) for k, v in found}


def test_borrowed_pod_answers_the_other_rack_from_its_first_ping(lab: Lab) -> None:
    base = BLOCK.split("/", maxsplit=1)[0].rsplit(".", 1)[0]
    owner_pod = pods.add(lab, OWNER, name="owner", args=f";IP={base}.1")  # claims the block
    remote = pods.add(lab, REMOTE, name="remote")
    lab.wait_for(lambda: BLOCK in lab.kernel_routes(REMOTE), 30, what=f"{BLOCK} on {REMOTE}")
    lab.wait_for(lambda: pods.ping(lab, remote, owner_pod.ip), 30, what="owner pod reachable")
    first = pods.add(lab, BORROWER, name="first")  # claims a block: waits for it (counted)
    assert announce_waits(lab, BORROWER).get("announced") == 1
    time.sleep(0.5)
    before = announce_waits(lab, BORROWER)
    ordinary = pods.add(lab, BORROWER, name="ordinary")  # the same block, announced: no wait
    assert ordinary.ip != first.ip and pods.ping(lab, ordinary, remote.ip, count=3)
    assert announce_waits(lab, BORROWER) == before
    losses: list[str] = []
    took: list[float] = []
    for i in range(ROUNDS):
        started = time.monotonic()
        pod = pods.add(lab, BORROWER, name=f"borrow{i}", args=f";IP={base}.{10 + i}")
        took.append(time.monotonic() - started)
        # at once, both ways: the pod's own pings (their replies come back to the borrowed
        # address) and the other rack's (its requests go to the borrowed address)
        out_ = FirstPing(lab, pod, remote.ip, lambda: None)
        in_ = FirstPing(lab, remote, pod.ip, lambda: None)
        for what, probe in (("from", out_), ("to", in_)):
            lost, gap = probe.wait()
            if lost:
                losses.append(f"{pod.name} ({pod.ip}) {what} {REMOTE}: {lost} of {COUNT} "
                              f"lost, worst gap {gap:.0f} ms")  # fmt: skip
    assert not losses, losses
    after = announce_waits(lab, BORROWER)
    assert after.get("announced", 0) - before.get("announced", 0) == ROUNDS
    assert after.get("timeout", 0) == before.get("timeout", 0)
    assert max(took) < 10, took
    # the owner routes the borrowed addresses to the borrower (the /32 it learned wins over
    # its blackhole of the block), not into the blackhole
    for i in range(ROUNDS):
        addr = f"{base}.{10 + i}"
        lab.wait_for(lambda a=addr: "via" in lab.kernel_routes(OWNER).get(a, ""), 10,
                     what=f"{addr} via a gateway on {OWNER}")  # fmt: skip
    # fabric_ipam_allocated_ips: one address per pod of the node, borrowed ones included
    lab.wait_for(lambda: allocated_ips(lab, BORROWER) == 2 + ROUNDS, 15,
                 what=f"{BORROWER}'s fabric_ipam_allocated_ips at {2 + ROUNDS}")  # fmt: skip
    assert allocated_ips(lab, OWNER) == 1


def allocated_ips(lab: Lab, node: str) -> float:
    code, text = lab.health(node, "/metrics")
    assert code == 200, text
    found = re.search(r"^fabric_ipam_allocated_ips (\S+)$", text, re.M)
    assert found, text[-2000:]
    return float(found.group(1))
