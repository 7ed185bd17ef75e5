"""mesh3: fabricd on three hosts in a BGP full mesh (no routers). Blocks are announced and
installed with the owner's address as next hop on every other host; the owner blackholes
its block; deleting a node withdraws its blocks everywhere; an IPv6 pool works alongside."""

from __future__ import annotations

import re
import time

import pytest
import yaml
from fabric_helpers import allocate, status

from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node2", "node3")


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab: Lab = make_lab("mesh3")
    # IPv6 on the shared segment, so the IPv6 pool has next hops (the lab plan is IPv4).
    for i, h in enumerate(HOSTS, start=1):
        lab.exec(
            h, ["ip", "-6", "addr", "add", f"fd00:8::{i}/64", "dev", "eth1", "nodad"], check=True
        )
        cfg = lab.fabricd_config_path(h)
        text = cfg.read_text().replace("addresses:\n", f"addresses:\n  ipv6: fd00:8::{i}/64\n", 1)
        # a short kernel resync, so the repair test does not wait a minute
        text = text.replace(
            "routes:\n  protocol: 201\n", "routes:\n  protocol: 201\n  resyncInterval: 10\n"
        )
        cfg.write_text(text)
    lab.start_fabric()
    return lab


@pytest.fixture(scope="module")
def blocks(lab: Lab) -> dict[str, str]:
    """One IPv4 block per host (host -> block)."""
    return {h: allocate(lab, h, f"t.{h}.eth0")[0][1] for h in HOSTS}


def test_every_block_installed_on_every_other_host_via_its_owner(
    lab: Lab, blocks: dict[str, str]
) -> None:
    for owner, block in blocks.items():
        nh = lab.address(owner)
        for other in HOSTS:
            if other == owner:
                continue
            lab.wait_for(
                lambda o=other, b=block, n=nh: (
                    f"via {n} " in (lab.kernel_routes(o).get(b) or "") + " "
                ),
                20,
                what=f"{block} via {nh} on {other}",
            )
        assert lab.kernel_routes(owner)[block] == "blackhole"


def test_status_shows_established_mesh_sessions(lab: Lab, blocks: dict[str, str]) -> None:
    lab.wait_for(lambda: len(status(lab, "node1")["sessions"]) == 2, 20, what="2 sessions")
    doc = status(lab, "node1")
    types = {s["type"] for s in doc["sessions"]}
    assert types == {"node-to-node mesh"}
    assert sorted(s["peerIP"] for s in doc["sessions"]) == sorted(
        lab.address(h) for h in ("node2", "node3")
    )
    lab.wait_for(
        lambda: all(s["state"] == "up" for s in status(lab, "node1")["sessions"]),
        20,
        what="mesh up",
    )
    # Exactly one side of each pair is passive, so sessions never collide.
    passive = {(h, s["peerIP"]) for h in HOSTS for s in status(lab, h)["sessions"] if s["passive"]}
    assert len(passive) == 3


def test_ipv6_pool_alongside_ipv4(lab: Lab, blocks: dict[str, str]) -> None:
    r = lab.fabricctl(["pool", "add", "pods6", "--cidr", "fd00:244::/56", "--block-size", "122"])
    assert r.returncode == 0, r.stderr
    got = allocate(lab, "node2", "t.node2.v6", v4=0, v6=1)
    block6 = got[0][1]
    for other in ("node1", "node3"):
        lab.wait_for(
            lambda o=other: "via fd00:8::2" in (lab.kernel_routes(o).get(block6) or ""),
            20,
            what=f"{block6} via fd00:8::2 on {other}",
        )
    # The pod address answers across the fabric once it exists on node2.
    ip6 = got[0][0]
    lab.exec("node2", ["ip", "-6", "addr", "add", f"{ip6}/128", "dev", "lo"], check=True)
    r = lab.exec("node1", ["ping", "-6", "-c", "1", "-W", "2", ip6])
    assert r.returncode == 0, r.stdout + r.stderr


