"""Measure what the policy table costs a TCP stream: iperf3 from pod a to pod b through a
node namespace (scratch namespaces this script creates and deletes), with no table, with
b isolated and allowed by the last of ``--rules`` rules (established packets skip them), and
the same with ``cutEstablished`` (every packet of the flow walks the chain).

    sudo .venv/bin/python scripts/measure_policy_throughput.py [--rules 200] [--seconds 3]
        [--rounds 2]

Prints one JSON object: Gbit/s per mode (median of the rounds, modes interleaved) and the
ratios to no table. The machine may be shared: compare the ratios, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import subprocess
import time
from ipaddress import IPv4Address

from fabric.dataplane.nft import Nft
from fabric.dataplane.policy_table import PolicyTable, render
from fabric.policy.model import (
    Compiled,
    Direction,
    DirectionRules,
    EndpointRules,
    PortMatch,
    Protocol,
    Rule,
    SetSpec,
)
from lab import netns as labns

A, B = IPv4Address("10.82.0.10"), IPv4Address("10.82.0.11")


def model(n_rules: int) -> Compiled:
    peers = SetSpec("s4-a", "addr4", frozenset({A}))
    rules = tuple(Rule(f"x/p{i}", 0, Direction.INGRESS, ("s4-a",),
                       (PortMatch(Protocol.TCP, 6000 + i),)) for i in range(n_rules - 1))  # fmt: skip
    rules += (Rule("x/allow", 0, Direction.INGRESS, ("s4-a",), (PortMatch(Protocol.TCP, 5201),)),)
    return Compiled({
        "x/a": EndpointRules("x/a", "fabma", (A,), None, None),
        "x/b": EndpointRules("x/b", "fabmb", (B,), DirectionRules(("x/allow",), rules), None),
    }, {"s4-a": peers})  # fmt: skip


def iperf(client: str, seconds: int) -> float:
    out = subprocess.run(["ip", "netns", "exec", client, "iperf3", "-c", str(B), "-t",
                          str(seconds), "-J"], capture_output=True, text=True, check=True)  # fmt: skip
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def main(args: argparse.Namespace) -> dict[str, object]:
    tag = secrets.token_hex(2)
    node, a, b = f"b1t{tag}n", f"b1t{tag}a", f"b1t{tag}b"
    server = None
    try:
        for ns in (node, a, b):
            labns.add(ns)
            labns.batch(ns, ["link set lo up"])
        labns.sysctls(node, {"net.ipv4.ip_forward": "1"})
        for ns, host, ip in ((a, "fabma", A), (b, "fabmb", B)):
            labns.batch(node, [labns.veth_command(node, host, ns, "eth0"),
                               f"link set {host} up", f"route add {ip}/32 dev {host}"])  # fmt: skip
            labns.sysctls(node, {f"net.ipv4.conf.{host}.proxy_arp": "1"})
            labns.batch(ns, ["link set eth0 up", f"addr add {ip}/32 dev eth0",
                             "route add 169.254.1.1 dev eth0",
                             "route add default via 169.254.1.1"])  # fmt: skip
        labns.batch(node, ["addr add 169.254.1.1/32 dev lo"])
        server = subprocess.Popen(["ip", "netns", "exec", b, "iperf3", "-s"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5)
        table = PolicyTable(Nft(node))
        modes = {"none": None, "policy": False, "policy_cut": True}
        got: dict[str, list[float]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for mode, cut in modes.items():
                if cut is None:
                    asyncio.run(table.remove())
                else:
                    asyncio.run(table.sync(render(model(args.rules), cut)))
                got[mode].append(iperf(a, args.seconds))
        med = {m: statistics.median(v) for m, v in got.items()}
        return {"rules": args.rules, **{f"{m}_gbps": round(v, 2) for m, v in med.items()},
                "policy_ratio": round(med["policy"] / med["none"], 3),
                "cut_ratio": round(med["policy_cut"] / med["none"], 3)}  # fmt: skip
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in (a, b, node):
            labns.delete(ns)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    print(json.dumps(main(ap.parse_args())))
