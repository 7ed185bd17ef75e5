"""fabricctl's BGP commands against a real etcd: peers, BGP configuration, apply/get/delete of
BGPPeer and BGPConfiguration, bgp status and routes from status documents written here (as
fabricd would publish them), node show and node label."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result

from fabric.cli.main import main
from fabric.resources.bgp_store import BGPStore
from ipam import keys
from ipam.resources import Node, Resources, dumps
from ipam.store import Store

pytestmark = pytest.mark.etcd

FABRICCTL = str(Path(sys.executable).parent / "fabricctl")

Cli = Callable[..., Result]
Call = Callable[[Callable[[Store], Awaitable[Any]]], Any]


@pytest.fixture
def call(etcd_endpoints: list[str], prefix: str) -> Call:
    """call(fn): run ``await fn(store)`` against this test's prefix."""

    def run(fn: Callable[[Store], Awaitable[Any]]) -> Any:
        async def go() -> Any:
            async with Store(etcd_endpoints, prefix) as store:
                return await fn(store)

        return asyncio.run(go())

    return run


def put_node(call: Call, node: Node, lease_ttl: int = 0) -> int:
    async def go(store: Store) -> int:
        lease = await store.grant_lease(lease_ttl) if lease_ttl else 0
        await Resources(store).put_node(node, lease=lease)
        return lease

    return int(call(go))


def put_status(call: Call, doc: dict[str, Any]) -> None:
    call(lambda s: s.put(keys.status(doc["node"]), json.dumps(doc).encode()))


def stored(call: Call, key: str) -> bytes | None:
    async def go(store: Store) -> bytes | None:
        kv = await store.get(key)
        return kv.value if kv else None

    return call(go)  # type: ignore[no-any-return]