def _pool_spec(lab: Lab, **changes: object) -> None:
    spec = {"cidr": "10.244.0.0/16", "blockSize": 26, **changes}
    doc = {"apiVersion": "fabric/v1", "kind": "IPPool", "metadata": {"name": "pods"}, "spec": spec}
    f = lab.dir / "pool-pods.yaml"
    f.write_text(yaml.safe_dump(doc))
    r = lab.fabricctl(["apply", "-f", str(f)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_pool_disabled_for_export_is_withdrawn(lab: Lab, blocks: dict[str, str]) -> None:
    block = blocks["node1"]
    lab.wait_for(lambda: block in lab.kernel_routes("node2"), 20, what=f"{block} on node2")
    _pool_spec(lab, disableBGPExport=True)
    try:
        lab.wait_for(lambda: block not in lab.kernel_routes("node2"), 20, what="withdrawn")
        assert lab.kernel_routes("node1")[block] == "blackhole"  # still routed locally
    finally:
        _pool_spec(lab, disableBGPExport=False)
    lab.wait_for(lambda: block in lab.kernel_routes("node2"), 20, what="announced again")


def test_nat_outgoing_masquerades_only_leaving_the_pools(lab: Lab, blocks: dict[str, str]) -> None:
    _pool_spec(lab, natOutgoing=True)
    try:
        lab.wait_for(
            lambda: (
                "10.244.0.0/16"
                in lab.exec("node1", ["nft", "list", "table", "inet", "fabric_nat"]).stdout
            ),
            20,
            what="NAT table with the pool",
        )
        pod_ip = allocate(lab, "node1", "t.node1.nat")[0][0]
        lab.exec("node1", ["ip", "addr", "add", f"{pod_ip}/32", "dev", "lo"], check=True)
        # To a node address (outside every pool): masqueraded, so counted by the rule.
        r = lab.exec("node1", ["ping", "-c", "2", "-W", "2", "-I", pod_ip, lab.address("node2")])
        assert r.returncode == 0, r.stdout
        table = lab.exec("node1", ["nft", "list", "table", "inet", "fabric_nat"]).stdout
        assert re.search(r"ip saddr @nat_v4 ip daddr != @pools_v4 counter packets [1-9]", table), (
            table
        )
    finally:
        _pool_spec(lab, natOutgoing=False)
    lab.wait_for(lambda: _nat_set(lab, "node1") == "", 20, what="natOutgoing set emptied")


def _nat_set(lab: Lab, node: str) -> str:
    """The elements of the nat_v4 set in fabricd's NAT table ('' when empty)."""
    table = lab.exec(node, ["nft", "list", "set", "inet", "fabric_nat", "nat_v4"]).stdout
    m = re.search(r"elements = \{([^}]*)\}", table)
    return m.group(1).strip() if m else ""


def test_kernel_resync_repairs_a_route_removed_behind_its_back(
    lab: Lab, blocks: dict[str, str]
) -> None:
    block = blocks["node2"]
    lab.wait_for(lambda: block in lab.kernel_routes("node1"), 20, what=f"{block} on node1")
    lab.exec("node1", ["ip", "route", "del", block, "proto", "201"], check=True)
    assert block not in lab.kernel_routes("node1")
    # resyncInterval is 10 s in this module's fabricd config (see the fixture)
    lab.wait_for(lambda: block in lab.kernel_routes("node1"), 25, what="route repaired")


def _passes(lab: Lab, node: str) -> int:
    """How many announcement reconcile passes fabricd on ``node`` has made."""
    _, text = lab.health(node, "/metrics")
    m = re.search(
        r'fabric_reconcile_duration_seconds_count\{reconciler="announcements"\} (\S+)', text
    )
    assert m, text[-2000:]
    return int(float(m.group(1)))


def test_an_address_assigned_elsewhere_costs_no_reconcile_pass(
    lab: Lab, blocks: dict[str, str]
) -> None:
    """Every pod ADD anywhere changes a block; blocks matter to a node's intent only through
    addresses it borrows, so node1 does not recompute its intent for node2's new pod (it
    does for a new block: see the borrowed-address test and the convergence benchmark)."""
    time.sleep(1)  # let passes caused by earlier tests finish
    before = _passes(lab, "node1")
    for i in range(3):
        (_, block), *_ = allocate(lab, "node2", f"t.node2.more{i}", pool="pods")
        assert block == blocks["node2"]  # into its existing block: no affinity change
    time.sleep(1)
    assert _passes(lab, "node1") == before


def test_a_borrowed_address_is_announced_as_a_host_route(lab: Lab, blocks: dict[str, str]) -> None:
    """With every block of its pool claimed, node1 borrows an address from node2's block
    (strictAffinity off, as in Calico) and announces that /32: node3 routes it to node1, and
    so does node2, the block's owner (more specific than its own blackhole)."""
    r = lab.fabricctl(["pool", "add", "tiny", "--cidr", "10.250.0.0/29", "--block-size", "30"])
    assert r.returncode == 0, r.stdout + r.stderr
    (_, theirs), *_ = allocate(lab, "node2", "t.node2.tiny", pool="tiny")
    borrowed = None
    for i in range(8):  # node1 claims the other /30, fills it, then has to borrow
        (ip, block), *_ = allocate(lab, "node1", f"t.node1.tiny{i}", pool="tiny")
        if block == theirs:
            borrowed = ip
            break
    assert borrowed is not None, "node1 never borrowed from node2's block"
    host = f"{borrowed}/32"
    lab.wait_for(
        lambda: host in status(lab, "node1")["announcements"], 20, what=f"node1 announces {host}"
    )
    nh = lab.address("node1")
    for other in ("node2", "node3"):
        lab.wait_for(
            lambda o=other: f"via {nh} " in (lab.kernel_routes(o).get(borrowed) or "") + " ",
            20,
            what=f"{host} via node1 on {other}",
        )
    assert lab.kernel_routes("node2")[theirs] == "blackhole"  # the owner keeps its block
    lab.exec("node1", ["ip", "addr", "add", host, "dev", "lo"], check=True)
    for other in ("node2", "node3"):
        r = lab.exec(other, ["ping", "-c", "1", "-W", "2", borrowed])
        assert r.returncode == 0, r.stdout + r.stderr


def test_node_delete_withdraws_its_blocks_everywhere(lab: Lab, blocks: dict[str, str]) -> None:
    block = blocks["node3"]
    for other in ("node1", "node2"):
        lab.wait_for(lambda o=other: block in lab.kernel_routes(o), 20, what=f"{block} on {other}")
    r = lab.fabricctl(["node", "delete", "node3"])
    assert r.returncode == 0, r.stdout + r.stderr
    for other in ("node1", "node2"):
        lab.wait_for(
            lambda o=other: block not in lab.kernel_routes(o), 20, what=f"{block} gone on {other}"
        )
    lab.wait_for(lambda: block not in lab.kernel_routes("node3"), 20, what="blackhole removed")
