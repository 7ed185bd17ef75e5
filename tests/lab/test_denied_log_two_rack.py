"""Denied traffic made visible, in the two-rack lab: pods attached through the installed CNI
plugin, a deny-all on ``db`` (node3), probes and a SYN scan from ``web`` (node1).

- a denied probe shows up in ``fabricctl policy denied --follow`` within 2 s, named as the
  compiled model names it;
- 10,000 denied SYNs leave a bounded log (counted lines) while nft counts every one;
- ``fabric_policy_packets_total`` counts what nft counted.

Both tests failed together now and then (3 of 11 runs after test_policy_dataplane.py, then
in CI and 2 of 5 runs alone): node3's fabricd received no nflog record. Diagnosed: the
group was bound (/proc/net/netfilter/nfnetlink_log) and the log rule in place, but db's
default-deny counter was 0: the probe's single SYN never reached node3, so nothing was
denied. The probe is now sent again until nft counts it (the log's latency is timed from
the probe that was denied), and the scan test no longer needs an earlier document.
Why a fresh pod's first cross-rack SYN is sometimes lost right after the lab comes up is
not known (the demo's first cross-rack ping showed the same, with every hop's route in
place a second later).
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fabric_helpers import fabric_lab
from test_policy_dataplane import pod_doc, rule_packets, store, table  # type: ignore[import-not-found]

from lab import pods
from lab.control import BIN
from lab.pods import Pod
from lab.runner import Lab

pytestmark = [pytest.mark.lab, pytest.mark.root]
HOSTS = ("node1", "node3")
RATE, BURST = 5, 10  # fabricd's defaults: policy.deniedLogRate, twice that
DENY_ALL = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": "default", "name": "deny-all"},
            "spec": {"podSelector": {"matchLabels": {"role": "db"}},
                     "policyTypes": ["Ingress"]}}  # fmt: skip
CONNECT = r"""
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[3]))
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
except OSError:
    pass
