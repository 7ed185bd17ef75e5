"""IPAM benchmark against a real single etcd with its data on tmpfs.

(a) floor: a bare loop of etcd create-if-absent transactions through the same client stack,
    one round trip each; (b) one node allocating N addresses through the allocator, with CALLERS requests in flight
    at once (pods starting together; coalesced into shared block writes), and again strictly
    one at a time (reported as *_sequential);
(c) eight nodes (processes) allocating concurrently on one pool.
Targets: ratio_1_to_floor >= 0.5, conflicts_per_alloc_8 <= 0.05, duplicates == 0.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ipam.allocator import Allocator
from ipam.batch import BatchingAllocator
from ipam.gc import Maintenance
from ipam.pool import Pool
from ipam.request import AssignRequest
from ipam.resources import Node
from ipam.store import Cmp, Op, Store
from lab.etcd import EtcdCluster
from lab.ipam_load import parse_log, percentile

# Requests in flight on the one node in (b): a kubelet starts pods in parallel.
CALLERS = 8


def progress(msg: str) -> None:
    print(f"[bench ipam] {msg}", file=sys.stderr, flush=True)


async def floor(endpoints: list[str], n: int) -> float:
    async with Store(endpoints, "/bench-floor") as s:
        t = time.monotonic()
        for i in range(n):
            k = f"k/{i}"
            r = await s.txn([Cmp.absent(k)], [Op.put(k, b"x")])
            assert r.succeeded
        return n / (time.monotonic() - t)


async def one_node(endpoints: list[str], n: int, callers: int = 1) -> tuple[float, list[float]]:
    """One node allocating ``n`` addresses; with ``callers`` > 1 that many requests are in
    flight at once (a node starting many pods), coalesced by the BatchingAllocator."""
    async with Store(endpoints, f"/bench-one-{callers}") as s:
        a = Allocator(s)
        batcher = BatchingAllocator(a)
        await a.resources.create_pool(Pool.from_spec("p", {"cidr": "10.128.0.0/14"}))
        await a.resources.put_node(Node("node-1"))
        lat: list[float] = []
        todo = iter(range(n))

        async def caller() -> None:
            for i in todo:
                t1 = time.monotonic()
                req = AssignRequest(f"bench.c{i}.eth0", "node-1")
                await (batcher.assign(req) if callers > 1 else a.auto_assign(req))
                lat.append(time.monotonic() - t1)

        t = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        rate = n / (time.monotonic() - t)
        rep = await Maintenance(a).check()
        assert rep.ips_in_use == n and rep.problems == 0, rep.to_json()
        return rate, lat


async def _pool8(endpoints: list[str]) -> None:
    async with Store(endpoints, "/bench-eight") as s:
        await Allocator(s).resources.create_pool(Pool.from_spec("p", {"cidr": "10.192.0.0/14"}))


async def _count8(endpoints: list[str]) -> int:
    async with Store(endpoints, "/bench-eight") as s:
        return (await Maintenance(Allocator(s)).check()).ips_in_use


def eight_nodes(endpoints: list[str], n: int, tmp: Path) -> dict[str, Any]:
    asyncio.run(_pool8(endpoints))
    per = n // 8
    start_at = time.time() + 1.5  # all workers import first, then start together
    procs = []
    for i in range(8):
        cmd = [sys.executable, "-m", "lab.ipam_load", "--endpoints", ",".join(endpoints),
               "--prefix", "/bench-eight", "--node", f"node-{i}", "--count", str(per),
               "--log", str(tmp / f"n{i}.log"), "--latencies", "--start-at", str(start_at)]  # fmt: skip
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    stats = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise RuntimeError(err.decode()[-2000:])
        stats.append(json.loads(out.decode().strip().splitlines()[-1]))
    total = sum(s["allocs"] for s in stats)
    wall = max(s["elapsed_s"] for s in stats)
    lat = [x for s in stats for x in s["lat_ms"]]
    ips = [ip for i in range(8) for ips in parse_log(tmp / f"n{i}.log")[0].values() for ip in ips]
    in_etcd = asyncio.run(_count8(endpoints))
    return {
        "allocs_per_s_8": round(total / wall, 1),
        "conflicts_per_alloc_8": round(sum(s["conflicts"] for s in stats) / total, 4),
        "p50_ms": round(percentile(lat, 0.5), 3),
        "p99_ms": round(percentile(lat, 0.99), 3),
        "duplicates": len(ips) - len(set(ips)) + abs(in_etcd - len(ips)),
    }


def run(quick: bool = False) -> dict[str, Any]:
    n_floor, n_one, n_eight = (300, 300, 400) if quick else (3000, 5000, 5000)
    with EtcdCluster(size=1) as etcd, tempfile.TemporaryDirectory() as tmp:
        eps = etcd.endpoints
        progress(f"etcd up at {eps[0]} (data on tmpfs); floor: {n_floor} create-if-absent txns")
        f = asyncio.run(floor(eps, n_floor))
        progress(f"floor {f:.0f} txn/s; one node allocating {n_one}, one request at a time")
        seq, lat1 = asyncio.run(one_node(eps, n_one))
        progress(
            f"sequential {seq:.0f} allocs/s; again with {CALLERS} requests in flight (batched)"
        )
        one, latb = asyncio.run(one_node(eps, n_one, CALLERS))
        progress(f"batched {one:.0f} allocs/s; eight nodes allocating {n_eight} together")
        eight = eight_nodes(eps, n_eight, Path(tmp))
    return {
        "bench": "ipam",
        "floor_txn_per_s": round(f, 1),
        "allocs_per_s_1": round(one, 1),
        "ratio_1_to_floor": round(one / f, 3),
        "p50_ms_1": round(percentile(latb, 0.5) * 1000, 3),
        "allocs_per_s_1_sequential": round(seq, 1),
        "ratio_1_sequential_to_floor": round(seq / f, 3),
        "p50_ms_1_sequential": round(percentile(lat1, 0.5) * 1000, 3),
        **eight,
        "quick": quick,
    }