def one_line_error(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for w in words:
        assert w in lines[0], (w, lines[0])


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


# help ----------------------------------------------------------------------------------------

COMMANDS = [["peer"], ["peer", "add"], ["peer", "list"], ["peer", "show"], ["peer", "delete"],
            ["bgp"], ["bgp", "config"], ["bgp", "config", "show"], ["bgp", "config", "set"],
            ["bgp", "status"], ["routes"], ["node", "show"], ["node", "label"],
            ["install-unit"]]  # fmt: skip


@pytest.mark.parametrize("args", COMMANDS, ids=" ".join)
def test_help_everywhere(args: list[str]) -> None:
    r = CliRunner().invoke(main, [*args, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output


# peers ---------------------------------------------------------------------------------------


def test_peer_lifecycle(cli: Cli) -> None:
    r = cli("peer", "add", "tor-a", "--peer-ip", "10.255.16.1:1790", "--as-number", "65001",
             "--node", "node1", "--hold-time", "1m", "--keepalive-time", "20s",
             "--password-file", "/etc/fabric/tor.key", "--max-prefixes", "1000",
             "--num-allowed-local-as", "1")  # fmt: skip
    assert r.stdout.strip() == "BGPPeer tor-a created"
    cli("peer", "add", "rr", "--peer-selector", "route-reflector == 'true'",
        "--node-selector", "!has(route-reflector)", "--local-as-number", "64513", "--required")  # fmt: skip
    cli("peer", "add", "v6", "--peer-ip", "[fd00::1]:179", "--as-number", "1.10")  # asdot
    cli("peer", "add", "gtsm", "--peer-ip", "10.255.16.5", "--as-number", "65002",
        "--ttl-security", "1", "--source-address", "None", "--password-credential", "tor2")  # fmt: skip
    gtsm = cli("peer", "show", "gtsm").stdout
    assert "systemd credential tor2" in gtsm and "1 hop(s)" in gtsm and "None" in gtsm
    assert json.loads(cli("get", "bgppeer", "gtsm", "-o", "json").stdout)["spec"] == {
        "peerIP": "10.255.16.5", "asNumber": 65002, "ttlSecurity": 1, "sourceAddress": "None",
        "password": {"credential": "tor2"}}  # fmt: skip
    cli("peer", "delete", "gtsm")

    lines = cli("peer", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "PEERIP", "ASN", "NODE/SELECTOR", "PEERSELECTOR", "HOLD"]
    assert lines[1].split()[:4] == ["rr", "!has(route-reflector)", "route-reflector", "=="]
    assert lines[2].split() == ["tor-a", "10.255.16.1:1790", "65001", "node1", "60s"]
    assert lines[3].split() == ["v6", "[fd00::1]:179", "65546", "(global)"]

    items = json.loads(cli("peer", "list", "-o", "json").stdout)["items"]
    assert [i["metadata"]["name"] for i in items] == ["rr", "tor-a", "v6"]
    assert items[1]["kind"] == "BGPPeer" and items[1]["spec"] == {
        "peerIP": "10.255.16.1:1790", "asNumber": 65001, "node": "node1", "holdTime": 60,
        "keepaliveTime": 20, "maxPrefixes": 1000, "numAllowedLocalASNumbers": 1,
        "password": {"file": "/etc/fabric/tor.key"}}  # fmt: skip
    assert items[0]["spec"]["required"] is True and items[0]["spec"]["localASNumber"] == 64513
    docs = list(yaml.safe_load_all(cli("peer", "list", "-o", "yaml").stdout))
    assert [d["metadata"]["name"] for d in docs] == ["rr", "tor-a", "v6"]

    show = cli("peer", "show", "tor-a").stdout
    assert "Peer IP:" in show and "10.255.16.1:1790" in show and "node node1" in show
    assert "Hold time:" in show and "60s" in show and "/etc/fabric/tor.key" in show
    shown = yaml.safe_load(cli("peer", "show", "rr", "-o", "yaml").stdout)
    assert shown["spec"]["peerSelector"] == "route-reflector == 'true'"
    assert shown["status"] == {"sessions": []}

    assert cli("peer", "delete", "tor-a").stdout.strip() == "BGPPeer tor-a deleted"
    one_line_error(cli("peer", "show", "tor-a", code=1).stderr, "BGPPeer tor-a", "not found")
    one_line_error(cli("peer", "delete", "tor-a", code=1).stderr, "BGPPeer tor-a", "not found")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--peer-ip", "10.0.0.300", "--as-number", "65001"], "--peer-ip"),
        (["--peer-ip", "10.0.0.1:70000", "--as-number", "65001"], "--peer-ip"),
        (["--peer-ip", "10.0.0.1", "--peer-selector", "all()"], "--peer-ip"),
        ([], "--peer-ip"),  # neither
        (["--peer-ip", "10.0.0.1"], "--as-number"),
        (["--peer-ip", "10.0.0.1", "--as-number", "x"], "--as-number"),
        (["--peer-selector", "rr ==="], "--peer-selector"),
        (["--peer-selector", "all()", "--node-selector", "a in {"], "--node-selector"),
        (["--peer-selector", "all()", "--node", "n1", "--node-selector", "all()"],
         "--node-selector"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--hold-time", "30",
          "--keepalive-time", "30"], "--keepalive-time"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--hold-time", "1.5s"], "--hold-time"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--hold-time", "soon"], "--hold-time"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--password-file", "key"],
         "--password-file"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--max-prefixes", "0"], "--max-prefixes"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--ttl-security", "-1"], "--ttl-security"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--source-address", "eth0"],
         "--source-address"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--password-credential", "a/b"],
         "--password-credential"),
        (["--peer-ip", "10.0.0.1", "--as-number", "1", "--num-allowed-local-as", "11"],
         "--num-allowed-local-as"),
    ],
)  # fmt: skip
def test_peer_add_validation(cli: Cli, args: list[str], field: str) -> None:
    r = cli("peer", "add", "bad", *args, code=1)
    one_line_error(r.stderr, "BGPPeer bad", f"'{field}'")
    assert r.stdout == ""
    assert cli("peer", "list").stdout.strip().splitlines()[1:] == []


def test_peer_add_bad_name_and_duplicate(cli: Cli) -> None:
    r = cli("peer", "add", "Bad_Name", "--peer-ip", "10.0.0.1", "--as-number", "1", code=1)
    one_line_error(r.stderr, "metadata.name")
    cli("peer", "add", "tor", "--peer-ip", "10.0.0.1", "--as-number", "65001")
    r = cli("peer", "add", "tor", "--peer-ip", "10.0.0.2", "--as-number", "65002", code=1)
    one_line_error(r.stderr, "BGPPeer tor", "metadata.name", "already exists")
    spec = json.loads(cli("get", "bgppeer", "tor", "-o", "json").stdout)["spec"]
    assert spec == {"peerIP": "10.0.0.1", "asNumber": 65001}