"""
FLOOD = r"""
import socket, struct, sys, time
from ipaddress import ip_address
src, dst, dport, n = ip_address(sys.argv[1]), ip_address(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def csum(b):
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
t = time.monotonic()
for i in range(n):
    sport = 20000 + i
    h = struct.pack("!HHIIBBHHH", sport, dport, sport * 7919, 0, 5 << 4, 2, 64240, 0, 0)
    p = src.packed + dst.packed + struct.pack("!BBH", 0, 6, len(h))
    raw.sendto(h[:16] + struct.pack("!H", csum(p + h)) + h[18:], (str(dst), 0))
print(time.monotonic() - t)
"""


@pytest.fixture(scope="module")
def lab(make_lab) -> Lab:  # type: ignore[no-untyped-def]
    lab = fabric_lab(make_lab, "two-rack")
    pods.install(lab, list(HOSTS))
    return lab


@pytest.fixture(scope="module")
def world(lab: Lab) -> dict[str, Pod]:
    web, db = pods.add(lab, "node1"), pods.add(lab, "node3")
    store(lab, "apply", [pod_doc(web, role="web"), pod_doc(db, role="db"), DENY_ALL])
    lab.wait_for(lambda: "deny-all" in json.dumps(table(lab, "node3")) or _isolated(lab), 30,
                 what="the deny-all in node3's table")  # fmt: skip
    return {"web": web, "db": db}


def _isolated(lab: Lab) -> bool:
    return any("default-deny ingress" in i.get("rule", {}).get("comment", "")
               for i in table(lab, "node3")["nftables"])  # fmt: skip


def connect(pod: Pod, ip: str, port: int, timeout: float = 0.5) -> None:
    subprocess.run(["ip", "netns", "exec", pod.netns_name, sys.executable, "-c", CONNECT, ip,
                    str(port), str(timeout)], check=True, cwd="/tmp")  # fmt: skip


def denied(lab: Lab, node: str) -> dict[str, Any]:
    r = lab.fabricctl(["policy", "denied", "--node", node, "-o", "json"])
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def follow(lab: Lab) -> Iterator[queue.Queue[tuple[float, dict[str, Any]]]]:
    """``fabricctl policy denied --follow -o json`` running in node1: (arrival, denial)."""
    argv = ["ip", "netns", "exec", lab.netns("node1"), str(BIN / "fabricctl"),
            "--etcd-endpoints", ",".join(lab.etcd_endpoints), "policy", "denied", "--node",
            "node3", "--follow", "-o", "json"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    got: queue.Queue[tuple[float, dict[str, Any]]] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            got.put((time.monotonic(), json.loads(line)))

    threading.Thread(target=read, daemon=True).start()
    try:
        yield got
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_denied_probe_shows_within_2s(
    lab: Lab, world: dict[str, Pod], follow: queue.Queue[tuple[float, dict[str, Any]]]
) -> None:
    web, db = world["web"], world["db"]
    time.sleep(3.0)  # fabricctl up and watching (its start is not what is measured)
    while not follow.empty():
        follow.get()
    # the probe whose log is timed is one nft denied: its SYN reached node3's default-deny.
    # A fresh pod's first SYN across the racks was lost a few times right after the lab came
    # up (the counter stayed 0, the nflog group was bound): such a probe is sent again
    for _attempt in range(5):
        before = rule_packets(table(lab, "node3"), "default-deny ingress")
        sent = time.monotonic()
        connect(web, db.ip, 81)
        if rule_packets(table(lab, "node3"), "default-deny ingress") > before:
            break
        print("the probe's SYN did not reach node3's default-deny; sending it again")
    else:
        pytest.fail("5 probes from web to db:81: none reached node3's default-deny")
    want = (f"default/{web.name} -> default/{db.name} 81/TCP denied at ingress of "
            f"default/{db.name}: selected by [deny-all], no rule allows it")  # fmt: skip
    while True:
        arrived, d = follow.get(timeout=10)
        if d["port"] == 81:
            break
    latency = arrived - sent
    print(f"denied probe shown by `policy denied --follow` {latency * 1000:.0f} ms after the SYN")
    assert d["line"] == want
    assert d["node"] == "node3" and d["policies"] == ["default/deny-all"]
    assert latency < 2.0
    shown = lab.fabricctl(["policy", "denied", "--node", "node3"])
    assert shown.returncode == 0 and want in shown.stdout
    print(shown.stdout)


def test_scan_stays_bounded_and_metric_counts_what_nft_counted(
    lab: Lab, world: dict[str, Pod]
) -> None:
    web, db = world["web"], world["db"]
    before_doc = denied(lab, "node3")
    before = rule_packets(table(lab, "node3"), "default-deny ingress")
    started = time.monotonic()
    r = subprocess.run(["ip", "netns", "exec", web.netns_name, sys.executable, "-c", FLOOD,
                        web.ip, db.ip, "9", "10000"], capture_output=True, text=True,
                       check=True, cwd="/tmp")  # fmt: skip
    time.sleep(2.0)  # everything logged is published by then (every 0.5 s)
    after_doc = denied(lab, "node3")
    elapsed = time.monotonic() - started
    counted = rule_packets(table(lab, "node3"), "default-deny ingress") - before
    lines = [d for d in after_doc["denials"] if d["port"] == 9]
    (node,) = after_doc["nodes"]
    logged = node["logged"] - sum(n["logged"] for n in before_doc["nodes"])  # none: no doc yet
    bound = BURST + RATE * elapsed
    print(f"10,000 SYNs sent in {float(r.stdout):.2f} s: nft counted {counted}, {logged} "
          f"logged ({len(lines)} shown) in {elapsed:.1f} s, bound {bound:.0f}")  # fmt: skip
    assert counted >= 10_000
    assert 1 <= len(lines) <= logged <= bound

    # the metric: x's deny count is what nft counted, once the counters were read
    def metric() -> int:
        status, body = lab.health("node3", "/metrics")
        m = re.search(r'fabric_policy_packets_total\{direction="ingress",namespace="default",'
                      r'policy="deny-all",verdict="deny"\} (\d+)', body)  # fmt: skip
        return int(m.group(1)) if status == 200 and m else -1

    nft_now = rule_packets(table(lab, "node3"), "default-deny ingress")
    lab.wait_for(lambda: metric() == nft_now, 40, what="the metric to equal nft's counter")
