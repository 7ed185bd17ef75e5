"""two-rack: BGP between ToRs and spine, route propagation, cross-rack ping, etcd everywhere."""

from __future__ import annotations

import pytest
import yaml

from lab.runner import Lab
from lab.topology import Role
from lab.view import LabError

pytestmark = [pytest.mark.lab, pytest.mark.root]
ROUTERS = ("spine", "tor1", "tor2")


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab: Lab = make_lab("two-rack")
    for r in ROUTERS:
        lab.wait_for(lambda r=r: lab.established(r), 30, what=f"BGP sessions of {r}")
    return lab


def test_router_sessions_established(lab: Lab) -> None:
    assert lab.bgp_sessions("spine") == {"tor1": "Established", "tor2": "Established"}
    assert lab.bgp_sessions("tor1")["spine"] == "Established"  # FRR, vtysh json
    assert lab.bgp_sessions("tor2")["spine"] == "Established"  # BIRD, birdc


def _has_route(lab: Lab, node: str, prefix: str) -> bool:
    return prefix in lab.exec(node, ["ip", "-4", "route", "show", prefix]).stdout


@pytest.mark.parametrize(("origin", "prefix"), [("tor1", "10.255.200.1"), ("tor2", "10.255.201.1")])
def test_route_announced_by_a_router_reaches_the_others(lab: Lab, origin: str, prefix: str) -> None:
    lab.exec(origin, ["ip", "addr", "add", f"{prefix}/32", "dev", "lo"], check=True)
    try:
        for other in ROUTERS:
            if other != origin:
                lab.wait_for(
                    lambda o=other: _has_route(lab, o, prefix), 20, what=f"{prefix} on {other}"
                )
    finally:
        lab.exec(origin, ["ip", "addr", "del", f"{prefix}/32", "dev", "lo"], check=True)
    for other in ROUTERS:
        if other != origin:
            lab.wait_for(
                lambda o=other: not _has_route(lab, o, prefix),
                20,
                what=f"withdrawal of {prefix} on {other}",
            )


@pytest.mark.parametrize(("src", "dst"), [("node1", "node3"), ("node4", "node2")])
def test_hosts_in_different_racks_ping_through_routers(lab: Lab, src: str, dst: str) -> None:
    def ping() -> bool:
        return lab.exec(src, ["ping", "-c1", "-W1", lab.address(dst)]).returncode == 0

    lab.wait_for(ping, 30, what=f"{src} -> {dst}")
    trace = lab.exec(src, ["ip", "route", "get", lab.address(dst)]).stdout
    assert "via" in trace  # routed through the ToR, not on-link


def test_etcd_answers_from_every_node(lab: Lab) -> None:
    endpoints = ",".join(lab.etcd_endpoints)
    for node in lab.nodes():
        if lab.node(node).role == Role.BRIDGE:
            continue
        r = lab.exec(node, ["etcdctl", "--endpoints", endpoints, "put", f"/lab/{node}", "x"])
        assert r.returncode == 0, f"{node}: {r.stderr}"


def test_fabricd_config_generated_for_hosts(lab: Lab) -> None:
    cfg = yaml.safe_load(lab.fabricd_config_path("node1").read_text())
    assert cfg["nodeName"] == "node1"
    assert cfg["addresses"]["ipv4"].split("/")[0] == lab.address("node1")
    with pytest.raises(LabError, match="not a host"):
        lab.start_fabricd("tor1")


def test_forwarding_only_inside_lab_namespaces(lab: Lab) -> None:
    assert lab.exec("tor1", ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
