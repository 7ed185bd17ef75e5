"""Measure what reading ``fabric_policy_packets_total`` costs at the policy benchmark's load
(lab/bench/policy_load.py: 1,000 policies, 5,000 remote endpoints, 250 local pods), in a
scratch network namespace this script creates and deletes:

    sudo .venv/bin/python scripts/measure_policy_counters.py [--policies N] [--repeat N]

Programs the table (with the denied-traffic log) once, then per repeat: one listing (wall
time, nft's CPU from RUSAGE_CHILDREN, size) and ``policy_samples`` over it (this process's
CPU), for the terse text listing fabricd reads (``text``) and the JSON one (``json``, what
``Nft.list_table`` reads). Prints one JSON object with medians. fabricd does this at each
scrape of /metrics (fabric/agent/diagnostics.py); the machine may be shared: CPU seconds are
what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import secrets
import statistics
import subprocess
import time

from measure_policy_dataplane import endpoints  # type: ignore[import-not-found]

from fabric.agent.policy_metrics import listing_rows, policy_samples, text_rows
from fabric.dataplane.nft import Nft, parse_listing
from fabric.dataplane.policy_log import DeniedLog
from fabric.dataplane.policy_table import PolicyTable, render
from fabric.policy.compiler import compile as compile_policies
from fabric.resources.policy_model import Namespace, NetworkPolicy
from lab import netns as labns
from lab.bench import policy_load as load


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def main(args: argparse.Namespace) -> dict[str, object]:
    n_ns = 20
    objs = load.decode_all(load.namespaces(n_ns) + load.policies(args.policies, n_ns))
    pols = [o for o in objs if isinstance(o, NetworkPolicy)]
    nss = [o for o in objs if isinstance(o, Namespace)]
    compiled = compile_policies(pols, nss, endpoints(args.remote, args.local, n_ns), "me")
    desired = render(compiled, log=DeniedLog(4242))
    ns = f"b1c{secrets.token_hex(2)}"
    out: dict[str, object] = {"policies": len(pols), "remote": args.remote, "local": args.local,
                              "chains": len(desired.chains),
                              "rules": sum(len(c.rules) for c in desired.chains.values())}  # fmt: skip
    try:
        labns.add(ns)
        await PolicyTable(Nft(ns)).sync(desired)
        for kind, args_, rows in (
            ("text", ["-t", "list", "table"], text_rows),
            ("json", ["-j", "list", "table"],
             lambda t: listing_rows(parse_listing(json.loads(t)))),
        ):  # fmt: skip
            wall, nft_cpu, py_cpu, size, series = [], [], [], 0, 0
            for _ in range(args.repeat):
                c0, t0 = children_cpu(), time.perf_counter()
                text = subprocess.run(["ip", "netns", "exec", ns, "nft", *args_, "inet",  # noqa: ASYNC221
                                       "fabric_filter"], capture_output=True, text=True,
                                      check=True).stdout  # fmt: skip
                wall.append(time.perf_counter() - t0)
                nft_cpu.append(children_cpu() - c0)
                p0 = time.process_time()
                samples = policy_samples(rows(text), compiled)
                py_cpu.append(time.process_time() - p0)
                size, series = len(text), len(samples)
            out[kind] = {"list_wall_ms_p50": round(statistics.median(wall) * 1000, 1),
                         "list_nft_cpu_ms_p50": round(statistics.median(nft_cpu) * 1000, 1),
                         "samples_cpu_ms_p50": round(statistics.median(py_cpu) * 1000, 1),
                         "listing_bytes": size, "series": series}  # fmt: skip
    finally:
        labns.delete(ns)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--remote", type=int, default=5000)
    ap.add_argument("--local", type=int, default=250)
    ap.add_argument("--repeat", type=int, default=5)
    print(json.dumps(asyncio.run(main(ap.parse_args()))))