def test_put_peer_create_only_is_atomic(call: Call) -> None:
    """Concurrent creations of one name: exactly one wins (the txn compares absence)."""
    from bgp.config import Peer
    from bgp.errors import ValidationError

    async def go(store: Store) -> list[object]:
        bs = BGPStore(store)
        peers = [Peer.from_json("tor", {"peerIP": f"10.0.0.{i}", "asNumber": 1}) for i in range(8)]
        return await asyncio.gather(*(bs.put_peer(p, create_only=True) for p in peers),
                                    return_exceptions=True)  # fmt: skip

    results = call(go)
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, ValidationError) for r in results if r is not None)


# bgp config ----------------------------------------------------------------------------------


def test_bgp_config_show_and_set(cli: Cli) -> None:
    out = cli("bgp", "config", "show").stdout
    assert "PROPERTY" in out
    rows = {cells(ln)[0]: cells(ln)[1] for ln in out.splitlines()[3:] if ln.startswith("| ")}
    assert rows["AS number"] == "64512" and rows["Node-to-node mesh"] == "true"
    assert rows["Listen port"] == "179" and rows["Mesh hold time"] == "90s"

    cli("bgp", "config", "set", "--as-number", "64600", "--no-node-to-node-mesh",
        "--community", "svc=64600:100", "--community", "big=1:2:3",
        "--advertise", "192.0.2.0/24=svc,65000:7", "--advertise", "198.51.100.0/24",
        "--service-cluster-ip", "10.96.0.0/12", "--import-cidr", "0.0.0.0/0",
        "--import-default-route", "--mesh-hold-time", "2m", "--mesh-max-restart-time", "300",
        "--listen-port", "1790")  # fmt: skip
    data = json.loads(cli("bgp", "config", "show", "-o", "json").stdout)
    assert data["asNumber"] == 64600 and data["nodeToNodeMeshEnabled"] is False
    assert data["communities"] == [{"name": "svc", "value": "64600:100"},
                                   {"name": "big", "value": "1:2:3"}]  # fmt: skip
    assert data["prefixAdvertisements"] == [
        {"cidr": "192.0.2.0/24", "communities": ["svc", "65000:7"]},
        {"cidr": "198.51.100.0/24", "communities": []}]  # fmt: skip
    assert data["serviceClusterIPs"] == [{"cidr": "10.96.0.0/12"}]
    assert data["importCIDRs"] == ["0.0.0.0/0"] and data["importDefaultRoute"] is True
    assert (data["nodeMeshHoldTime"], data["nodeMeshMaxRestartTime"]) == (120, 300)
    assert data["listenPort"] == 1790

    # Only what is given changes; --clear empties a list.
    out = cli("bgp", "config", "set", "--node-to-node-mesh", "--clear", "advertise", "-o", "yaml")
    data = yaml.safe_load(out.stdout)
    assert data["nodeToNodeMeshEnabled"] is True and data["prefixAdvertisements"] == []
    assert data["asNumber"] == 64600 and len(data["communities"]) == 2
    assert json.loads(cli("get", "bgpconfig", "-o", "json").stdout)["spec"]["asNumber"] == 64600

    cli("bgp", "config", "set", code=1)  # nothing to set: usage error


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--as-number", "0"], "--as-number"),
        (["--listen-port", "70000"], "--listen-port"),
        (["--advertise", "10.0.0.1/24"], "--advertise"),  # host bits
        (["--advertise", "10.0.0.0/24=nosuchname"], "--advertise"),
        (["--community", "svc=1-2"], "--community"),
        (["--community", "novalue"], "--community"),
        (["--service-cluster-ip", "nope"], "--service-cluster-ip"),
        (["--import-cidr", "10.0.0.0/33"], "--import-cidr"),
        (["--mesh-hold-time", "2"], "--mesh-hold-time"),
        (["--mesh-hold-time", "forever"], "--mesh-hold-time"),
    ],
)
def test_bgp_config_set_validation(cli: Cli, call: Call, args: list[str], field: str) -> None:
    cli("bgp", "config", "set", "--as-number", "65000")
    before = stored(call, keys.CONFIG_BGP)
    r = cli("bgp", "config", "set", "--listen-port", "1790", *args, code=1)
    one_line_error(r.stderr, "BGPConfiguration default", f"'{field}'")
    assert stored(call, keys.CONFIG_BGP) == before


