"""two-rack: fabricd on four hosts peering with their ToR (FRR in rack 1, BIRD in rack 2).
Hosts learn each other's blocks through the ToRs; the ToRs hold exactly the confirmed
blocks; a prefix outside the pools is rejected and counted; a wrong MD5 password never
establishes; readiness follows the required peers; liveness follows ExaBGP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fabric_helpers import allocate, fabric_lab, status

from lab import routers
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node2", "node3", "node4")
TOR = {"node1": "tor1", "node2": "tor1", "node3": "tor2", "node4": "tor2"}


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
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


def test_graph_shows_sessions_by_state_and_blocks(
    lab: Lab, blocks: dict[str, str], tmp_path
) -> None:  # type: ignore[no-untyped-def]
    from lab import graph

    lab.wait_for(
        lambda: all(s["state"] == "up" for h in HOSTS for s in status(lab, h)["sessions"]),
        30,
        what="every host session up",
    )
    # The picture draws blocks from each fabricd's status document, published every 2 s
    # (its route list can lag a burst of route changes by a publish or two).
    lab.wait_for(
        lambda: all(graph.collect(lab).nodes[h]["blocks"] == [blocks[h]] for h in HOSTS),
        30,
        what="every host's block in its status document",
    )
    pic = graph.collect(lab)
    for h in HOSTS:
        assert pic.sessions[(h, TOR[h])] == "up"
        assert pic.nodes[h]["blocks"] == [blocks[h]]
    assert pic.sessions[("spine", "tor1")] == "up"
    paths = graph.write(lab, tmp_path)
    assert sorted(p.suffix for p in paths) == [".dot", ".png", ".svg"]
    assert "<svg" in (tmp_path / f"topology-{lab.name}.svg").read_text()
    # The same through fabricctl, as an operator draws any running lab.
    out = tmp_path / "ctl"
    fabricctl = Path(sys.executable).parent / "fabricctl"
    r = subprocess.run(
        [fabricctl, "lab", "graph", "-n", lab.name, "-d", out],
        check=False,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (out / f"topology-{lab.name}.png").stat().st_size > 1000


def test_tors_hold_exactly_the_confirmed_blocks(lab: Lab, blocks: dict[str, str]) -> None:
    want = set(blocks.values())
    for tor in ("tor1", "tor2"):
        lab.wait_for(lambda t=tor: tor_prefixes(lab, t) == want, 20, what=f"{tor} has {want}")


def test_prefix_outside_pools_is_rejected_and_counted(lab: Lab, blocks: dict[str, str]) -> None:
    """tor1 starts announcing 10.250.0.0/24 (outside every pool): node1 receives it, counts
    one more rejection, logs it with peer and prefix, and never installs it."""

    def rejected() -> int:
        return sum(s["rejected"] for s in status(lab, "node1")["sessions"])

    def received() -> int:
        return sum(s["received"] for s in status(lab, "node1")["sessions"])

    # The ToR's connected subnets are rejected already: count from a settled baseline.
    lab.wait_for(lambda: received() > 0, 20, what="node1 receives routes")
    before_rejected, before_received = rejected(), received()
    d = lab.dir / "tor1"
    cmds = ["conf t", "router bgp 65001", "no bgp network import-check",
            "address-family ipv4 unicast", "network 10.250.0.0/24"]  # fmt: skip
    r = lab.exec("tor1", ["vtysh", "--vty_socket", str(d), *(a for c in cmds for a in ("-c", c))])
    assert r.returncode == 0, r.stdout + r.stderr
    lab.wait_for(
        lambda: rejected() == before_rejected + 1 and received() == before_received + 1,
        20,
        what="10.250.0.0/24 received and rejected on node1",
    )
    log = (lab.dir / "node1" / "fabricd.out").read_text()
    assert re.search(r"rejected 10\.250\.0\.0/24 from \S+: outside", log), log[-2000:]
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


def test_prefix_advertisement_carries_its_community(lab: Lab, blocks: dict[str, str]) -> None:
    """A BGPConfiguration prefix advertisement reaches the ToRs with its community."""
    prefix = "10.244.255.0/24"
    r = lab.fabricctl(["bgp", "config", "set", "--community", "svc=64512:300",
                       "--advertise", f"{prefix}=svc"])  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        d = lab.dir / "tor1"

        def community() -> str:
            out = routers.vtysh(d, f"show ip bgp {prefix} json").stdout
            return out if "64512:300" in out else ""

        lab.wait_for(community, 20, what=f"{prefix} with community 64512:300 on tor1")
        lab.wait_for(
            lambda: prefix in status(lab, "node1")["announcements"], 10, what="status lists it"
        )
        assert prefix not in lab.kernel_routes("node1")  # our own advert is never imported
    finally:
        r = lab.fabricctl(["bgp", "config", "set", "--clear", "advertise"])
        assert r.returncode == 0, r.stdout + r.stderr
    lab.wait_for(lambda: prefix not in tor_prefixes(lab, "tor1"), 20, what="withdrawn from tor1")


def _set_peer(lab: Lab, node: str, password: str | None) -> None:
    name = f"{node}-tor1"
    tor_ip = str(lab.node(node).neighbors[0].address)
    argv = ["peer", "add", name, "--node", node, "--peer-ip", tor_ip, "--as-number", "65001",
            "--hold-time", "9", "--num-allowed-local-as", "1"]  # fmt: skip
    if password is not None:
        f = lab.dir / node / f"md5-{password}"
        f.write_text(password + "\n")
        f.chmod(0o600)
        argv += ["--password-file", str(f)]
    assert lab.fabricctl(["peer", "delete", name]).returncode == 0
    r = lab.fabricctl(argv)
    assert r.returncode == 0, r.stderr


def _session(lab: Lab, node: str) -> dict[str, str]:
    tor_ip = str(lab.node(node).neighbors[0].address)
    sess = [s for s in status(lab, node)["sessions"] if s["peerIP"] == tor_ip]
    assert sess, f"no session to {tor_ip} on {node}"
    return sess[0]


def test_md5_right_password_establishes_wrong_never(lab: Lab, blocks: dict[str, str]) -> None:
    """tor1 requires a password from its hosts (rack 1's listen range); node2's peer
    carries it, node1's a different one: node2 comes back up, node1 never does."""
    d = lab.dir / "tor1"
    argv = ["vtysh", "--vty_socket", str(d), "-c", "conf t", "-c", "router bgp 65001",
            "-c", "neighbor HOSTS0 password right-secret"]  # fmt: skip
    r = lab.exec("tor1", argv)
    assert r.returncode == 0, r.stdout + r.stderr
    _set_peer(lab, "node2", "right-secret")
    _set_peer(lab, "node1", "wrong-secret")
    lab.wait_for(lambda: _session(lab, "node2")["state"] == "up", 90, what="node2 up with MD5")
    lab.wait_for(
        lambda: _session(lab, "node1")["state"] != "up", 30, what="node1's old session gone"
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert _session(lab, "node1")["state"] != "up"
        time.sleep(1)
    for node in ("node1", "node2"):
        log = (lab.dir / node / "fabricd.out").read_text()
        assert "secret" not in log, f"a password reached {node}'s log"
