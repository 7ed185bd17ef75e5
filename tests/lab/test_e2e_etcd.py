"""End to end in two-rack with a 3-member etcd: the etcd leader SIGKILLed while pods are being
created, every member stopped under live traffic and started again, fabricd restarted with 50
ADDs in flight, and pods lost without a DEL given back by CNI GC and ``fabricctl ipam gc``.

Pods are made through the installed CNI plugin (lab.pods) and kept in one registry (``Fleet``)
so every check can compare the datastore with what should exist: ``fabricctl ipam check
--live-handles`` reports any allocation of a host whose handle is not a live pod's. A runtime
retries code 11 (try again later): the tests do what a kubelet does, bounded: DEL the failed
sandbox, then ADD a new one. Figures (code-11 latency, creation rate across the leader kill)
are printed (``pytest -s``) and recorded as junit properties.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lab_checks import lab_name

from cni.errors import Code
from fabric.dataplane.attachment import host_ifname
from lab import pods, procs
from lab.etcd import EtcdCluster, EtcdMember
from lab.pods import Pod
from lab.runner import Lab
from lab.topology import load

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node2", "node3", "node4")
Report = Callable[[str, object], None]


@dataclass
class Fleet:
    """Every pod that should exist, by container id; a lock for the threads that add them."""

    pods: dict[str, Pod] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, pod: Pod) -> None:
        with self.lock:
            self.pods[pod.name] = pod

    def drop(self, pod: Pod) -> None:
        with self.lock:
            self.pods.pop(pod.name, None)

    def on(self, node: str) -> list[Pod]:
        return [p for p in self.pods.values() if p.node == node]


def topology() -> dict[str, Any]:
    raw = copy.deepcopy(dict(load("two-rack").raw))
    raw["topology"]["nodes"]["etcd"]["labels"]["fabric.etcd.members"] = "3"
    return raw


@pytest.fixture(scope="module")
def lab(need_root: None, request: pytest.FixtureRequest) -> Iterator[Lab]:
    lab = Lab(topology(), name=lab_name("etcd3"))
    failed = request.session.testsfailed
    try:
        lab.up()
        for r in ("spine", "tor1", "tor2"):
            lab.wait_for(functools.partial(lab.established, r), 30, what=f"BGP sessions of {r}")
        lab.start_fabric()
        pods.install(lab)
        yield lab
    finally:
        for m in lab.etcd.members if lab.etcd else ():  # reaped: some were started here
            m.stop(timeout=3)
        if request.session.testsfailed > failed:
            keep_logs(lab)
        lab.down()


def keep_logs(lab: Lab) -> None:
    """Copy the daemons' logs out of the lab directory (which ``down`` removes)."""
    out = Path(tempfile.mkdtemp(prefix=f"{lab.name}-logs-"))
    for log in [*lab.dir.glob("*/*.out"), *lab.dir.glob("etcd/*.log")]:
        shutil.copy(log, out / f"{log.parent.name}-{log.name}")
    print(f"\n[e2e-etcd] logs of the failed run kept in {out}")


@pytest.fixture(scope="module")
def fleet(lab: Lab) -> Fleet:
    """One pod per host to start with (``base-<node>``): the probes' ends."""
    f = Fleet()
    for node in HOSTS:
        f.add(pods.add(lab, node, f"base-{node}"))
    return f


@pytest.fixture
def report(record_property: Report) -> Report:
    def rep(key: str, value: object) -> None:
        print(f"\n[e2e-etcd] {key} = {value}")
        record_property(key, value)

    return rep


# ---------------------------------------------------------------------------- helpers


def etcd_of(lab: Lab) -> EtcdCluster:
    assert lab.etcd is not None
    return lab.etcd


def record_etcd(lab: Lab, m: EtcdMember) -> None:
    """Record a (re)started member's process with the lab, as ``up()`` does."""
    assert m.proc is not None
    argv = [str(a) for a in m.proc.args]  # type: ignore[union-attr]
    node = lab.nodes("etcd")[0]
    lab.state.add_proc(procs.record(m.proc.pid, argv[4:], m.netns or "", node, f"etcd-{m.name}"))


def handle(cid: str) -> str:
    return f"{pods.NETWORK}.{cid}.eth0"