def test_update_config_is_compare_and_swap(call: Call) -> None:
    """A change computed from a stale read is redone on the fresh one: nothing is lost."""
    from dataclasses import replace

    async def go(store: Store) -> tuple[int, Any]:
        bs = BGPStore(store)
        attempts = 0

        def change(cfg: Any) -> Any:
            nonlocal attempts
            attempts += 1
            return replace(cfg, listen_port=1790)

        # Interleave: read, a concurrent writer changes the AS, then our write.
        orig_get = bs.get_config

        async def get_then_race() -> Any:
            rev, cfg = await orig_get()
            if attempts == 0:
                await BGPStore(store).update_config(lambda c: replace(c, as_number=65010))
            return rev, cfg

        bs.get_config = get_then_race  # type: ignore[method-assign]
        await bs.update_config(change)
        return attempts, (await BGPStore(store).get_config())[1]

    attempts, cfg = call(go)
    assert attempts == 2
    assert (cfg.as_number, cfg.listen_port) == (65010, 1790)


# apply / get / delete ------------------------------------------------------------------------

BGP_RESOURCES = """\
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata: {name: default}
spec:
  asNumber: 64600
  nodeToNodeMeshEnabled: false
  listenPort: 179
  nodeMeshHoldTime: 1m30s
  nodeMeshPassword: {file: /etc/fabric/mesh.key}
  communities: [{name: svc, value: "64600:100"}]
  prefixAdvertisements: [{cidr: 192.0.2.0/24, communities: [svc]}]
  serviceClusterIPs: [{cidr: 10.96.0.0/12}]
  serviceExternalIPs: [{cidr: 203.0.113.0/24}]
  importCIDRs: [0.0.0.0/0]
  importDefaultRoute: true
  nodeMeshMaxRestartTime: 2m
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: rack1-tor}
spec:
  peerIP: 10.255.16.1
  asNumber: 65001
  nodeSelector: rack == 'r1'
  keepaliveTime: 30s
  holdTime: 1m30s
  maxRestartTime: 120
  password: {file: /etc/fabric/tor.key}
---
apiVersion: fabric/v1
kind: BGPPeer
metadata: {name: to-rr}
spec: {peerSelector: "has(route-reflector)", node: node1, required: false}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: rack2-tor}
spec: {peerIP: 10.255.16.5, asNumber: 65002, node: node3, ttlSecurity: 1,
       sourceAddress: UseNodeIP, password: {credential: rack2-tor}}
"""


def test_bgp_apply_get_round_trip(cli: Cli, prefix: str) -> None:
    out = cli("apply", "-f", "-", input=BGP_RESOURCES).stdout
    assert out.splitlines() == ["BGPConfiguration default configured", "BGPPeer rack1-tor created",
                                "BGPPeer to-rr created", "BGPPeer rack2-tor created"]  # fmt: skip
    again = cli("apply", "-f", "-", input=BGP_RESOURCES).stdout.split()
    assert "configured" not in again and "created" not in again

    peer = json.loads(cli("get", "bgppeers", "rack1-tor", "-o", "json").stdout)
    assert peer["spec"] == {"peerIP": "10.255.16.1", "asNumber": 65001,
                            "nodeSelector": "rack == 'r1'", "holdTime": 90, "keepaliveTime": 30,
                            "maxRestartTime": 120, "password": {"file": "/etc/fabric/tor.key"}}  # fmt: skip
    peer = json.loads(cli("get", "bgppeers", "rack2-tor", "-o", "json").stdout)
    assert peer["spec"] == {"peerIP": "10.255.16.5", "asNumber": 65002, "node": "node3",
                            "ttlSecurity": 1, "sourceAddress": "UseNodeIP",
                            "password": {"credential": "rack2-tor"}}  # fmt: skip
    cfg = json.loads(cli("get", "bgpconfiguration", "-o", "json").stdout)
    assert cfg["kind"] == "BGPConfiguration" and cfg["metadata"]["name"] == "default"
    assert cfg["spec"]["nodeMeshHoldTime"] == 90 and cfg["spec"]["nodeMeshMaxRestartTime"] == 120
    assert cfg["spec"]["nodeMeshPassword"] == {"file": "/etc/fabric/mesh.key"}
    lines = cli("get", "bgpconfigurations").stdout.splitlines()
    assert lines[1].split() == ["default", "false", "64600", "179"]
    assert cli("get", "bgppeer").stdout.splitlines()[3].split() == [
        "to-rr", "node1", "has(route-reflector)"]  # fmt: skip

    dumped = "\n".join(cli("get", k, "-o", "yaml").stdout for k in ("bgpconfig", "bgppeers"))
    other = prefix + "-copy"
    cli("apply", "-f", "-", input=dumped, pfx=other)
    assert (
        "\n".join(cli("get", k, "-o", "yaml", pfx=other).stdout for k in ("bgpconfig", "bgppeers"))
        == dumped
    )
    listed = cli("get", "bgppeers", "-o", "json").stdout  # a List applies too
    assert set(cli("apply", "-f", "-", input=listed, pfx=other).stdout.split()) >= {"unchanged"}

    assert "BGPPeer to-rr deleted" in cli("delete", "bgppeer", "to-rr").stdout
    assert "defaults apply" in cli("delete", "bgpconfiguration", "default").stdout
    assert json.loads(cli("get", "bgpconfig", "-o", "json").stdout)["spec"]["asNumber"] == 64512
    one_line_error(cli("delete", "bgppeer", "to-rr", code=1).stderr, "BGPPeer to-rr", "not found")
    one_line_error(cli("get", "bgpconfig", "node.n1", code=1).stderr, "not found")


