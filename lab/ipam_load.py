"""An IPAM load worker: one node allocating and randomly releasing, logging every step.

Run as a process (``python -m lab.ipam_load ...``) by the concurrency tests and the ipam
benchmark, several at once, one per simulated node. The log (one line per event, flushed
before the next step, so it survives SIGKILL) lets the caller know exactly what the worker
held when it died:

    ? <handle>           about to assign (in flight)
    + <handle> <ip>...   assigned
    - <handle>           released
    ~ <handle>           about to release (in flight)
    ! <handle> <reason>  anomaly: a release freed other addresses than the ones assigned

The last line on stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

from ipam.allocator import Allocator
from ipam.request import AssignRequest
from ipam.store import Store


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    store = Store(args.endpoints.split(","), args.prefix, deadline=args.deadline)
    alloc = Allocator(store)
    log = Path(args.log).open("a", buffering=1) if args.log else None  # noqa: ASYNC230, SIM115
    held: dict[str, set[str]] = {}
    lat: list[float] = []
    releases = anomalies = 0

    def note(line: str) -> None:
        if log:
            log.write(line + "\n")
            log.flush()

    t0 = time.monotonic()
    try:
        for i in range(args.start, args.start + args.count):
            handle = f"load.{args.node}.{i}.eth0"
            note(f"? {handle}")
            t = time.monotonic()
            got = await alloc.auto_assign(AssignRequest(handle, args.node, 1, args.v6))
            lat.append(time.monotonic() - t)
            held[handle] = {str(a.ip) for a in got}
            note(f"+ {handle} {' '.join(sorted(held[handle]))}")
            if held and rng.random() < args.release_ratio:
                victim = rng.choice(sorted(held))
                note(f"~ {victim}")
                freed = {str(ip) for ip in await alloc.release_handle(victim)}
                # An empty answer is fine when the handle is gone: a transaction retried on
                # another member during an etcd failover may find its first attempt applied.
                if freed != held[victim] and (freed or await alloc.ips_by_handle(victim)):
                    anomalies += 1
                    note(
                        f"! {victim} assigned {sorted(held[victim])} but release freed {sorted(freed)}"
                    )
                del held[victim]
                releases += 1
                note(f"- {victim}")
    finally:
        await store.close()
        if log:
            log.close()
    elapsed = time.monotonic() - t0
    return {
        "node": args.node,
        "allocs": len(lat),
        "releases": releases,
        "anomalies": anomalies,
        "conflicts": alloc.conflicts,
        "elapsed_s": round(elapsed, 3),
        "p50_ms": round(percentile(lat, 0.5) * 1000, 3),
        "p99_ms": round(percentile(lat, 0.99) * 1000, 3),
        "lat_ms": [round(x * 1000, 3) for x in lat] if args.latencies else [],
    }


def parse_log(path: Path) -> tuple[dict[str, set[str]], set[str], list[str], dict[str, set[str]]]:
    """From a worker log: live handle -> IPs, handles whose assignment was in flight at the
    end, anomaly lines, and handles whose release was in flight (released or not: unknown)."""
    live: dict[str, set[str]] = {}
    inflight: set[str] = set()
    releasing: dict[str, set[str]] = {}
    anomalies: list[str] = []
    text = path.read_text() if path.exists() else ""  # killed before it wrote anything
    for line in text.splitlines():
        op, _, rest = line.partition(" ")
        parts = rest.split()
        if not parts:
            continue  # a line cut short by SIGKILL
        if op == "?":
            inflight.add(parts[0])
        elif op == "+":
            inflight.discard(parts[0])
            live[parts[0]] = set(parts[1:])
        elif op == "~":
            releasing[parts[0]] = live.pop(parts[0], set())
        elif op == "-":
            live.pop(parts[0], None)
            releasing.pop(parts[0], None)
        elif op == "!":
            anomalies.append(rest)
    return live, inflight, anomalies, releasing


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoints", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--start", type=int, default=0, help="first handle index")
    p.add_argument("--release-ratio", type=float, default=0.0)
    p.add_argument("--v6", type=int, default=0, help="IPv6 addresses per handle too")
    p.add_argument("--log", default="")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=30.0)
    p.add_argument("--latencies", action="store_true")
    p.add_argument("--start-at", type=float, default=0.0, help="time.time() to start at")
    args = p.parse_args()
    if args.start_at:
        time.sleep(max(0.0, args.start_at - time.time()))
    print(json.dumps(asyncio.run(run(args))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
