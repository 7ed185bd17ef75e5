"""``fabricctl explain`` in two-rack with fabricd on every host: healthy, the path is
``reachable`` (exit 0); each fault the reliability tests create is named as exactly its
layer (exit 4): a pending block affinity (ipam), ``disableBGPExport`` on the pool and a
node's sessions down (announcement), a route deleted behind fabricd's back (forwarding,
seen with ``--live`` on the node), a deny NetworkPolicy (policy), a node powered off (node). Each test starts and ends
with the path whole again. The time ``explain`` takes is printed (``pytest -s``)."""

from __future__ import annotations

import json
import re
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fabric_helpers import fabric_lab

from lab import pods
from lab.control import BIN
from lab.pods import Pod
from lab.render import ETCD_PREFIX
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]

# NetworkPolicy written the way `fabricctl apply` stores it (through the policy store)
POLICY = """
import asyncio, json, sys
from fabric.resources.policy_codec import NETPOL, decode
from fabric.resources.policy_store import PolicyStore
from ipam.store import Store
async def main(eps, verb, doc):
    d = json.loads(doc)
    async with Store(eps.split(','), '/fabric/v1') as s:
        if verb == 'apply':
            await PolicyStore(s).apply([decode(d)])
        else:
            await PolicyStore(s).delete(NETPOL, d['metadata']['name'], d['metadata']['namespace'])
asyncio.run(main(*sys.argv[1:]))
"""
HOLD = 9.0  # BGP hold time in the lab
LEASE = 15.0  # fabricd's lease TTL in the lab (lab/render.py)


def note(msg: str) -> str:
    print(f"\n[explain] {msg}", flush=True)
    return msg


@dataclass
class Path:
    lab: Lab
    a: Pod  # node1, rack 1 (FRR)
    b: Pod  # node3, rack 2 (BIRD)

    @property
    def src(self) -> str:
        return f"default/{self.a.name}"

    @property
    def dst(self) -> str:
        return f"default/{self.b.name}"

    def explain(self, *extra: str, node: str = "node1", src: str = "", dst: str = ""
                ) -> dict[str, Any]:  # fmt: skip
        r = self.lab.fabricctl(["explain", src or self.src, dst or self.dst, *extra, "-o", "json"],
                               node)  # fmt: skip
        assert r.returncode in (0, 4), f"exit {r.returncode}: {r.stderr}"
        doc: dict[str, Any] = json.loads(r.stdout)
        assert (r.returncode == 4) == (doc["verdict"] == "blocked"), (r.returncode, doc["summary"])
        return doc

    def reachable(self) -> bool:
        return self.explain()["verdict"] == "reachable"

    def blocked_at(self, layer: str, *extra: str, timeout: float = 30.0, node: str = "node1"
                   ) -> dict[str, Any]:  # fmt: skip
        """Wait until explain says blocked at ``layer``; that report."""
        seen: list[str] = []

        def check() -> dict[str, Any] | None:
            doc = self.explain(*extra, node=node)
            seen.append(doc["summary"])
            return doc if doc["blockedAt"] == layer else None

        try:
            return self.lab.wait_for(check, timeout, 0.5, f"explain blocked at {layer}")
        except TimeoutError as e:
            raise AssertionError(f"never blocked at {layer}; last said: {seen[-3:]}") from e


def hop(doc: dict[str, Any]) -> dict[str, Any]:
    """The blocked hop (the last one: the walk stops there)."""
    last = doc["hops"][-1]
    assert last["state"] == "blocked", doc["summary"]
    assert all(h["state"] != "blocked" for h in doc["hops"][:-1])
    return dict(last)


@pytest.fixture(scope="module")
def path(make_lab) -> Path:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
    pods.install(lab, ["node1", "node3"])
    p = Path(lab, pods.add(lab, "node1"), pods.add(lab, "node3"))
    lab.wait_for(lambda: pods.ping(lab, p.a, p.b.ip), 30, what="node1's pod pings node3's")
    lab.wait_for(p.reachable, 30, 0.5, "explain: reachable")
    return p


@pytest.fixture
def whole(path: Path) -> Iterator[Path]:
    path.lab.wait_for(path.reachable, 60, 0.5, "reachable before the test")
    yield path
    path.lab.wait_for(path.reachable, 90, 0.5, "reachable again after the test")
    assert pods.ping(path.lab, path.a, path.b.ip)


