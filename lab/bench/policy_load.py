"""The policy benchmark's load and its floor: synthetic namespaces, NetworkPolicies, remote
endpoints (IPAM allocations on nodes that do not exist, with their Pod objects), and the
floor watcher (``python -m lab.bench.policy_load --floor ...``, run in the remote host's
namespace): on each etcd event under its key it applies the same kind of change fabricd
makes (one set element) with one ``nft -f -``, to a table of its own.

The load is deterministic. Namespace ``bn-<i>`` (label ``team: t<i % 5>``) holds
``per_ns`` policies ``p-<j>``: each selects ``tier: web`` pods and allows ingress from
``role: r<j % 7>`` pods of ``team: t<j % 5>`` namespaces on TCP ``8000 + j``, from an
ipBlock with an except every third policy, and a named port every fifth; every fourth also
restricts egress (to ``app: app-<j % 10>`` and DNS). The last policy of the last namespace
(the benchmark's server lives there) allows pods ``role: client`` of namespace ``bench`` on
TCP 80 and 5201 (iperf3): the destination is selected by every policy of its namespace and
allowed by the last. Namespace ``default`` gets one policy isolating every pod (so the
CNI ADDs of the benchmark compute and program rules).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from typing import Any

from fabric.resources.policy_codec import decode
from fabric.resources.policy_model import PolicyObject
from fabric.resources.policy_store import PolicyStore
from ipam.allocator import Allocator
from ipam.request import AssignRequest
from ipam.store import EventType, Store

CLIENT_NS = "bench"
FLOOR_TABLE = "fabbench_floor"


def ns_name(i: int) -> str:
    return f"bn-{i:02d}"


def namespaces(n_ns: int) -> list[dict[str, Any]]:
    docs = [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": ns_name(i), "labels": {"team": f"t{i % 5}"}}}
            for i in range(n_ns)]  # fmt: skip
    docs.append({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": CLIENT_NS, "labels": {"team": "bench"}}})  # fmt: skip
    return docs


def _netpol(ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}  # fmt: skip


def policies(n: int, n_ns: int) -> list[dict[str, Any]]:
    """``n`` policies over ``n_ns`` namespaces (the last one allows the client), plus the
    isolating policy of ``default``."""
    per_ns = max(1, n // n_ns)
    out = []
    for i in range(n_ns):
        for j in range(per_ns):
            rule: dict[str, Any] = {
                "from": [{"podSelector": {"matchLabels": {"role": f"r{j % 7}"}},
                          "namespaceSelector": {"matchLabels": {"team": f"t{j % 5}"}}}],
                "ports": [{"protocol": "TCP", "port": 8000 + j}],
            }  # fmt: skip
            if j % 3 == 0:
                rule["from"].append({"ipBlock": {"cidr": f"10.{96 + j % 8}.0.0/16",
                                                 "except": [f"10.{96 + j % 8}.{j % 250}.0/24"]}})  # fmt: skip
            if j % 5 == 0:
                rule["ports"].append({"protocol": "TCP", "port": "serve-80-tcp"})
            spec: dict[str, Any] = {"podSelector": {"matchLabels": {"tier": "web"}},
                                    "ingress": [rule], "policyTypes": ["Ingress"]}  # fmt: skip
            if j % 4 == 0:
                spec["egress"] = [
                    {"to": [{"podSelector": {"matchLabels": {"app": f"app-{j % 10}"}}}]},
                    {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                ]
                spec["policyTypes"] = ["Ingress", "Egress"]
            if i == n_ns - 1 and j == per_ns - 1:
                spec = {"podSelector": {"matchLabels": {"tier": "web"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}},
                                               "namespaceSelector": {"matchLabels": {
                                                   "kubernetes.io/metadata.name": CLIENT_NS}}}],
                                     "ports": [{"protocol": "TCP", "port": 80},
                                               {"protocol": "TCP", "port": 5201}]}]}  # fmt: skip
            out.append(_netpol(ns_name(i), f"p-{j:02d}", spec))
    out.append(_netpol("default", "default-isolate",
                       {"podSelector": {}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "monitor"}}}]}]}))  # fmt: skip
    return out


def remote_pod(ns: str, k: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": f"r-{k:05d}",
                         "labels": {"app": f"app-{k % 10}", "role": f"r{k % 7}",
                                    **({"tier": "web"} if k % 2 else {})}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "serve-80-tcp", "containerPort": 80 + k % 3, "protocol": "TCP"}]}]}}  # fmt: skip


def decode_all(docs: list[dict[str, Any]]) -> list[PolicyObject]:
    return [decode(d) for d in docs]


async def apply_docs(endpoints: list[str], prefix: str, docs: list[dict[str, Any]]) -> None:
    async with Store(endpoints, prefix) as s:
        await PolicyStore(s).apply(decode_all(docs))


async def allocate_remote(endpoints: list[str], prefix: str, node: str, first: int, count: int,
                          n_ns: int) -> int:  # fmt: skip
    """``count`` remote endpoints on ``node`` (a node that does not exist): one address each,
    with the attributes a CNI ADD records, spread over the benchmark namespaces."""
    async with Store(endpoints, prefix) as s:
        alloc = Allocator(s)
        for k in range(first, first + count):
            ns = ns_name(k % n_ns)
            attrs = {"network": "fabric", "containerID": f"remote{k:05d}", "ifname": "eth0",
                     "pod": f"r-{k:05d}", "namespace": ns}  # fmt: skip
            await alloc.auto_assign(AssignRequest(f"fabric.remote{k:05d}.eth0", node, 1, 0,
                                                  attrs=attrs))  # fmt: skip
    return count


# ---------------------------------------------------------------------- the floor


def floor_table(client: str, server: str) -> str:
    """The floor's own table: client -> server TCP 80 dropped unless client is in @allowed."""
    return (f"table inet {FLOOR_TABLE} {{\n"
            f"  set allowed {{ type ipv4_addr; }}\n"
            f"  chain forward {{ type filter hook forward priority -10; policy accept;\n"
            f"    ip saddr @allowed accept\n"
            f"    ip saddr {client} ip daddr {server} tcp dport 80 drop\n  }}\n}}\n")  # fmt: skip


async def floor_watch(endpoints: list[str], prefix: str, key: str, client: str) -> None:
    """Watch ``key``; on "allow"/"deny" add or delete the element with one ``nft -f -``."""
    async with Store(endpoints, prefix) as s:
        _, rev = await s.list(key)
        print(json.dumps({"watching": rev}), flush=True)
        async for ev in s.watch(key, rev + 1):
            if ev.type is not EventType.PUT:
                continue
            verb = "add" if ev.kv.value == b"allow" else "delete"
            text = f"{verb} element inet {FLOOR_TABLE} allowed {{ {client} }}\n"
            p = await asyncio.create_subprocess_exec(
                "nft", "-f", "-", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)  # fmt: skip
            _, err = await p.communicate(text.encode())
            if p.returncode != 0:
                print(json.dumps({"error": err.decode()}), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench.policy_load")
    p.add_argument("--floor", action="store_true", required=True)
    p.add_argument("--endpoints", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--client", required=True)
    args = p.parse_args()
    asyncio.run(floor_watch(args.endpoints.split(","), args.prefix, args.key, args.client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