def _peer_doc(spec: str, name: str = "p") -> str:
    return f"apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {{name: {name}}}\nspec: {spec}\n"


def _cfg_doc(spec: str, name: str = "default") -> str:
    return (
        f"apiVersion: fabric/v1\nkind: BGPConfiguration\nmetadata: {{name: {name}}}\nspec: {spec}\n"
    )


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (_peer_doc("{peerIP: 10.0.0.256, asNumber: 1}"), ["BGPPeer p", "spec.peerIP"]),
        (_peer_doc("{peerIP: 10.0.0.1, peerSelector: all()}"), ["BGPPeer p", "spec.peerIP"]),
        (_peer_doc("{peerSelector: 'x ==='}"), ["BGPPeer p", "spec.peerSelector"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1, holdTime: 30s, keepaliveTime: 30s}"),
         ["BGPPeer p", "spec.keepaliveTime", "less than holdTime"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1, keepOriginalNextHop: true}"),
         ["BGPPeer p", "spec.keepOriginalNextHop", "unknown field"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1, password: {secretKeyRef: {name: s}}}"),
         ["BGPPeer p", "spec.password.secretKeyRef", "not supported"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1, ttlSecurity: 256}"),
         ["BGPPeer p", "spec.ttlSecurity", "0..255"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1, sourceAddress: NodeIP}"),
         ["BGPPeer p", "spec.sourceAddress", "UseNodeIP, None"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1, password: {credential: ../k}}"),
         ["BGPPeer p", "spec.passwordCredential", "credential name"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1, password: {file: /k, credential: k}}"),
         ["BGPPeer p", "spec.password", "{file: PATH} or {credential: NAME}"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1, holdTime: 1h1x}"),
         ["BGPPeer p", "spec.holdTime", "duration"]),
        (_peer_doc("{peerIP: 10.0.0.1, asNumber: 1}", name="Upper"), ["metadata.name"]),
        (_cfg_doc("{asNumber: 1}", name="node.n1"), ["BGPConfiguration node.n1", "metadata.name"]),
        (_cfg_doc("{logSeverityScreen: Info}"), ["spec.logSeverityScreen", "unknown field"]),
        (_cfg_doc("{nodeMeshHoldTime: 1s}"), ["spec.nodeMeshHoldTime"]),
        (_cfg_doc("{prefixAdvertisements: [{cidr: 10.0.0.0/8, communities: [nope]}]}"),
         ["spec.prefixAdvertisements[0].communities[0]"]),
    ],
)  # fmt: skip
def test_bgp_apply_errors_change_nothing(cli: Cli, call: Call, doc: str, words: list[str]) -> None:
    # A valid document first: it is not applied either when a later one is bad.
    good = _peer_doc("{peerIP: 10.0.0.9, asNumber: 9}", name="good")
    r = cli("apply", "-f", "-", input=good + "---\n" + doc, code=1)
    one_line_error(r.stderr, *words)
    assert r.stdout == ""
    assert stored(call, keys.peer("good")) is None and stored(call, keys.peer("p")) is None
    assert stored(call, keys.CONFIG_BGP) is None


# status documents ----------------------------------------------------------------------------


