"""``fabricctl explain`` against a real etcd: addresses allocated through the allocator (as
the CNI ADD does, with namespace/pod attributes), nodes registered, and status documents
written as fabricd publishes them; each layer broken in turn in the datastore. The lab test
(tests/lab/test_explain_two_rack.py) breaks the running fabric itself."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml
from click.testing import Result

from fabric.cli.explain import parse_port
from fabric.errors import CLIError
from fabric.explain import evidence
from fabric.explain.evidence import Kind
from fabric.explain.policy import Checker, Inputs
from fabric.explain.walk import Live, walk
from fabric.resources.policy_codec import decode
from fabric.resources.policy_store import PolicyStore
from ipam import keys
from ipam.allocator import Allocator, AssignRequest
from ipam.pool import Pool
from ipam.resources import Node, Resources, dumps
from ipam.store import Store

pytestmark = pytest.mark.etcd

TOR1, TOR2 = "10.0.1.1", "10.0.2.1"
Cli = Callable[..., Result]


class Fabric:
    """A datastore as two nodes and their fabricd would leave it."""

    def __init__(self, endpoints: list[str], prefix: str) -> None:
        self.endpoints, self.prefix = endpoints, prefix
        self.ips: dict[str, str] = {}
        self.blocks: dict[str, str] = {}

    def run(self, fn: Callable[[Store], Any]) -> Any:
        async def go() -> Any:
            store = Store(self.endpoints, self.prefix)
            try:
                return await fn(store)
            finally:
                await store.close()

        return asyncio.run(go())

    def setup(self, export: bool = True) -> None:
        async def go(s: Store) -> None:
            res = Resources(s)
            await res.create_pool(Pool.from_spec("pods", {"cidr": "10.244.0.0/16",
                                                          "disableBGPExport": not export}))  # fmt: skip
            for n, addr in (("node1", "10.0.1.10/24"), ("node3", "10.0.2.10/24")):
                await res.put_node(Node(n, addresses=(addr,)))
            alloc = Allocator(s)
            for n, pod in (("node1", "a"), ("node3", "b")):
                got = await alloc.auto_assign(AssignRequest(f"fabric.{pod}.eth0", n, num_v4=1,
                                              attrs={"namespace": "x", "pod": pod, "containerID": f"c{pod}"}))  # fmt: skip
                self.ips[pod], self.blocks[pod] = str(got[0].ip), str(got[0].block)

        self.run(go)
        self.publish("node1")
        self.publish("node3")

    def status(self, node: str, **change: Any) -> dict[str, Any]:
        me, other = ("a", "b") if node == "node1" else ("b", "a")
        tor = TOR1 if node == "node1" else TOR2
        doc: dict[str, Any] = {
            "node": node,
            "speaker": {"running": True, "pid": 1, "restarts": 0},
            "sessions": [{"name": f"{node}-tor", "peerIP": tor, "state": "up", "info": "Established"}],
            "announcements": [self.blocks[me]],
            "learned": {"count": 1, "truncated": False,
                        "items": [{"dst": self.blocks[other], "via": [tor]}]},
            "routes": {"installed": 3, "blackholes": 1, "local": 1, "truncated": False, "items": [
                {"dst": self.blocks[other], "type": "unicast", "via": [tor]},
                {"dst": self.blocks[me], "type": "blackhole", "via": []},
                {"dst": f"{self.ips[me]}/32", "type": "local", "via": [], "dev": f"fab{me}"}]},
            "readiness": {"ok": True, "detail": {"peers": "1/1 required peers established"}},
            "converged": True,
        }  # fmt: skip
        doc.update(change)
        return doc

    def publish(self, node: str, **change: Any) -> None:
        doc = self.status(node, **change)
        self.run(lambda s: s.put(keys.status(node), dumps(doc)))

    def put(self, key: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.run(lambda s: s.delete(key))
        else:
            self.run(lambda s: s.put(key, dumps(value)))

    def explain(self, src: str = "x/a", dst: str = "x/b", live: Live | None = None,
                port: str | None = None) -> Any:  # fmt: skip
        async def go(s: Store) -> Any:
            snap = await evidence.read(s)
            pols, nss, pods, _ = await PolicyStore(s).snapshot()
            a, b = evidence.resolve(snap, src, "SRC"), evidence.resolve(snap, dst, "DST")
            a, b = evidence.same_family(a, b, snap)
            await evidence.read_statuses(s, snap, {n for n in (a.node, b.node) if n})
            n, proto = parse_port(port)
            check = Checker(snap, Inputs(pols, nss, pods), n, proto)
            return walk(snap, a, b, n, proto, live=live, policy=check)

        return self.run(go)


@pytest.fixture
def fab(etcd_endpoints: list[str], prefix: str) -> Iterator[Fabric]:
    f = Fabric(etcd_endpoints, prefix)
    f.setup()
    yield f


def test_healthy_path_is_reachable(fab: Fabric) -> None:
    r = fab.explain()
    assert r.summary == "reachable" and r.blocked is None
    assert [(h.layer, h.state) for h in r.hops] == [
        ("ipam", "ok"), ("ipam", "ok"), ("node", "ok"), ("node", "ok"),
        ("announcement", "ok"), ("announcement", "ok"), ("announcement", "ok"),
        ("announcement", "ok"), ("forwarding", "ok"), ("forwarding", "ok"),
        ("forwarding", "ok"), ("policy", "ok"), ("policy", "ok")]  # fmt: skip
    assert r.hops[5].evidence["learned"] == {"dst": fab.blocks["b"], "via": [TOR1]}
    assert r.hops[9].name == f"node3 -> {fab.ips['b']} (host route)"


def test_endpoints_resolve_by_pod_ip_and_node(fab: Fabric) -> None:
    snap = fab.run(evidence.read)
    by_pod = evidence.resolve(snap, "x/b", "DST")
    by_ip = evidence.resolve(snap, fab.ips["b"], "DST")
    assert by_pod.kind is by_ip.kind is Kind.POD and by_pod.ip == by_ip.ip
    assert by_pod.node == "node3" and by_pod.allocation and by_pod.allocation.pod == "x/b"
    node = evidence.resolve(snap, "node3", "DST")
    assert node.kind is Kind.NODE and str(node.ip) == "10.0.2.10"
    assert evidence.resolve(snap, "10.0.2.10", "DST").node == "node3"
    free = evidence.resolve(snap, "10.244.255.1", "DST")
    assert free.kind is Kind.ADDRESS and free.allocation is None
    for text, problem in (("x/nope", "no pod x/nope"), ("nonode", "not NAMESPACE/POD"),
                          ("192.0.2.1", "in no IP pool"), ("a/b/c", "not NAMESPACE/POD")):  # fmt: skip
        with pytest.raises(CLIError, match=problem) as e:
            evidence.resolve(snap, text, "DST")
        assert e.value.resource == "DST"


def test_each_ipam_fault_is_named(fab: Fabric) -> None:
    aff = keys.affinity("node3", ipaddress.ip_network(fab.blocks["b"]))
    for state in ("pending", "pendingDeletion"):
        fab.put(aff, {"state": state})
        r = fab.explain()
        assert r.blocked and r.blocked.layer == "ipam" and state in r.blocked.detail
        assert r.blocked.name == "destination x/b" and r.blocked.fix
    fab.put(aff, None)
    assert "no affinity record" in fab.explain().summary
    fab.put(aff, {"state": "confirmed"})
    r = fab.explain("x/a", "10.244.255.1")
    assert r.summary.startswith("blocked at ipam: 10.244.255.1 is not assigned")


def test_node_faults_are_named(fab: Fabric) -> None:
    fab.publish(
        "node3", readiness={"ok": False, "detail": {"peers": "0/1 required peers established"}}
    )
    r = fab.explain()  # peers belong to the announcement layer: the node hop only says so
    assert r.hops[3].state == "ok" and "not ready (peers: 0/1 required" in r.hops[3].detail
    fab.publish("node3", speaker={"running": False, "pid": None, "restarts": 4})
    assert fab.explain().summary.startswith("blocked at node: the BGP speaker")
    fab.put(keys.status("node3"), None)
    assert "publishes no status" in fab.explain().summary
    fab.put(keys.node("node3"), None)
    r = fab.explain()
    assert r.blocked and r.blocked.layer == "node" and r.blocked.name == "node node3"
    assert "not registered" in r.blocked.detail


def test_announcement_faults_are_named(fab: Fabric) -> None:
    fab.publish("node3", sessions=[{"name": "n3", "peerIP": TOR2, "state": "down",
                                    "info": "Active"}])  # fmt: skip
    r = fab.explain()
    assert r.blocked and r.blocked.layer == "announcement"
    assert "no established BGP session" in r.blocked.detail and TOR2 in r.blocked.detail
    fab.publish("node3", announcements=[])
    assert "does not announce" in fab.explain().summary
    fab.publish("node3")
    fab.publish("node1", learned={"count": 0, "truncated": False, "items": []},
                sessions=[{"name": "n1", "peerIP": TOR1, "state": "down", "info": "Idle"}])  # fmt: skip
    r = fab.explain()
    assert r.blocked and r.blocked.name == f"node1 learned {fab.blocks['b']}"
    assert "its own sessions are down" in r.blocked.detail
    fab.publish("node1", learned={"count": 9999, "truncated": True, "items": []})
    r = fab.explain()
    assert r.summary == "reachable" and any(h.state == "unknown" for h in r.hops)


def test_disable_bgp_export_is_named(etcd_endpoints: list[str], prefix: str) -> None:
    f = Fabric(etcd_endpoints, prefix)
    f.setup(export=False)
    r = f.explain()
    assert r.blocked and r.blocked.layer == "announcement"
    assert "disableBGPExport" in r.blocked.detail and r.blocked.name.startswith("node3 announces")


def test_forwarding_faults_are_named(fab: Fabric) -> None:
    st = fab.status("node1")
    st["routes"]["items"] = st["routes"]["items"][1:]
    fab.publish("node1", routes=st["routes"])
    assert fab.explain().summary.startswith("blocked at forwarding: fabricd on node1 installed no")
    fab.publish("node1")
    st = fab.status("node3")
    st["routes"]["items"] = st["routes"]["items"][:2]
    fab.publish("node3", routes=st["routes"])
    r = fab.explain()
    assert r.blocked and r.blocked.name.endswith("(host route)") and "no host route" in r.summary
    fab.publish("node3")
    # --live on node1: the kernel's answer must be fabricd's route for the block
    ours = {"type": "unicast", "prefix": fab.blocks["b"], "protocol": 201,
            "gateways": [TOR1], "devices": ["eth1"]}  # fmt: skip
    assert fab.explain(live=Live("node1", 201, {fab.ips["b"]: ours})).summary == "reachable"
    default = {**ours, "prefix": "0.0.0.0/0", "protocol": 3}
    r = fab.explain(live=Live("node1", 201, {fab.ips["b"]: default}))
    assert r.blocked and r.blocked.layer == "forwarding" and "behind its back" in r.blocked.detail
    r = fab.explain(live=Live("node1", 201, {fab.ips["b"]: {"type": "unreachable"}}))
    assert r.blocked and r.blocked.layer == "forwarding"


def test_same_node_needs_no_bgp(fab: Fabric) -> None:
    async def go(s: Store) -> None:
        await Allocator(s).auto_assign(AssignRequest("fabric.c.eth0", "node3", num_v4=1,
                                                     attrs={"namespace": "x", "pod": "c", "containerID": "cc"}))  # fmt: skip

    fab.run(go)
    r = fab.explain("x/c", "x/b")
    assert r.summary == "reachable"
    assert [h.state for h in r.hops if h.layer == "announcement"] == ["skipped", "skipped"]


def test_cli_exit_codes_and_formats(fab: Fabric, cli: Cli) -> None:
    r = cli("explain", "x/a", "x/b", "80/tcp")
    assert r.stdout.splitlines()[0].endswith(", 80/TCP") and r.stdout.rstrip().endswith("reachable")
    doc = json.loads(cli("explain", "x/a", "x/b", "-o", "json").stdout)
    assert doc["verdict"] == "reachable" and doc["blockedAt"] is None and len(doc["hops"]) == 13
    assert yaml.safe_load(cli("explain", "x/a", "x/b", "-o", "yaml").stdout) == doc
    fab.put(keys.node("node3"), None)
    r = cli("explain", "x/a", "x/b", code=4)
    assert "blocked at node: node node3 is not registered" in r.stdout and "what to do:" in r.stdout
    assert json.loads(cli("explain", "x/a", "x/b", "-o", "json", code=4).stdout)["fix"]
    assert "error: SRC: no pod x/zz" in cli("explain", "x/zz", "x/b", code=1).stderr
    assert "PORT/PROTO" in cli("explain", "x/a", "x/b", "http", code=1).stderr
    r = cli("--etcd-endpoints", "127.0.0.1:9", "--timeout", "0.5", "explain", "x/a", "x/b", code=2)
    assert r.stderr.startswith("error: ")
    r = cli("explain", "x/a", "x/b", "--live", "--health-listen", "127.0.0.1:9", code=1)
    assert "fabricd does not answer" in r.stderr


@pytest.mark.parametrize(("text", "want"), [("80/TCP", (80, "TCP")), ("53/udp", (53, "UDP")),
                                            ("80", (80, "TCP")), ("9/SCTP", (9, "SCTP")),
                                            (None, (None, None))])  # fmt: skip
def test_parse_port(text: str | None, want: tuple[int | None, str | None]) -> None:
    assert parse_port(text) == want


@pytest.mark.parametrize("text", ["0/TCP", "65536", "80/ICMP", "x/TCP", "80/", ""])
def test_parse_port_refuses(text: str) -> None:
    with pytest.raises(CLIError, match="is not PORT/PROTO") as e:
        parse_port(text)
    assert e.value.resource == "PORT/PROTO"


def _policy(fab: Fabric, doc: dict[str, Any]) -> None:
    obj = decode(doc)
    fab.run(lambda s: PolicyStore(s).apply([obj]))


def test_policy_verdicts_come_from_the_compiler(fab: Fabric) -> None:
    """A deny-all on x/b: blocked at its ingress, naming the policy; an allow of 80/TCP
    from x/a opens 80 and only 80; an egress deny on x/a blocks at the source first."""
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-all", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {}}, "policyTypes": ["Ingress"]}}  # fmt: skip
    _policy(fab, deny)
    r = fab.explain(port="80/TCP")
    assert r.blocked and r.blocked.layer == "policy" and r.blocked.name == "ingress at x/b"
    assert r.blocked.detail == ("denied: selected by x/deny-all; no rule allows 80/TCP from x/a "
                                "(on node3)")  # fmt: skip
    assert r.blocked.evidence["node"] == "node3" and r.blocked.evidence["policies"] == [
        "x/deny-all"
    ]
    assert [h.state for h in r.hops if h.layer == "policy"] == ["ok", "blocked"]
    assert "x/deny-all" in r.blocked.fix
    # without a port only isolation is known
    r = fab.explain()
    assert r.summary == "reachable" and r.hops[-1].state == "unknown"
    allow = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "allow-80", "namespace": "x"},
             "spec": {"podSelector": {"matchLabels": {}}, "ingress": [{"ports": [{"port": 80}]}]}}  # fmt: skip
    _policy(fab, allow)
    r = fab.explain(port="80/TCP")
    assert r.summary == "reachable" and "allowed by x/allow-80 ingress[0]" in r.hops[-1].detail
    r = fab.explain(port="81/TCP")
    assert r.blocked and "x/allow-80, x/deny-all" in r.blocked.detail
    assert fab.explain(port="80/UDP").blocked is not None
    egress = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "no-egress", "namespace": "x"},
              "spec": {"podSelector": {"matchLabels": {}}, "policyTypes": ["Egress"]}}  # fmt: skip
    _policy(fab, egress)
    r = fab.explain(port="80/TCP")
    assert r.blocked and r.blocked.name == "egress at x/a" and r.blocked.evidence["node"] == "node1"