def test_healthy_path_is_reachable_and_walks_every_layer(whole: Path) -> None:
    p = whole
    t0, c0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    runs = 5
    for _ in range(runs):
        doc = p.explain("80/TCP")
    wall = (time.perf_counter() - t0) / runs
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime) / runs
    note(f"explain {p.src} -> {p.dst}: {wall * 1000:.0f} ms wall, {cpu * 1000:.0f} ms CPU per "
         "run (fabricctl start included; shared machine)")  # fmt: skip
    assert doc["verdict"] == "reachable" and doc["summary"] == "reachable"
    assert (doc["port"], doc["protocol"]) == (80, "TCP")
    assert doc["source"]["ip"] == p.a.ip and doc["destination"]["ip"] == p.b.ip
    assert doc["source"]["node"] == "node1" and doc["destination"]["node"] == "node3"
    layers = {h["layer"] for h in doc["hops"]}
    assert {"ipam", "node", "announcement", "forwarding", "policy"} <= layers
    assert all(h["state"] == "ok" for h in doc["hops"]), doc["hops"]
    learned = next(h for h in doc["hops"] if h["hop"].startswith("node1 learned"))
    tor1 = str(p.lab.node("node1").neighbors[0].address)
    assert learned["evidence"]["learned"]["via"] == [tor1]
    # live on each end: the kernel's own lookups agree
    for node in ("node1", "node3"):
        live = p.explain("--live", node=node)
        assert live["verdict"] == "reachable", live["summary"]
        assert live["live"] == node
        assert any("live lookup" in h["detail"] for h in live["hops"]), live["hops"]
    text = p.lab.fabricctl(["explain", p.src, p.dst], "node1")
    assert text.returncode == 0 and text.stdout.rstrip().endswith("reachable"), text.stdout


def test_bad_questions_are_user_errors(whole: Path) -> None:
    p = whole
    for args, where in ((["default/nope", p.dst], "SRC"), ([p.src, "nonode"], "DST"),
                        ([p.src, p.dst, "80/ICMP"], "PORT/PROTO"),
                        ([p.src, "192.0.2.1"], "DST")):  # fmt: skip
        r = p.lab.fabricctl(["explain", *args], "node1")
        assert r.returncode == 1 and r.stderr.startswith(f"error: {where}: "), (args, r.stderr)
        assert "Traceback" not in r.stderr
    r = p.lab.fabricctl(["explain", p.src, p.dst, "--live"], "node2")
    assert r.returncode == 1 and "--live" in r.stderr, r.stderr
    r = p.lab.exec("node1", [_bin(), "--etcd-endpoints",
                             "127.0.0.1:9", "--timeout", "1", "explain", p.src, p.dst])  # fmt: skip
    assert r.returncode == 2, r.stderr


def _bin() -> str:
    return str(BIN / "fabricctl")


def test_pending_affinity_is_blocked_at_ipam(whole: Path) -> None:
    p = whole
    block = p.explain()["destination"]["block"]
    key = f"{ETCD_PREFIX}/ipam/affinity/node3/{block.replace('/', '-')}"

    def put(state: str) -> None:
        argv = ["etcdctl", "--endpoints", p.lab.etcd_endpoints[0], "put", key,
                json.dumps({"state": state})]  # fmt: skip
        p.lab.exec("node1", argv, check=True)

    put("pending")
    try:
        doc = p.blocked_at("ipam")
    finally:
        put("confirmed")
    h = hop(doc)
    assert h["hop"] == f"destination {p.dst}" and h["evidence"]["affinity"] == "pending"
    assert "pending" in doc["reason"] and block in doc["reason"] and doc["fix"]
    note(doc["summary"])


def test_disable_bgp_export_is_blocked_at_announcement(whole: Path) -> None:
    p = whole
    saved = p.lab.fabricctl(["get", "ippool", "pods", "-o", "yaml"]).stdout
    assert "disableBGPExport: false" in saved
    f = p.lab.dir / "explain-pool.yaml"
    f.write_text(saved.replace("disableBGPExport: false", "disableBGPExport: true"))
    assert p.lab.fabricctl(["apply", "-f", str(f)]).returncode == 0
    try:
        doc = p.blocked_at("announcement")
    finally:
        f.write_text(saved)
        assert p.lab.fabricctl(["apply", "-f", str(f)]).returncode == 0
    h = hop(doc)
    block = doc["destination"]["block"]
    assert h["hop"] == f"node3 announces {block}" and "disableBGPExport" in doc["reason"]
    note(doc["summary"])