def _status(node: str, now: float, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node": node, "updated": now - 3,
        "speaker": {"running": True, "pid": 123, "restarts": 0},
        "sessions": [
            {"name": "Node_10_255_16_1", "peerIP": "10.255.16.1", "peerAS": 65001,
             "localAS": 65101, "type": "node specific", "state": "up", "since": now - 60,
             "info": "Established", "required": True, "received": 4, "accepted": 3,
             "rejected": 1},
            {"name": "Mesh_10_0_0_2", "peerIP": "10.0.0.2", "peerAS": 64512, "localAS": 64512,
             "type": "node-to-node mesh", "state": "connected", "since": now - 3 * 86400,
             "info": "Connect", "required": False},
            {"name": "Global_fd00__1", "peerIP": "fd00::1", "peerAS": 65002, "localAS": 65101,
             "type": "global", "state": "down", "since": None, "info": "Connection refused",
             "required": True, "attempts": 7, "connectingSince": now - 120,
             "lastFailure": "no answer to our TCP SYN for 40 s",
             "hint": "no answer: check the password", "failedAttempts": 9},
        ],
        "routes": {"installed": 5, "blackholes": 1, "truncated": False, "items": [
            {"dst": "10.244.1.0/26", "type": "unicast", "via": ["10.255.16.1", "10.255.16.2"]},
            {"dst": "10.244.0.0/26", "type": "blackhole", "via": []},
            {"dst": "10.244.0.5/32", "type": "local", "dev": "fab0123456789a", "via": []}]},
    }  # fmt: skip
    doc.update(over)
    return doc


def test_bgp_status_rendering(cli: Cli, call: Call) -> None:
    now = time.time()
    put_node(call, Node("node1", addresses=("10.0.0.1/24",)))
    put_node(call, Node("node2"))
    put_status(call, _status("node1", now))
    put_status(call, _status("node3", now, speaker={"running": False, "restarts": 4},
                             sessions=[]))  # fmt: skip

    out = cli("bgp", "status").stdout
    n1, n2, n3 = out.split("\n\nNode ")
    assert n1.startswith("Node node1:")
    assert "BGP speaker:" in n1 and "running (pid 123, 0 restarts)" in n1
    assert "3, 1 up; 1 of 2 required up" in n1 and "status updated 3s ago" in n1
    v4, v6 = n1.split("IPv6 BGP status")
    assert "IPv4 BGP status" in v4
    rows = [cells(line) for line in v4.splitlines() if line.startswith("| ")]
    assert rows[0] == ["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"]
    since = time.strftime("%H:%M:%S", time.localtime(now - 60))
    assert rows[1] == ["10.255.16.1", "node specific", "up", since, "Established"]
    day = time.strftime("%Y-%m-%d", time.localtime(now - 3 * 86400))
    assert rows[2] == ["10.0.0.2", "node-to-node mesh", "connected", day, "Connect"]
    rows6 = [cells(line) for line in v6.splitlines() if line.startswith("| ")]
    assert rows6[1] == ["fd00::1", "global", "down", "", "Connection refused"]
    why = v6.split("Sessions not established:")[1].splitlines()
    ago = time.strftime("%H:%M:%S", time.localtime(now - 120))
    assert why[1:4] == [
        f"  fd00::1: connecting since {ago}, 7 attempts; failed attempts since start: 9",
        "    last failure: no answer to our TCP SYN for 40 s",
        "    hint: no answer: check the password"]  # fmt: skip
    assert n2.startswith("node2: no status published (fabricd is not running)")
    assert n3.startswith("node3:") and "NOT running (4 restarts)" in n3
    assert "No IPv4 peers found." in n3 and "No IPv6 peers found." in n3

    docs = json.loads(cli("bgp", "status", "-o", "json").stdout)
    assert [d["node"] for d in docs] == ["node1", "node3"]
    assert docs[0]["sessions"][0]["accepted"] == 3
    docs = yaml.safe_load(cli("bgp", "status", "--node", "node1", "-o", "yaml").stdout)
    assert len(docs) == 1 and docs[0]["speaker"]["pid"] == 123
    out = cli("bgp", "status", "--node", "node2").stdout
    assert out.strip() == "Node node2: no status published (fabricd is not running)."
    out = cli("bgp", "status", "--node", "ghost").stdout
    assert "unknown node, or fabricd is not running there" in out
    assert json.loads(cli("bgp", "status", "--node", "node2", "-o", "json").stdout) == []

    # peer show lists the sessions with that peer on every node that reports them.
    cli("peer", "add", "tor", "--peer-ip", "10.255.16.1", "--as-number", "65001")
    show = cli("peer", "show", "tor").stdout
    row = next(line for line in show.splitlines() if line.startswith("node1"))
    assert row.split()[:4] == ["node1", "node", "specific", "up"]