def state_dir(lab: Lab, node: str) -> Path:
    return Path(pods.socket_of(lab, node)).parent / "state"


def records(lab: Lab, node: str) -> dict[str, dict[str, Any]]:
    """fabricd's CNI state records on ``node`` by container id."""
    out = {}
    for p in state_dir(lab, node).glob("*.json"):
        rec = json.loads(p.read_text())
        out[rec["containerID"]] = rec
    return out


def fab_links(lab: Lab, node: str) -> set[str]:
    out = lab.exec(node, ["ip", "-o", "link", "show"], check=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return {n for n in names if n.startswith("fab")}


def in_use(lab: Lab, ip: str) -> bool:
    r = lab.fabricctl(["ipam", "show", "--ip", ip, "-o", "json"])
    assert r.returncode == 0, r.stderr
    return bool(json.loads(r.stdout)["inUse"])


def ipam_check(lab: Lab, fleet: Fleet) -> None:
    """``ipam check`` with every host's live handles is clean, and the addresses in use are
    exactly the fleet's: no duplicate, nothing lost, nothing leaked."""
    live = {n: [handle(p.name) for p in fleet.on(n)] for n in HOSTS}
    path = lab.dir / "live-handles.json"
    path.write_text(json.dumps(live))
    r = lab.fabricctl(["ipam", "check", "--live-handles", str(path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"Found {len(fleet.pods)} IPs in use." in r.stdout, r.stdout
    ips = [p.ip for p in fleet.pods.values()]
    assert len(set(ips)) == len(ips), "an address was given twice"


def add_retrying(lab: Lab, node: str, cid: str, netns: str, budget: float = 60.0,
                 args: str = "") -> tuple[Pod, int]:  # fmt: skip
    """ADD like a kubelet: on code 11, DEL the sandbox (retrying 11 too) and ADD a new one
    (``<cid>-r<n>``) in the same namespace; anything else fails. (pod, attempts)."""
    end = time.monotonic() + budget
    attempt, name = 0, cid
    while True:
        attempt += 1
        code, doc = pods.cni(lab, node, "ADD", name, netns, args=args)
        if code == 0:
            return Pod(node, name, netns, str(doc["ips"][0]["address"].split("/")[0]), doc), attempt
        assert isinstance(doc, dict) and doc.get("code") == Code.TRY_AGAIN_LATER, (name, doc)
        while pods.cni(lab, node, "DEL", name, netns)[0] != 0:
            assert time.monotonic() < end, f"DEL of {name} kept failing"
            time.sleep(0.2)
        assert time.monotonic() < end, f"ADD of {cid} kept failing: {doc}"
        name = f"{cid}-r{attempt}"
        time.sleep(0.1)


def ready(lab: Lab, node: str) -> bool:
    return lab.health(node)[0] == 200


def has_route(lab: Lab, node: str, dst: str) -> bool:
    return dst in lab.kernel_routes(node)


def reachable(lab: Lab, src: Pod, ip: str, timeout: float = 30.0) -> None:
    lab.wait_for(lambda: pods.ping(lab, src, ip), timeout, 0.2, f"{src.name} -> {ip}")


def assert_attachments_match(lab: Lab, fleet: Fleet, node: str) -> None:
    """fabricd's records and fab* links on ``node`` are exactly the fleet's pods there."""
    mine = {p.name for p in fleet.on(node)}
    recs = records(lab, node)
    assert set(recs) == mine, set(recs) ^ mine
    assert {r["phase"] for r in recs.values()} <= {"ready"}
    assert fab_links(lab, node) == {host_ifname(c, "eth0") for c in mine}


# ---------------------------------------------------------------------------- tests


def test_etcd_leader_killed_while_pods_are_created(lab: Lab, fleet: Fleet,
                                                   report: Report) -> None:  # fmt: skip
    etcd = etcd_of(lab)
    leader = lab.wait_for(etcd.leader, 20, 0.2, "an etcd leader")
    assert leader is not None
    per_node, threads_per_node = 12, 2
    todo = {n: [f"lk{i}-{n}" for i in range(per_node)] for n in HOSTS}
    netns = {c: lab.add_netns(f"{lab.plan.prefix}p{c}") for cids in todo.values() for c in cids}
    done: list[tuple[float, int]] = []  # (when, attempts)

    def worker(node: str, cids: list[str]) -> None:
        for cid in cids:
            pod, attempts = add_retrying(lab, node, cid, netns[cid])
            fleet.add(pod)
            done.append((time.monotonic(), attempts))

    total = per_node * len(HOSTS)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(HOSTS) * threads_per_node) as ex:
        futs = [ex.submit(worker, n, cids[i::threads_per_node])
                for n, cids in todo.items() for i in range(threads_per_node)]  # fmt: skip
        lab.wait_for(lambda: len(done) >= total // 3 or any(f.done() for f in futs), 60, 0.005)
        killed_at, done_before = time.monotonic(), len(done)
        leader.kill()  # SIGKILL by PID
        lab.wait_for(lambda: (etcd.leader() or leader) is not leader, 20, 0.1, "a new leader")
        elected = time.monotonic() - killed_at
        etcd.restart(leader)
        record_etcd(lab, leader)
        for f in futs:
            f.result()
    finished = time.monotonic()
    assert 0 < done_before < total, "the leader was not killed while pods were being created"
    after = sorted(t for t, _ in done if t > killed_at)
    gaps = [b - a for a, b in zip([killed_at, *after], after, strict=False)]
    report("leader_kill.pods", total)
    report("leader_kill.rate_before_per_s", round(done_before / (killed_at - started), 1))
    report("leader_kill.rate_after_per_s",
           round((total - done_before) / (finished - killed_at), 1))  # fmt: skip
    report("leader_kill.new_leader_s", round(elected, 2))
    report("leader_kill.longest_stall_s", round(max(gaps, default=0.0), 2))
    report("leader_kill.retried_adds", sum(a - 1 for _, a in done))
    ipam_check(lab, fleet)
    for node in HOSTS:
        assert_attachments_match(lab, fleet, node)
    last = [p for p in fleet.pods.values() if p.name.startswith(f"lk{per_node - 1}-")]
    for src, dst in ((last[0], last[-1]), (last[-1], last[0])):
        reachable(lab, src, dst.ip)
    revs = lab.wait_for(lambda: len({(m.status() or {}).get("raftIndex") for m in etcd.members})
                        == 1, 20, 0.2, "the restarted member to catch up")  # fmt: skip
    assert revs


def test_all_etcd_members_stopped_then_back(lab: Lab, fleet: Fleet, report: Report) -> None:
    etcd = etcd_of(lab)
    base = {n: fleet.pods[f"base-{n}"] for n in HOSTS}
    pairs = [("node1", "node3"), ("node3", "node1"), ("node2", "node4"), ("node4", "node2")]
    for a, b in pairs:
        reachable(lab, base[a], base[b].ip)
    probes = [pods.Probe(lab, base[a], base[b].ip) for a, b in pairs]
    routes_before = {n: lab.kernel_routes(n) for n in HOSTS}
    ns = {n: lab.add_netns(f"{lab.plan.prefix}pdown-{n}") for n in HOSTS}

    def add_down(node: str, cid: str) -> float:
        t0 = time.monotonic()
        code, doc = pods.cni(lab, node, "ADD", cid, ns[node])
        assert code != 0 and doc["code"] == Code.TRY_AGAIN_LATER, doc
        return time.monotonic() - t0

    try:
        lab.wait_for(lambda: all(p.replies() > 0 for p in probes), 10, 0.1, "probe replies")
        stopped_at = time.monotonic()
        for m in etcd.members:
            m.stop(timeout=3)
        first = add_down("node1", "down-first")  # fabricd may not know yet that etcd is gone
        time.sleep(max(0.0, 2.5 - (time.monotonic() - stopped_at)))
        known = {n: add_down(n, f"down-{n}") for n in HOSTS}
        t0 = time.monotonic()
        code, doc = pods.cni(lab, "node1", "STATUS", "", "", pods.netconf("1.1.0"))
        report("etcd_down.status_code50_s", round(time.monotonic() - t0, 2))
        assert code != 0 and doc["code"] == Code.NOT_AVAILABLE, doc
        assert all(lab.health(n)[0] == 503 for n in HOSTS)
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped_at)))
        for n in HOSTS:  # fabricd keeps every route it had
            assert lab.kernel_routes(n) == routes_before[n]
    finally:
        results = pods.stop_all(probes)
    report("etcd_down.first_add_code11_s", round(first, 2))
    report("etcd_down.add_code11_s", {n: round(t, 2) for n, t in known.items()})
    for (a, b), (sent, lost, seqs) in zip(pairs, results, strict=True):
        report(f"etcd_down.probe_{a}_{b}", f"{sent} sent, {lost} lost")
        assert sent >= 80 and lost == 0, f"{a} -> {b}: {lost} of {sent} lost ({seqs[:10]})"
    assert max(known.values()) < 2.0, f"ADD took up to {max(known.values()):.1f} s to answer 11"
    # Within ~2 s of the outage fabricd's cached probe still says etcd is up: that ADD waits
    # out the store's deadline (etcd.timeout, 5 s) to assign, and again to roll back.
    assert first < 2 * 5.0 + 2.0

    t0 = time.monotonic()
    for m in etcd.start_stopped(30):
        record_etcd(lab, m)
    back = time.monotonic()
    report("etcd_back.quorum_s", round(back - t0, 2))
    for n, cid in [("node1", "down-first")] + [(n, f"down-{n}") for n in HOSTS]:
        assert pods.cni(lab, n, "DEL", cid, ns[n])[0] == 0  # the runtime cleans its failures
    pod, attempts = add_retrying(lab, "node1", "up", ns["node1"], budget=30)
    fleet.add(pod)
    report("etcd_back.first_add_s", round(time.monotonic() - back, 2))
    report("etcd_back.first_add_attempts", attempts)
    for n in HOSTS:
        lab.wait_for(functools.partial(ready, lab, n), 30, 0.2, f"fabricd in {n} ready")
    report("etcd_back.ready_s", round(time.monotonic() - back, 2))
    # A block claimed after the outage (IP= in a block nobody has) reaches the other rack.
    new = pods.add(lab, "node1", "newblock", args=";IP=10.244.200.10")
    fleet.add(new)
    for n in ("node3", "node4"):
        lab.wait_for(functools.partial(has_route, lab, n, "10.244.200.0/26"), 20, 0.1,
                     f"the new block on {n}")  # fmt: skip
    report("etcd_back.new_block_on_rack2_s", round(time.monotonic() - back, 2))
    reachable(lab, base["node3"], new.ip)
    reachable(lab, new, base["node4"].ip)

    # ... and fabricd publishes its status again and keeps its registration
    def published() -> bool:
        r = lab.fabricctl(["bgp", "status", "--node", "node1", "-o", "json"])
        docs = json.loads(r.stdout) if r.returncode == 0 else []
        doc = docs[0] if isinstance(docs, list) and docs else docs
        return isinstance(doc, dict) and "10.244.200.0/26" in doc.get("announcements", [])

    lab.wait_for(published, 20, 0.3, "node1's status with the new block")
    r = lab.fabricctl(["node", "list", "-o", "json"])
    assert r.returncode == 0 and all(n in r.stdout for n in HOSTS), r.stdout + r.stderr
    ipam_check(lab, fleet)


def test_fabricd_restarted_with_50_adds_in_flight(lab: Lab, fleet: Fleet, report: Report) -> None:
    """SIGTERM (a service restart) with 50 ADDs in flight, fabricd started again at once."""
    node, n = "node2", 50
    remote = fleet.pods["base-node3"]
    cids = [f"fly{i}" for i in range(n)]
    netns = {c: lab.add_netns(f"{lab.plan.prefix}p{c}") for c in cids}
    sd = state_dir(lab, node)
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        futs = {c: ex.submit(pods.cni, lab, node, "ADD", c, netns[c]) for c in cids}
        lab.wait_for(lambda: any('"adding"' in p.read_text() for p in sd.glob("fabric.fly*")),
                     20, 0.001, "an ADD in flight")  # fmt: skip
        t0 = time.monotonic()
        lab.stop_fabricd(node, signal.SIGTERM)
        lab.start_fabricd(node)
        results = {c: f.result() for c, f in futs.items()}
    lab.wait_for(lambda: lab.health(node)[0] == 200, 60, 0.2, f"fabricd in {node} ready")
    report("restart50.ready_again_s", round(time.monotonic() - t0, 2))
    ok = {c: doc for c, (code, doc) in results.items() if code == 0}
    failed = {c: doc for c, (code, doc) in results.items() if code != 0}
    for c, doc in ok.items():  # first: a failure below must not turn them into "leaks" later
        fleet.add(Pod(node, c, netns[c], str(doc["ips"][0]["address"].split("/")[0]), doc))
    report("restart50.succeeded", len(ok))
    report("restart50.failed_code11", len(failed))
    assert ok, "no ADD survived the restart"
    assert all(d and d["code"] == Code.TRY_AGAIN_LATER for d in failed.values()), failed
    recs = records(lab, node)
    assert not set(failed) & set(recs), "a failed ADD left its record"
    assert not {host_ifname(c, "eth0") for c in failed} & fab_links(lab, node)
    assert_attachments_match(lab, fleet, node)
    ipam_check(lab, fleet)  # a failed ADD holding an address would be a leak here
    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda c: reachable(lab, fleet.pods[c], remote.ip), ok))