def test_sessions_down_are_blocked_at_announcement(whole: Path) -> None:
    """node3's only peer gets a wrong AS: its session never comes up again."""
    p = whole
    name = "node3-tor2"
    saved = p.lab.fabricctl(["get", "bgppeer", name, "-o", "yaml"]).stdout
    f = p.lab.dir / "explain-peer.yaml"
    f.write_text(saved)
    tor_ip = str(p.lab.node("node3").neighbors[0].address)
    assert p.lab.fabricctl(["peer", "delete", name]).returncode == 0
    try:
        r = p.lab.fabricctl(["peer", "add", name, "--node", "node3", "--peer-ip", tor_ip,
                             "--as-number", "65009", "--hold-time", "9"])  # fmt: skip
        assert r.returncode == 0, r.stderr
        doc = p.blocked_at("announcement", timeout=60)
    finally:
        p.lab.fabricctl(["peer", "delete", name])
        assert p.lab.fabricctl(["apply", "-f", str(f)]).returncode == 0
    h = hop(doc)
    assert h["hop"].startswith("node3 announces"), h
    assert "no established BGP session" in doc["reason"] and tor_ip in doc["reason"]
    assert h["evidence"]["established"] == []
    note(doc["summary"])


def test_route_deleted_behind_fabricds_back_is_blocked_at_forwarding(whole: Path) -> None:
    """Seen by the kernel lookup (--live on node1), before the resync (60 s) repairs it."""
    p = whole
    block = p.explain()["destination"]["block"]
    doc: dict[str, Any] = {}
    for _ in range(3):  # the resync may repair it between the delete and the lookup
        p.lab.exec("node1", ["ip", "route", "del", block, "proto", "201"], check=True)
        doc = p.explain("--live")
        if block not in p.lab.kernel_routes("node1"):
            break
    assert doc["blockedAt"] == "forwarding", doc["summary"]
    h = hop(doc)
    assert h["hop"] == f"node1 -> {p.b.ip}" and h["evidence"]["installed"]["dst"] == block
    assert "behind its back" in doc["reason"] and doc["live"] == "node1"
    note(doc["summary"])
    # without --live the status document (fabricd's own table) cannot see it
    assert p.explain()["verdict"] == "reachable"
    p.lab.wait_for(lambda: block in p.lab.kernel_routes("node1"), 90, 1, "the resync repairs it")


def _policy(lab: Lab, verb: str, doc: dict[str, Any]) -> None:
    argv = [sys.executable, "-c", POLICY, ",".join(lab.etcd_endpoints), verb, json.dumps(doc)]
    lab.exec("node1", argv, 60, True)


