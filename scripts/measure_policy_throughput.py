"""Measure what the policy table costs a TCP stream: iperf3 from pod a to pod b through a
node namespace (scratch namespaces this script creates and deletes), with b not isolated
("none": the table as fabricd writes it with no policy, so conntrack is on as on any fabric
node; without any ct rule a namespace does no conntrack and is ~27% faster at new
connections), with b isolated and allowed by the last of ``--rules`` rules (established packets skip them), and
the same with ``cutEstablished`` (every packet of the flow walks the chain); and new TCP
connections per second (one at a time, each through the chain) in each mode.

    sudo .venv/bin/python scripts/measure_policy_throughput.py [--rules 200] [--seconds 3]
        [--rounds 2]

Prints one JSON object: Gbit/s per mode (median of the rounds, modes interleaved) and the
ratios to "none". The machine may be shared: compare the ratios, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import statistics
import subprocess
import threading
import time
from ipaddress import IPv4Address

from fabric.dataplane.netlink import in_netns
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


def model(n_rules: int, isolated: bool = True) -> Compiled:
    peers = SetSpec("s4-a", "addr4", frozenset({A}))
    rules = tuple(Rule(f"x/p{i}", 0, Direction.INGRESS, ("s4-a",),
                       (PortMatch(Protocol.TCP, 6000 + i),)) for i in range(n_rules - 1))  # fmt: skip
    rules += (
        Rule(
            "x/allow",
            0,
            Direction.INGRESS,
            ("s4-a",),
            (PortMatch(Protocol.TCP, 5201), PortMatch(Protocol.TCP, 7000)),
        ),
    )
    return Compiled({
        "x/a": EndpointRules("x/a", "fabma", (A,), None, None),
        "x/b": EndpointRules("x/b", "fabmb", (B,),
                             DirectionRules(("x/allow",), rules) if isolated else None, None),
    }, {"s4-a": peers})  # fmt: skip


def iperf(client: str, seconds: int) -> float:
    out = subprocess.run(["ip", "netns", "exec", client, "iperf3", "-c", str(B), "-t",
                          str(seconds), "-J"], capture_output=True, text=True, check=True)  # fmt: skip
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def conn_rate(client: str, seconds: float) -> tuple[float, int]:
    """New TCP connections per second from ``client`` to b:7000, one at a time, and the
    attempts not answered within 1 s."""
    n, failed, end = 0, 0, time.monotonic() + seconds
    while time.monotonic() < end:
        s = in_netns(client, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with s:
            s.settimeout(1.0)
            try:
                s.connect((str(B), 7000))
                n += 1
            except TimeoutError:
                failed += 1
    return n / seconds, failed


def acceptor(ns: str) -> socket.socket:
    srv = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((str(B), 7000))
    srv.listen(512)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv


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
        srv = acceptor(b)
        table = PolicyTable(Nft(node))
        modes = {"none": None, "policy": False, "policy_cut": True}
        got: dict[str, list[float]] = {m: [] for m in modes}
        conns: dict[str, list[float]] = {m: [] for m in modes}
        fails = dict.fromkeys(modes, 0)
        for _ in range(args.rounds):
            for mode, cut in modes.items():
                # "none": the table with b not isolated (conntrack on, as on any fabric node)
                asyncio.run(table.sync(render(model(args.rules, cut is not None), bool(cut))))
                got[mode].append(iperf(a, args.seconds))
                rate, failed = conn_rate(a, args.seconds)
                conns[mode].append(rate)
                fails[mode] += failed
        srv.close()
        med = {m: statistics.median(v) for m, v in got.items()}
        cps = {m: statistics.median(v) for m, v in conns.items()}
        return {"rules": args.rules, **{f"{m}_gbps": round(v, 2) for m, v in med.items()},
                "policy_ratio": round(med["policy"] / med["none"], 3),
                "cut_ratio": round(med["policy_cut"] / med["none"], 3),
                **{f"{m}_conn_per_s": round(v) for m, v in cps.items()},
                "policy_conn_ratio": round(cps["policy"] / cps["none"], 3),
                "cut_conn_ratio": round(cps["policy_cut"] / cps["none"], 3),
                **{f"{m}_conn_failed": v for m, v in fails.items()}}  # fmt: skip
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
