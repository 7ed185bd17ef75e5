"""two-rack: fabricd on four hosts peering with their ToR (FRR in rack 1, BIRD in rack 2).
Hosts learn each other's blocks through the ToRs; the ToRs hold exactly the confirmed
blocks; a prefix outside the pools is rejected and counted; a wrong MD5 password never
establishes; readiness follows the required peers; liveness follows ExaBGP."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest
from fabric_helpers import allocate, status

from lab import routers
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node2", "node3", "node4")
TOR = {"node1": "tor1", "node2": "tor1", "node3": "tor2", "node4": "tor2"}


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab: Lab = make_lab("two-rack")
    for r in ("spine", "tor1", "tor2"):
        lab.wait_for(lambda r=r: lab.established(r), 30, what=f"BGP sessions of {r}")
    lab.start_fabric()
    return lab


@pytest.fixture(scope="module")
def blocks(lab: Lab) -> dict[str, str]:
    return {h: allocate(lab, h, f"t.{h}.eth0")[0][1] for h in HOSTS}


def tor_prefixes(lab: Lab, tor: str) -> set[str]:
    """Prefixes inside the pod pool in the ToR's BGP table."""
    d = lab.dir / tor
    if lab.node(tor).role == "frr":
        text = routers.vtysh(d, "show ip bgp").stdout
    else:
        text = routers.birdc(d, "show route").stdout
    return set(re.findall(r"(10\.244\.\d+\.\d+/\d+)", text))


def test_hosts_learn_each_others_blocks_through_their_tors(
    lab: Lab, blocks: dict[str, str]
) -> None:
    for owner, block in blocks.items():
        for other in HOSTS:
            if other == owner:
                continue
            tor_ip = lab.node(other).neighbors[0].address
            lab.wait_for(
                lambda o=other, b=block, t=tor_ip: (
                    f"via {t} " in (lab.kernel_routes(o).get(b, "") + " ")
                ),
                30,
                what=f"{block} via {tor_ip} on {other}",
            )


def test_tors_hold_exactly_the_confirmed_blocks(lab: Lab, blocks: dict[str, str]) -> None:
    want = set(blocks.values())
    for tor in ("tor1", "tor2"):
        lab.wait_for(lambda t=tor: tor_prefixes(lab, t) == want, 20, what=f"{tor} has {want}")


def test_prefix_outside_pools_is_rejected_and_counted(lab: Lab, blocks: dict[str, str]) -> None:
    d = lab.dir / "tor1"
    r = lab.exec(
        "tor1",
        [
            "vtysh",
            "--vty_socket",
            str(d),
            "-c",
            "conf t",
            "-c",
            "router bgp 65001",
            "-c",
            "no bgp network import-check",
            "-c",
            "address-family ipv4 unicast",
            "-c",
            "network 10.250.0.0/24",
        ],
    )
    assert r.returncode == 0, r.stdout + r.stderr

    def rejected() -> int:
        return sum(s["rejected"] for s in status(lab, "node1")["sessions"])

    before = 0
    lab.wait_for(lambda: rejected() > before, 20, what="a rejected prefix on node1")
    time.sleep(1)
    assert "10.250.0.0/24" not in lab.kernel_routes("node1")
    assert "10.250.0.0/24" not in lab.exec("node1", ["ip", "route"]).stdout
    _, metrics = lab.health("node1", "/metrics")
    assert re.search(r"fabric_bgp_prefix_rejections_total\{[^}]*\} [1-9]", metrics), metrics[-2000:]


def test_livez_follows_exabgp(lab: Lab, blocks: dict[str, str]) -> None:
    assert lab.health("node4", "/livez")[0] == 200
    pid = status(lab, "node4")["speaker"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        lab.wait_for(lambda: lab.health("node4", "/livez")[0] == 503, 10, what="livez 503")
    finally:
        os.kill(pid, signal.SIGCONT)
    lab.wait_for(lambda: lab.health("node4", "/livez")[0] == 200, 10, what="livez 200 again")


def test_readyz_needs_a_required_peer(lab: Lab, blocks: dict[str, str]) -> None:
    """node2's only peer gets a wrong AS: never Established, so not ready; fixed: ready."""
    assert lab.health("node2", "/readyz")[0] == 200
    peer = "node2-tor1"
    good = lab.fabricctl(["peer", "show", peer, "-o", "json"]).stdout
    assert lab.fabricctl(["peer", "delete", peer]).returncode == 0
    tor_ip = str(lab.node("node2").neighbors[0].address)
    r = lab.fabricctl(
        [
            "peer",
            "add",
            peer,
            "--node",
            "node2",
            "--peer-ip",
            tor_ip,
            "--as-number",
            "65009",
            "--hold-time",
            "9",
        ]
    )
    assert r.returncode == 0, r.stderr
    try:
        lab.wait_for(lambda: lab.health("node2", "/readyz")[0] == 503, 30, what="node2 unready")
        _, body = lab.health("node2", "/readyz")
        assert "0/1" in body
    finally:
        lab.fabricctl(["peer", "delete", peer])
        r = lab.fabricctl(
            [
                "peer",
                "add",
                peer,
                "--node",
                "node2",
                "--peer-ip",
                tor_ip,
                "--as-number",
                "65001",
                "--hold-time",
                "9",
            ]
        )
        assert r.returncode == 0, r.stderr + good
    lab.wait_for(lambda: lab.health("node2", "/readyz")[0] == 200, 60, what="node2 ready again")


def test_wrong_md5_password_never_establishes(lab: Lab, blocks: dict[str, str], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """tor1 requires a password from node1; node1's peer carries a different one."""
    d = lab.dir / "tor1"
    node1_ip = lab.address("node1")
    tor_ip = str(lab.node("node1").neighbors[0].address)
    cmds = ["conf t", "router bgp 65001", f"neighbor {node1_ip} remote-as 65101",
            f"neighbor {node1_ip} password right-secret", f"neighbor {node1_ip} timers 3 9",
            "address-family ipv4 unicast", f"neighbor {node1_ip} activate",
            f"neighbor {node1_ip} route-map HOSTS-IN in", f"neighbor {node1_ip} route-map ALL out"]  # fmt: skip
    argv = ["vtysh", "--vty_socket", str(d)]
    for c in cmds:
        argv += ["-c", c]
    assert lab.exec("tor1", argv).returncode == 0
    wrong = lab.dir / "node1" / "md5-wrong"
    wrong.write_text("wrong-secret\n")
    wrong.chmod(0o600)
    lab.fabricctl(["peer", "delete", "node1-tor1"])
    r = lab.fabricctl(["peer", "add", "node1-tor1", "--node", "node1", "--peer-ip", tor_ip,
                       "--as-number", "65001", "--hold-time", "9", "--password-file", str(wrong)])  # fmt: skip
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sess = [s for s in status(lab, "node1")["sessions"] if s["peerIP"] == tor_ip]
        assert sess and sess[0]["state"] != "up", sess
        time.sleep(1)
    log = (lab.dir / "node1" / "fabricd.out").read_text()
    assert "wrong-secret" not in log