def nft_packets(lab: Lab, node: str, label: str) -> int:
    """Packets nft counted on ``node``'s policy table for rules labelled ``label``."""
    r = lab.exec(node, ["nft", "-j", "list", "table", "inet", "fabric_filter"], check=True)
    total = 0
    for item in json.loads(r.stdout)["nftables"]:
        rule = item.get("rule")
        if rule and str(rule.get("comment", "")).split(" #")[0] == label:
            total += sum(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
    return total


def metric(lab: Lab, node: str, **labels: str) -> int:
    _, text = lab.health(node, "/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    m = re.search(rf"^fabric_policy_packets_total\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return int(float(m.group(1))) if m else -1


def counted(lab: Lab, node: str, label: str, **labels: str) -> tuple[int, int, int]:
    """(nft before, the metric, nft after): the metric counts what nft counted."""
    before = nft_packets(lab, node, label)
    got = metric(lab, node, **labels)
    return before, got, nft_packets(lab, node, label)


def test_deny_policy_is_blocked_at_policy(whole: Path) -> None:
    """A deny-all ingress in namespace default: explain names the policy at the destination's
    ingress for 80/TCP, and the dataplane agrees (the pod no longer answers); an allow-all
    ingress policy added opens it again. fabric_policy_packets_total counts what nft did."""
    p = whole
    meta = {"namespace": "default"}
    deny = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "explain-deny", **meta},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}  # fmt: skip
    allow = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "explain-allow", **meta},
             "spec": {"podSelector": {}, "ingress": [{}]}}  # fmt: skip
    deny_labels = {"namespace": "default", "policy": "explain-deny", "direction": "ingress",
                   "verdict": "deny"}  # fmt: skip
    allow_labels = {"namespace": "default", "policy": "explain-allow", "direction": "ingress",
                    "verdict": "allow"}  # fmt: skip
    _policy(p.lab, "apply", deny)
    try:
        doc = p.blocked_at("policy", "80/TCP")
        p.lab.wait_for(lambda: not pods.ping(p.lab, p.a, p.b.ip), 10, 0.5, "the ping denied")
        denied = counted(p.lab, "node3", "default-deny ingress", **deny_labels)
        _policy(p.lab, "apply", allow)
        p.lab.wait_for(lambda: pods.ping(p.lab, p.a, p.b.ip), 10, 0.5, "the ping allowed")
        opened = p.explain("80/TCP")
        allowed = counted(p.lab, "node3", "default/explain-allow ingress[0]", **allow_labels)
    finally:
        _policy(p.lab, "delete", allow)
        _policy(p.lab, "delete", deny)
    h = hop(doc)
    assert h["hop"] == f"ingress at {p.dst}" and h["evidence"]["node"] == "node3"
    assert doc["reason"] == (f"denied: selected by default/explain-deny; no rule allows 80/TCP "
                             f"from {p.src} (on node3)")  # fmt: skip
    assert h["evidence"]["policies"] == ["default/explain-deny"]
    egress = next(x for x in doc["hops"] if x["hop"] == f"egress at {p.src}")
    assert egress["state"] == "ok" and "not isolated" in egress["detail"]
    assert opened["verdict"] == "reachable", opened["summary"]
    assert "allowed by default/explain-allow ingress[0]" in opened["hops"][-1]["detail"]
    note(f"{doc['summary']}; metric vs nft (before, metric, after): deny {denied}, "
         f"allow {allowed}")  # fmt: skip
    for before, got, after in (denied, allowed):
        assert 0 < before <= got <= after


def test_a_fabricd_restarted_over_its_routes_still_shows_them_learned(whole: Path) -> None:
    """SIGTERM leaves node1's routes in the kernel; the new fabricd adopts them, and the RIB
    learning them again writes nothing. Its status must still list them as learned (it said
    ``learned: []`` for good, and explain "node1 has not learned" on a healthy fabric, when
    its first status went out before its session came up: BGP is held back here until then)."""
    p = whole
    hold = ("table inet t_explain_bgp {\n chain out {\n type filter hook output priority 0;\n"
            " tcp dport 179 drop\n tcp sport 179 drop\n }\n}\n")  # fmt: skip
    pid = p.lab.fabricd_pid("node1")
    p.lab.stop_fabricd("node1")
    p.lab.exec("node1", ["nft", "-f", "-"], check=True, input=hold)
    try:
        started = time.time()
        p.lab.start_fabricd("node1")
        assert p.lab.fabricd_pid("node1") != pid

        def published() -> bool:
            node1 = next(h for h in p.explain()["hops"] if h["hop"] == "node node1")
            return bool(node1["evidence"].get("updated", 0) > started)

        p.lab.wait_for(published, 30, 0.5, "node1's first status after its restart")
    finally:
        p.lab.exec("node1", ["nft", "delete", "table", "inet", "t_explain_bgp"], check=True)
    # within 20 s: the route resync (routes.resyncInterval, 60 s) rebuilt the list anyway
    p.lab.wait_for(p.reachable, 20, 0.5, "explain: reachable after node1's fabricd restarted")
    doc = p.explain("80/TCP")
    learned = next(h for h in doc["hops"] if h["hop"].startswith("node1 learned"))
    assert learned["evidence"]["learned"]["via"] == [str(p.lab.node("node1").neighbors[0].address)]


def test_node_powered_off_is_blocked_at_node(whole: Path) -> None:
    """node3's links go down (fabricd keeps running, cut off): the source loses the route
    at once (announcement), and once node3's lease expires explain names the node."""
    p = whole
    p.lab.set_links("node3", "down")
    try:
        doc = p.blocked_at("node", timeout=LEASE + HOLD + 20)
    finally:
        p.lab.set_links("node3", "up")
    h = hop(doc)
    assert h["hop"] == "node node3" and "not registered" in doc["reason"]
    assert h["evidence"]["registered"] is False
    note(doc["summary"])