def test_status_document_unreadable(cli: Cli, call: Call) -> None:
    call(lambda s: s.put(keys.status("node9"), b"{not json"))
    put_status(call, _status("node1", time.time()))
    out = cli("bgp", "status").stdout
    assert "Node node9: unreadable status document" in out and "IPv4 BGP status" in out


def test_routes(cli: Cli, call: Call) -> None:
    now = time.time()
    put_node(call, Node("node1"))
    put_node(call, Node("node2"))
    put_status(call, _status("node1", now))
    out = cli("routes").stdout
    lines = out.splitlines()
    assert lines[0] == "Node node1: 5 routes installed (1 blackhole)"
    assert lines[1].split() == ["DESTINATION", "TYPE", "VIA", "DEV"]
    assert lines[2].split() == ["10.244.1.0/26", "unicast", "10.255.16.1,10.255.16.2"]
    assert lines[3].split() == ["10.244.0.0/26", "blackhole"]
    assert lines[4].split() == ["10.244.0.5/32", "local", "fab0123456789a"]
    assert "truncated" not in out
    assert "Node node2: no status published (fabricd is not running)." in out

    routes = _status("node1", now)["routes"] | {"truncated": True, "installed": 5000}
    put_status(call, _status("node1", now, routes=routes))
    out = cli("routes", "--node", "node1").stdout
    assert "(list truncated by fabricd: 3 of 5000 routes shown)" in out
    data = json.loads(cli("routes", "--node", "node1", "-o", "json").stdout)
    assert data[0]["node"] == "node1" and data[0]["truncated"] is True
    assert len(data[0]["items"]) == 3


# nodes ---------------------------------------------------------------------------------------


def test_node_show(cli: Cli, call: Call) -> None:
    put_node(call, Node("node1", labels={"rack": "r1"}, addresses=("10.0.0.1/24", "fd00::1/64"),
                        route_reflector_cluster_id="1.0.0.1"))  # fmt: skip
    put_node(call, Node("node2", as_number=65002))
    out = cli("node", "show", "node1").stdout
    assert "Addresses:" in out and "10.0.0.1/24, fd00::1/64" in out
    assert "64512 (cluster default)" in out and "rack=r1" in out and "1.0.0.1" in out
    assert "no status published (not running)" in out
    put_status(call, _status("node1", time.time()))
    out = cli("node", "show", "node1").stdout
    assert "running (pid 123, 0 restarts)" in out and "3, 1 up" in out and "5 (1 blackhole)" in out
    data = json.loads(cli("node", "show", "node1", "-o", "json").stdout)
    assert data["kind"] == "Node" and data["status"]["speaker"]["pid"] == 123
    assert yaml.safe_load(cli("node", "show", "node2", "-o", "yaml").stdout)["status"] is None
    assert "65002" in cli("node", "show", "node2").stdout
    one_line_error(cli("node", "show", "nope", code=1).stderr, "Node nope", "not found")


def test_node_label(cli: Cli, call: Call) -> None:
    lease = put_node(call, Node("node1", labels={"rack": "r1"}, addresses=("10.0.0.1",)),
                     lease_ttl=60)  # fmt: skip
    assert cli("node", "label", "node1", "route-reflector=true", "zone=a").stdout.strip() == (
        "Node node1 labeled")  # fmt: skip
    r = cli("node", "label", "node1", "rack=r2", code=1)
    one_line_error(r.stderr, "Node node1", "metadata.labels.rack", "--overwrite")
    assert cli("node", "label", "node1", "rack=r1").stdout.strip() == (
        "Node node1 not labeled (no change)")  # fmt: skip
    cli("node", "label", "node1", "rack=r2", "zone-", "--overwrite")
    r = cli("node", "label", "node1", "nosuch-")
    assert "label 'nosuch' not found" in r.stderr
    labels = json.loads(cli("get", "node", "node1", "-o", "json").stdout)["metadata"]["labels"]
    assert labels == {"rack": "r2", "route-reflector": "true"}

    async def node_kv(store: Store) -> Any:
        return await store.get(keys.node("node1"))

    kv = call(node_kv)
    assert kv.lease == lease  # the node key is still kept alive by fabricd's lease
    assert json.loads(kv.value)["addresses"] == ["10.0.0.1"]

    for args, field in ((["bad key=x"], "bad key"), (["k=bad value"], "k"),
                        (["k=v", "k-"], "k"), (["justakey"], None)):  # fmt: skip
        r = cli("node", "label", "node1", *args, code=1)
        one_line_error(r.stderr, "Node node1", *([f"metadata.labels.{field}"] if field else []))
    one_line_error(cli("node", "label", "ghost", "a=b", code=1).stderr, "Node ghost", "not found")
    assert call(node_kv).mod == kv.mod  # refused changes wrote nothing