def test_pod_lost_without_del_given_back_by_gc(lab: Lab, fleet: Fleet) -> None:
    """The runtime crashed: a pod's namespace is gone and no DEL came. CNI GC (the runtime's
    valid attachments) gives one such address back, ``fabricctl ipam gc`` another; its live
    handles are what fabricd's state dir records minus the attachments whose namespace is
    gone (fabricd still holds a ``ready`` record for the lost pod)."""
    node = "node4"
    remote = fleet.pods["base-node1"]
    lost_a, lost_b = (pods.add(lab, node, c) for c in ("lost-a", "lost-b"))
    for p in (lost_a, lost_b):
        fleet.add(p)
        reachable(lab, remote, p.ip)

    def crash(p: Pod) -> None:  # the runtime died: the sandbox goes, no DEL
        lab.exec(node, ["ip", "netns", "del", p.netns_name], check=True)
        fleet.drop(p)

    def cni_gc() -> None:
        valid = [{"containerID": p.name, "ifname": "eth0"} for p in fleet.on(node)]
        conf = pods.netconf("1.1.0", **{"cni.dev/valid-attachments": valid})
        code, doc = pods.cni(lab, node, "GC", "", "", conf)
        assert code == 0, doc

    crash(lost_a)
    cni_gc()
    assert not in_use(lab, lost_a.ip)
    assert lost_a.name not in records(lab, node)
    assert host_ifname(lost_a.name, "eth0") not in fab_links(lab, node)
    assert lost_a.ip not in lab.exec(node, ["ip", "route", "show", lost_a.ip]).stdout
    ipam_check(lab, fleet)

    # fabricctl ipam gc: live = the attachments fabricd records whose sandbox still exists
    crash(lost_b)
    live = [handle(c) for c, r in records(lab, node).items() if Path(r["netns"]).exists()]
    assert handle(lost_b.name) not in live and len(live) == len(fleet.on(node))
    path = lab.dir / "gc-live.json"
    path.write_text(json.dumps(live))
    r = lab.fabricctl(["ipam", "gc", "--node", node, "--live-handles", str(path), "-o", "json"])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["released"] == {handle(lost_b.name): [lost_b.ip]}
    assert not in_use(lab, lost_b.ip)
    ipam_check(lab, fleet)

    # The address is free: a new pod may get it while fabricd still has lost-b's record.
    # Collecting that record later must not take the new pod's host route away.
    again = pods.add(lab, node, "again", args=f";IP={lost_b.ip}")
    fleet.add(again)
    reachable(lab, remote, again.ip)
    cni_gc()
    assert lost_b.name not in records(lab, node)
    assert in_use(lab, again.ip)
    route = lab.exec(node, ["ip", "route", "show", f"{again.ip}/32"]).stdout
    assert f"dev {host_ifname(again.name, 'eth0')}" in route, route
    reachable(lab, remote, again.ip, timeout=5)
    assert_attachments_match(lab, fleet, node)
    ipam_check(lab, fleet)
