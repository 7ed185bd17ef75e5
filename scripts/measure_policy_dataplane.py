"""Measure the policy dataplane alone (no etcd, no lab): compile + render + nft for the
policy benchmark's load (lab/bench/policy_load.py: 1,000 policies, 5,000 remote endpoints)
and 250 local pods, in a scratch network namespace this script creates and deletes.

    sudo .venv/bin/python scripts/measure_policy_dataplane.py [--policies N] [--remote N]
        [--local N] [--repeat N] [--backend exec|lib] [--elements netlink|nft]

Prints one JSON object: compile/render seconds; cold write of the whole table through
PolicyTable.sync against ``nft -f`` of the same script alone (floor); the size and time of
the incremental batches a pod ADD, a label change and a policy change (one policy applied
to and deleted from bn-01, like the benchmark's apply samples) make (median of --repeat runs).
CPU seconds of this process are reported next to wall time (the machine may be shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import time
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address

from fabric.dataplane.nft import Nft
from fabric.dataplane.policy_table import PolicyTable, render
from fabric.policy.compiler import compile as compile_policies
from fabric.policy.incremental import IncrementalCompiler
from fabric.policy.model import Endpoint, NamedPort
from fabric.resources.policy_model import Namespace, NetworkPolicy, Pod
from lab import netns as labns
from lab.bench import policy_load as load


def endpoints(n_remote: int, n_local: int, n_ns: int) -> list[Endpoint]:
    out = []
    for k in range(n_remote + n_local):
        local = k >= n_remote
        doc = load.remote_pod(load.ns_name(k % n_ns), k)
        pod = load.decode_all([doc])[0]
        assert isinstance(pod, Pod)
        ips = (IPv4Address(0x0A500000 + k), IPv6Address((0xFD50 << 112) + k))
        out.append(Endpoint(pod.namespace, pod.name, ips, dict(pod.labels),
                            tuple(NamedPort(p.name, p.port, p.protocol) for p in pod.ports),
                            "me" if local else "other",
                            f"fab{k:011x}" if local else None))  # fmt: skip
    return out


async def main(args: argparse.Namespace) -> dict[str, object]:
    n_ns = 20
    objs = load.decode_all(load.namespaces(n_ns) + load.policies(args.policies, n_ns))
    pols = [o for o in objs if isinstance(o, NetworkPolicy)]
    nss = [o for o in objs if isinstance(o, Namespace)]
    eps = endpoints(args.remote, args.local, n_ns)
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = compile_policies(pols, nss, eps, "me")
    t1, c1 = time.perf_counter(), time.process_time()
    desired = render(compiled)
    t2, c2 = time.perf_counter(), time.process_time()
    out: dict[str, object] = {
        "policies": len(pols), "remote": args.remote, "local": args.local,
        "sets": len(desired.sets), "chains": len(desired.chains),
        "elements": sum(len(s.elements) for s in desired.sets.values()),
        "compile_s": round(t1 - t0, 3), "compile_cpu_s": round(c1 - c0, 3),
        "render_s": round(t2 - t1, 3), "render_cpu_s": round(c2 - c1, 3),
    }  # fmt: skip
    ns = f"b1m{secrets.token_hex(2)}"
    floor_ns = ns + "f"
    try:
        labns.add(ns)
        labns.add(floor_ns)
        table = PolicyTable(Nft(ns, backend=args.backend), netlink=args.elements == "netlink")
        t0 = time.perf_counter()
        cold = await table.sync(desired)
        out["program_cold_s"] = round(time.perf_counter() - t0, 3)
        out["cold_script_bytes"] = len(cold.script)
        t0 = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", floor_ns, "nft", "-f", "-"],  # noqa: ASYNC221
                       input=cold.script, text=True, check=True)  # fmt: skip
        out["floor_cold_s"] = round(time.perf_counter() - t0, 3)
        out["cold_ratio"] = round(out["program_cold_s"] / out["floor_cold_s"], 2)  # type: ignore[operator]
        add_s, add_b, lab_s, lab_b, cmp_s, nft_s = [], [], [], [], [], []
        add_cpu: list[tuple[float, float]] = []  # a pod ADD's batch: compile, render CPU
        inc = IncrementalCompiler("me")  # as fabricd's batches compile

        async def batch(now: list[NetworkPolicy]) -> tuple[float, float, float, float, int]:
            """One batch as fabricd runs it: (wall, compile wall, compile CPU, nft wall,
            transaction bytes)."""
            t0, c0 = time.perf_counter(), time.process_time()
            compiled = inc.compile(now, nss, eps)
            cmp_wall, cmp_cpu = time.perf_counter() - t0, time.process_time() - c0
            want = render(compiled)
            t1 = time.perf_counter()
            change = await table.apply(want)
            done = time.perf_counter()
            return done - t0, cmp_wall, cmp_cpu, done - t1, len(change.script)

        inc.compile(pols, nss, eps)
        for i in range(args.repeat):
            # a pod ADD: one more local endpoint (compile + render + apply, as a batch does)
            k = args.remote + args.local + i
            doc = load.remote_pod(load.ns_name(k % n_ns), k)
            pod = load.decode_all([doc])[0]
            assert isinstance(pod, Pod)
            new = Endpoint(pod.namespace, pod.name, (IPv4Address(0x0A500000 + k),), dict(pod.labels),
                           (), "me", f"fab{k:011x}")  # fmt: skip
            eps.append(new)
            t0, c0 = time.perf_counter(), time.process_time()
            compiled = inc.compile(pols, nss, eps)
            c1 = time.process_time()
            want = render(compiled)
            t1 = time.perf_counter()
            add_cpu.append((c1 - c0, time.process_time() - c1))
            change = await table.apply(want)
            add_s.append(time.perf_counter() - t0)
            nft_s.append(time.perf_counter() - t1)
            add_b.append(len(change.script))
            # a label change: a remote pod gains role r0 (enters selector sets)
            j = i * 7 + 1
            eps[j] = replace(eps[j], labels={**eps[j].labels, "role": "r0", "app": "app-0"})
            wall, cmp_wall, _, nft, size = await batch(pols)
            cmp_s.append(cmp_wall)
            lab_s.append(wall)
            nft_s.append(nft)
            lab_b.append(size)
        # a policy change: one policy of a local pod's namespace applied, then deleted (what
        # `lab.bench policy`'s apply samples make the remote node do)
        flip = load.decode_all([{
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": load.ns_name(1), "name": "flip"},
            "spec": {"podSelector": {"matchLabels": {"tier": "web"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                         "kubernetes.io/metadata.name": load.CLIENT_NS}},
                         "podSelector": {"matchLabels": {"role": "idle"}}}],
                         "ports": [{"protocol": "TCP", "port": 80}]}]}}])[0]  # fmt: skip
        assert isinstance(flip, NetworkPolicy)
        pol_s, pol_cmp, pol_nft, pol_b = [], [], [], []
        for i in range(2 * args.repeat):
            wall, _, cpu, nft, size = await batch([*pols, flip] if i % 2 == 0 else pols)
            pol_s.append(wall)
            pol_cmp.append(cpu)
            pol_nft.append(nft)
            pol_b.append(size)
        out["policy_batch_ms_p50"] = round(statistics.median(pol_s) * 1000, 1)
        out["policy_compile_cpu_ms_p50"] = round(statistics.median(pol_cmp) * 1000, 1)
        out["policy_nft_ms_p50"] = round(statistics.median(pol_nft) * 1000, 1)
        out["policy_batch_bytes_p50"] = statistics.median(pol_b)
        out["add_batch_ms_p50"] = round(statistics.median(add_s) * 1000, 1)
        out["add_compile_cpu_ms_p50"] = round(statistics.median(c for c, _ in add_cpu) * 1000, 2)
        out["add_render_cpu_ms_p50"] = round(statistics.median(r for _, r in add_cpu) * 1000, 2)
        out["batch_nft_ms_p50"] = round(statistics.median(nft_s) * 1000, 1)  # table.apply alone
        out["batches_full_delta"] = [inc.full, inc.deltas]
        out["add_batch_bytes_p50"] = statistics.median(add_b)
        out["label_batch_ms_p50"] = round(statistics.median(lab_s) * 1000, 1)
        out["label_compile_ms_p50"] = round(statistics.median(cmp_s) * 1000, 1)
        out["label_batch_bytes_p50"] = statistics.median(lab_b)
        t0 = time.perf_counter()
        resync = await table.sync(render(compile_policies(pols, nss, eps, "me")))
        out["resync_nodrift_s"] = round(time.perf_counter() - t0, 3)
        out["resync_nodrift_bytes"] = len(resync.script)
        out["cpu_s_total"] = round(time.process_time(), 2)
    finally:
        labns.delete(ns)
        labns.delete(floor_ns)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", type=int, default=1000)
    ap.add_argument("--remote", type=int, default=5000)
    ap.add_argument("--local", type=int, default=250)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backend", choices=("exec", "lib"), default="exec",
                    help="how nft runs (fabric.dataplane.nft); fabricd uses lib")  # fmt: skip
    ap.add_argument("--elements", choices=("netlink", "nft"), default="netlink",
                    help="element-only changes as nfnetlink batches (fabricd) or with nft")  # fmt: skip
    print(json.dumps(asyncio.run(main(ap.parse_args()))))
