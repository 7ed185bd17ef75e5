"""Topology parsing, the plan and the rendered configs (no root, nothing started)."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
from pathlib import Path

import pytest

from lab import clab, render, state
from lab.plan import build, lab_prefix
from lab.topology import Role, TopologyError, load, parse

BUNDLED = ["mesh3", "two-rack", "rr", "dual-homed"]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_topology_plans_unique_addresses(name: str) -> None:
    plan = build(load(name), "x")
    addrs = [a.ip for n in plan.nodes.values() for a in n.ifaces.values() if a is not None]
    addrs += [n.mgmt.ip for n in plan.nodes.values() if n.mgmt is not None]
    assert len(addrs) == len(set(addrs))
    assert all(ns.startswith(lab_prefix("x")) for ns in plan.namespaces)
    assert all(len(w.a_if) <= 15 and len(w.b_if) <= 15 for w in plan.wires)
    assert plan.etcd_endpoints


def test_two_rack_peerings() -> None:
    plan = build(load("two-rack"), "x")
    tor1, tor2, spine = plan.nodes["tor1"], plan.nodes["tor2"], plan.nodes["spine"]
    assert {nb.name for nb in spine.neighbors} == {"tor1", "tor2"}
    assert [nb.name for nb in tor1.neighbors] == ["spine"]
    assert {r.asn for r in tor2.ranges} == {65102}
    node1 = plan.nodes["node1"]
    assert [nb.name for nb in node1.neighbors] == ["tor1"]
    assert node1.default_via == [tor1.ifaces["eth2"].ip]  # type: ignore[union-attr]


def test_mesh3_full_mesh_and_rr_clients() -> None:
    mesh = build(load("mesh3"), "x")
    assert {nb.name for nb in mesh.nodes["node1"].neighbors} == {"node2", "node3"}
    rr = build(load("rr"), "x")
    assert all(r.rr_client for r in rr.nodes["rr1"].ranges)
    assert len(rr.etcd_endpoints) == 3


def test_fabricd_config_names_node_etcd_and_address() -> None:
    plan = build(load("two-rack"), "x")
    cfg = render.fabricd_config(plan.nodes["node3"], plan)
    assert cfg["nodeName"] == "node3"
    assert cfg["asNumber"] == 65102
    assert cfg["labels"] == {"fabric.rack": "2"}
    assert cfg["etcd"]["endpoints"] == ["http://10.255.0.2:2379"]
    assert cfg["addresses"]["ipv4"] == str(plan.nodes["node3"].ifaces["eth1"])


def test_fabric_resources_peer_each_host_with_its_tor() -> None:
    plan = build(load("two-rack"), "x")
    docs = render.fabric_resources(plan)
    bgp = next(d for d in docs if d["kind"] == "BGPConfiguration")
    assert bgp["spec"]["nodeToNodeMeshEnabled"] is False
    peers = {d["spec"]["node"]: d["spec"] for d in docs if d["kind"] == "BGPPeer"}
    assert sorted(peers) == ["node1", "node2", "node3", "node4"]
    tor2 = plan.nodes["tor2"]
    assert peers["node3"]["asNumber"] == 65002
    assert peers["node3"]["peerIP"] in {str(a.ip) for a in tor2.ifaces.values() if a}
    mesh = render.fabric_resources(build(load("mesh3"), "y"))
    assert next(d for d in mesh if d["kind"] == "BGPConfiguration")["spec"]["nodeToNodeMeshEnabled"]
    assert not [d for d in mesh if d["kind"] == "BGPPeer"]


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({}, "name"),
        ({"name": "x", "topology": {"nodes": {}}}, "topology.nodes"),
        (
            {"name": "x", "topology": {"nodes": {"r": {"labels": {"fabric.role": "frr"}}}}},
            "topology.nodes.r.labels.fabric.asn",
        ),
        (
            {"name": "x", "topology": {"nodes": {"a": {}}, "links": [{"endpoints": ["a:eth1"]}]}},
            "topology.links[0].endpoints",
        ),
        (
            {
                "name": "x",
                "topology": {"nodes": {"a": {}}, "links": [{"endpoints": ["a:eth1", "b:eth1"]}]},
            },
            "topology.links[0].endpoints",
        ),
        (
            {"name": "x", "topology": {"nodes": {"a": {"labels": {"fabric.role": "nope"}}}}},
            "topology.nodes.a.labels.fabric.role",
        ),
    ],
)
def test_invalid_topology_names_the_field(doc: dict[str, object], field: str) -> None:
    with pytest.raises(TopologyError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse(doc)


def test_roles_from_kind_and_labels() -> None:
    topo = load("mesh3")
    assert topo.nodes["lan"].role == Role.BRIDGE
    assert topo.nodes["node1"].role == Role.NODE


@pytest.mark.skipif(not shutil.which("bird"), reason="bird2 not installed")
def test_rendered_bird_config_parses(tmp_path: Path) -> None:
    topo = load("two-rack")
    conf = tmp_path / "bird.conf"
    conf.write_text(render.bird(build(topo, "x").nodes["tor2"], topo.mgmt_subnet, tmp_path))
    r = subprocess.run(["bird", "-p", "-c", str(conf)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_export_for_containerlab_binds_configs_and_addresses(tmp_path: Path) -> None:
    path = clab.export(load("two-rack"), tmp_path)
    doc = load(path)
    tor1 = doc.raw["topology"]["nodes"]["tor1"]
    assert any(b.endswith(":/etc/frr/frr.conf") for b in tor1["binds"])
    assert "ip addr add 10.255.16.1/30 dev eth1" in tor1["exec"]
    assert (tmp_path / "node1" / "fabricd.yaml").is_file()
    assert (tmp_path / "tor2" / "bird.conf").is_file()


def test_run_root_is_on_a_memory_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lab directory (and the lab etcd's data in it) goes on a tmpfs: /run when it is
    one, else /dev/shm; $FABRIC_LAB_RUN wins."""
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "tmpfs /dev/shm tmpfs rw 0 0\n"
        "tmpfs /run/user/0 tmpfs rw 0 0\n"
        "/dev/vdb /mnt/my\\040disk ext4 rw 0 0\n"
    )
    assert state.fs_type(Path("/run/fabric-lab"), str(mounts)) == "ext4"
    assert state.fs_type(Path("/run/user/0/x"), str(mounts)) == "tmpfs"
    assert state.fs_type(Path("/run/user/01"), str(mounts)) == "ext4"
    assert state.fs_type(Path("/mnt/my disk/lab"), str(mounts)) == "ext4"
    assert state.fs_type(Path("/x"), str(tmp_path / "missing")) == ""
    monkeypatch.delenv(state.RUN_ROOT_ENV, raising=False)
    root = state.run_root()
    assert state.fs_type(root) in {"tmpfs", "ramfs"} or root == state.DEFAULT_RUN_ROOT
    monkeypatch.setenv(state.RUN_ROOT_ENV, str(tmp_path))
    assert state.run_root() == tmp_path


def test_state_saved_from_many_threads_at_once(tmp_path: Path) -> None:
    """Pods added from several threads save the state at once (the soak's filler pods): no
    save fails on another's temporary file, and the file holds every namespace."""
    st = state.LabState(name="t", prefix="tx-", dir=tmp_path)

    def add(i: int) -> None:
        st.namespaces.append(f"tx-p{i}")
        st.save()

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(add, range(64)))
    assert sorted(state.LabState.load(tmp_path).namespaces) == sorted(f"tx-p{i}" for i in range(64))
    assert [p.name for p in tmp_path.iterdir()] == [state.STATE_FILE]
