"""Eight allocator processes (eight nodes) on one pool: no duplicate, nothing lost, check clean.

The workers are real processes (lab/ipam_load.py) against a real etcd; their logs say what
each held at every moment, so after SIGKILLs the test knows exactly what may have leaked.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipam.allocator import Allocator
from ipam.gc import Maintenance
from ipam.pool import Pool
from ipam.resources import Node
from ipam.store import Store
from lab.etcd import EtcdCluster
from lab.ipam_load import parse_log

pytestmark = [pytest.mark.etcd, pytest.mark.slow]

NODES = 8
TOTAL = 20_000


async def _setup(endpoints: list[str], prefix: str) -> None:
    async with Store(endpoints, prefix) as s:
        a = Allocator(s)
        await a.resources.create_pool(Pool.from_spec("load", {"cidr": "10.64.0.0/16"}))
        for i in range(NODES):
            await a.resources.put_node(Node(f"n{i}"))


def spawn(
    endpoints: list[str], prefix: str, node: int, count: int, start: int, log: Path
) -> subprocess.Popen[bytes]:
    eps = endpoints[node % len(endpoints) :] + endpoints[: node % len(endpoints)]
    cmd = [sys.executable, "-m", "lab.ipam_load", "--endpoints", ",".join(eps), "--prefix", prefix,
           "--node", f"n{node}", "--count", str(count), "--start", str(start), "--release-ratio", "0.5",
           "--log", str(log), "--seed", str(node * 1000 + start), "--deadline", "60"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen[bytes]) -> dict[str, object]:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err.decode()[-3000:]
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def _verify(
    endpoints: list[str], prefix: str, logs: dict[int, Path], killed_inflight: set[str]
) -> dict[str, int]:
    """Compare etcd with the workers' logs; GC what leaked; return counts."""
    live: dict[str, dict[str, set[str]]] = {}
    uncertain: dict[str, set[str]] = {}  # releases cut short by a kill
    anomalies: list[str] = []
    for i, path in logs.items():
        held, _, bad, releasing = parse_log(path)
        live[f"n{i}"] = held
        uncertain.update(releasing)
        anomalies += bad
    assert anomalies == []
    async with Store(endpoints, prefix) as s:
        a = Allocator(s)
        m = Maintenance(a)
        live_sets = {n: set(h) | set(uncertain) for n, h in live.items()}
        rep = await m.check(live=live_sets)
        leaked = {e["handle"] for e in rep.leaked}
        assert leaked <= killed_inflight, f"leaks that no kill explains: {leaked - killed_inflight}"
        others = rep.to_json()
        others = {
            k: v
            for k, v in others.items()
            if isinstance(v, list) and v and k not in ("leaked", "stuckAffinities")
        }
        assert others == {}, others
        # Zero duplicates, zero lost: etcd holds exactly what every live handle was given.
        blocks, _ = await a.blocks.list_blocks()
        owner_of: dict[str, str] = {}
        for _, blk in blocks.values():
            for o, attr in blk.allocated():
                owner_of[str(blk.ip(o))] = attr.handle
        held_ips = [ip for per_node in live.values() for ips in per_node.values() for ip in ips]
        assert len(held_ips) == len(set(held_ips)), "an address is held by two live handles"
        for per_node in live.values():
            for handle, ips in per_node.items():
                for ip in ips:
                    assert owner_of.get(ip) == handle, (
                        f"{handle} lost {ip} (etcd: {owner_of.get(ip)})"
                    )
        kept = 0
        for handle, ips in uncertain.items():
            still = {ip for ip, h in owner_of.items() if h == handle}
            assert still in (set(), ips), f"{handle}: half released ({still} of {ips})"
            kept += len(still)
        for node, handles in live_sets.items():
            await m.gc_node(node, handles)
        after = await m.check(live=live_sets)
        assert after.problems == 0, after.to_json()
        return {"leaked": len(leaked), "in_use": after.ips_in_use, "live": len(held_ips) + kept}


def run_load(endpoints: list[str], prefix: str, tmp: Path, kill: bool = False,
             cluster: EtcdCluster | None = None) -> dict[str, int]:  # fmt: skip
    asyncio.run(_setup(endpoints, prefix))
    per = TOTAL // NODES
    logs = {i: tmp / f"n{i}.log" for i in range(NODES)}
    procs = {i: spawn(endpoints, prefix, i, per, 0, logs[i]) for i in range(NODES)}
    killed_inflight: set[str] = set()
    kills = 0
    rng = random.Random(7)
    t0 = time.monotonic()
    leader_killed = False
    try:
        while procs:
            time.sleep(0.25)
            if cluster is not None and not leader_killed and time.monotonic() - t0 > 4:
                leader = cluster.leader()
                assert leader is not None
                leader.kill()
                leader_killed = True
            for i, p in list(procs.items()):
                if kill and p.poll() is None and rng.random() < 0.04:
                    p.kill()
                    p.communicate()
                    kills += 1
                    held, inflight, _, _ = parse_log(logs[i])
                    killed_inflight |= inflight
                    done = (
                        len(logs[i].read_text().splitlines()) if logs[i].exists() else 0
                    )  # enough to move past used indices
                    procs[i] = spawn(
                        endpoints,
                        prefix,
                        i,
                        max(0, per - len(held)) // 2 + 1,
                        100_000 * kills + done,
                        logs[i],
                    )
                    continue
                if p.poll() is not None:
                    stats = finish(p)
                    assert stats["anomalies"] == 0
                    del procs[i]
    finally:
        for p in procs.values():  # only after a failure: stop what is left, by PID
            p.kill()
            p.communicate()
    result = asyncio.run(_verify(endpoints, prefix, logs, killed_inflight))
    result["kills"] = kills
    if kill:
        assert kills > 0
    return result


def test_eight_nodes_twenty_thousand_allocations(
    etcd_endpoints: list[str], prefix: str, tmp_path: Path
) -> None:
    r = run_load(etcd_endpoints, prefix, tmp_path)
    assert r["leaked"] == 0
    assert r["in_use"] == r["live"] > 0


def test_eight_nodes_with_sigkills_gc_repairs(
    etcd_endpoints: list[str], prefix: str, tmp_path: Path
) -> None:
    r = run_load(etcd_endpoints, prefix, tmp_path, kill=True)
    assert r["in_use"] == r["live"]


@pytest.mark.cluster
def test_eight_nodes_on_three_member_etcd_leader_killed(tmp_path: Path) -> None:
    with EtcdCluster(size=3) as cluster:
        r = run_load(cluster.endpoints, "/fabric-failover", tmp_path, cluster=cluster)
    assert r["leaked"] == 0
    assert r["in_use"] == r["live"] > 0