def test_update_node_is_compare_and_swap(call: Call) -> None:
    put_node(call, Node("node1", labels={"a": "1"}))

    async def go(store: Store) -> Any:
        calls = 0

        def change(n: Node) -> Node:
            nonlocal calls
            calls += 1
            return Node(n.name, {**n.labels, "mine": "x"}, n.addresses)

        bs = BGPStore(store)
        orig = store.get

        async def get_and_race(key: str) -> Any:
            kv = await orig(key)
            if calls == 0 and key == keys.node("node1"):  # someone else writes in between
                await store.put(key, dumps(Node("node1", {"a": "1", "theirs": "y"}).to_json()))
            return kv

        store.get = get_and_race  # type: ignore[method-assign]
        await bs.update_node("node1", change)
        store.get = orig  # type: ignore[method-assign]
        return calls, await Resources(store).get_node("node1")

    calls, node = call(go)
    assert calls == 2
    assert dict(node.labels) == {"a": "1", "theirs": "y", "mine": "x"}


def test_node_delete_removes_status(cli: Cli, call: Call) -> None:
    put_node(call, Node("node1"))
    put_status(call, _status("node1", time.time()))
    assert "Node node1 deleted" in cli("node", "delete", "node1").stdout
    assert stored(call, keys.status("node1")) is None
    assert "no status published" in cli("bgp", "status", "--node", "node1").stdout


# datastore down ------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["peer", "list"], ["bgp", "status"], ["bgp", "config", "show"],
                                  ["routes"], ["node", "label", "n1", "a=b"]])  # fmt: skip
def test_etcd_unreachable_is_exit_2(etcd_env: dict[str, str], args: list[str]) -> None:
    env = {**etcd_env, "FABRIC_ETCD_ENDPOINTS": "127.0.0.1:1"}
    p = subprocess.run([FABRICCTL, "--timeout", "1", *args], env=env, capture_output=True,
                       text=True, timeout=60, check=False)  # fmt: skip
    assert p.returncode == 2, (p.stdout, p.stderr)
    one_line_error(p.stderr, "no etcd endpoint answered")


# install-unit --------------------------------------------------------------------------------


def test_install_unit(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["install-unit", "--dest", str(tmp_path), "--config",
                             "/etc/fabric/node.yaml"])  # fmt: skip
    assert r.exit_code == 0, r.output
    unit = (tmp_path / "fabricd.service").read_text()
    fabricd = Path(sys.executable).parent / "fabricd"
    assert f"ExecStart={fabricd} --config /etc/fabric/node.yaml" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "Restart=on-failure" in unit
    assert (tmp_path / "fabricd.service").stat().st_mode & 0o777 == 0o644
    assert f"Wrote {tmp_path}/fabricd.service" in r.stdout and "daemon-reload" in r.stdout

    r = runner.invoke(main, ["install-unit", "--dest", "-", "--fabricd", "/opt/fabric/bin/fabricd"])
    assert r.exit_code == 0 and r.stdout.startswith("# fabricd.service")
    assert "ExecStart=/opt/fabric/bin/fabricd --config /etc/fabric/fabricd.yaml" in r.stdout

    for args, field in ((["--config", "fabricd.yaml"], "--config"),
                        (["--fabricd", "/opt/my fabricd"], "--fabricd"),
                        (["--dest", str(tmp_path / "missing")], None)):  # fmt: skip
        r = runner.invoke(main, ["install-unit", *args])
        assert r.exit_code == 1, r.output
        one_line_error(
            r.stderr, "fabricd.service", *([f"'{field}'"] if field else ["cannot write"])
        )
