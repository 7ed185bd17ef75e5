"""``python -m lab.bench netlink``: fabric's hand-written rtnetlink codec against pyroute2.

The guard of docs/adr/0002-netlink.md. In a throwaway namespace (``bnl`` + 4 hex digits,
addresses 10.76.0.0/16 only), the same work is done both ways, in the same run:

- routes: N host routes ``10.76.x.y/32 via 10.76.0.2`` written (replace) and deleted again,
  fabric batched (``RouteSocket.write``, 10,000 per send, as fabricd) and pyroute2 one call
  per route (``IPRoute.route("replace"/"del", ...)``; 0.9.7 has no batch encoder);
- link messages: M times one ``set link up`` round trip (fabric ``LinkSocket.apply`` of one
  request, pyroute2 ``IPRoute.link("set", ...)``), and M veth pairs created and deleted (two
  messages each).

Reports routes/s and ms per link message for both, CPU seconds of this process, and the
ratios (fabric against pyroute2). Target: fabric's route writes stay at least 5x pyroute2's;
a pyroute2 release that comes within that is the signal to reconsider the hand codec.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from contextlib import closing
from typing import Any

from fabric.dataplane.netlink import KernelRoute, RouteOp, RouteSocket, iproute
from fabric.dataplane.netlink.links import LinkSocket, delete_request, up_request, veth_request
from lab import netns as labns

PROTO = 199
ROUTES, QUICK_ROUTES = 20_000, 500
LINK_MSGS, QUICK_LINK_MSGS = 400, 40
GATEWAY = "10.76.0.2"


def progress(msg: str) -> None:
    print(f"[bench netlink] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of ``fn()``."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def dsts(n: int) -> list[ipaddress.IPv4Network]:
    base = int(ipaddress.IPv4Address("10.76.128.0"))
    return [ipaddress.IPv4Network((base + i, 32)) for i in range(n)]


def routes_fabric(ns: str, nets: list[ipaddress.IPv4Network]) -> dict[str, float]:
    gw = (ipaddress.IPv4Address(GATEWAY),)
    adds = [RouteOp(KernelRoute(d, gw)) for d in nets]
    dels = [RouteOp(KernelRoute(d, gw), delete=True) for d in nets]
    with closing(RouteSocket(ns)) as sock:
        w_add, c_add = timed(lambda: sock.write(adds, PROTO, batch=10_000))
        w_del, c_del = timed(lambda: sock.write(dels, PROTO, batch=10_000))
    return {"add_s": w_add, "add_cpu_s": c_add, "del_s": w_del, "del_cpu_s": c_del}


def routes_pyroute2(ns: str, nets: list[ipaddress.IPv4Network]) -> dict[str, float]:
    with iproute(ns) as ipr:

        def write(cmd: str) -> None:
            for d in nets:
                ipr.route(cmd, dst=str(d), gateway=GATEWAY, proto=PROTO, table=254)

        w_add, c_add = timed(lambda: write("replace"))
        w_del, c_del = timed(lambda: write("del"))
    return {"add_s": w_add, "add_cpu_s": c_add, "del_s": w_del, "del_cpu_s": c_del}


def links_fabric(ns: str, m: int) -> dict[str, float]:
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        with closing(LinkSocket(ns)) as sock:
            index = sock.link_indexes()["v0"]
            w_up, c_up = timed(lambda: [sock.apply([up_request(index, "v0")]) for _ in range(m)])

            def churn() -> None:
                for i in range(m):
                    sock.apply([veth_request(f"bf{i}", "02:00:00:76:00:01", 1500, f"bp{i}",
                                             "02:00:00:76:00:02", fd)])  # fmt: skip
                    sock.apply([delete_request(f"bf{i}")])

            w_veth, c_veth = timed(churn)
    finally:
        os.close(fd)
    return {"up_s": w_up, "up_cpu_s": c_up, "veth_s": w_veth, "veth_cpu_s": c_veth}


def links_pyroute2(ns: str, m: int) -> dict[str, float]:
    with iproute(ns) as ipr:
        index = ipr.link_lookup(ifname="v0")[0]
        w_up, c_up = timed(lambda: [ipr.link("set", index=index, state="up") for _ in range(m)])

        def churn() -> None:
            for i in range(m):
                ipr.link("add", ifname=f"bq{i}", kind="veth", peer=f"br{i}", mtu=1500)
                ipr.link("del", ifname=f"bq{i}")

        w_veth, c_veth = timed(churn)
    return {"up_s": w_up, "up_cpu_s": c_up, "veth_s": w_veth, "veth_cpu_s": c_veth}


def run(quick: bool = False) -> dict[str, Any]:
    n, m = (QUICK_ROUTES, QUICK_LINK_MSGS) if quick else (ROUTES, LINK_MSGS)
    ns = f"bnl{secrets.token_hex(2)}"
    labns.add(ns)
    try:
        labns.batch(ns, ["link set lo up", "link add v0 type veth peer name v1",
                         "link set v0 up", "link set v1 up", "addr add 10.76.0.1/16 dev v0"])  # fmt: skip
        nets = dsts(n)
        progress(f"{n} routes, fabric then pyroute2")
        fab_r, pr_r = routes_fabric(ns, nets), routes_pyroute2(ns, nets)
        progress(f"{m} link-up messages and {m} veth pairs, fabric then pyroute2")
        fab_l, pr_l = links_fabric(ns, m), links_pyroute2(ns, m)
    finally:
        labns.delete(ns)
    detail = {"routes": {"fabric": fab_r, "pyroute2": pr_r}, "links": {"fabric": fab_l,
              "pyroute2": pr_l}}  # fmt: skip
    print(json.dumps(detail), flush=True)

    def ms_per_msg(r: dict[str, float]) -> float:  # veth churn: two messages per pair
        return round(1000 * (r["up_s"] + r["veth_s"]) / (3 * m), 4)

    fab_rate = n / fab_r["add_s"]
    pr_rate = n / pr_r["add_s"]
    return {
        "bench": "netlink",
        "n": n,
        "link_messages": 3 * m,
        "fabric_routes_per_s": round(fab_rate),
        "pyroute2_routes_per_s": round(pr_rate),
        "fabric_withdraw_per_s": round(n / fab_r["del_s"]),
        "pyroute2_withdraw_per_s": round(n / pr_r["del_s"]),
        "routes_ratio": round(fab_rate / pr_rate, 2),
        "fabric_route_cpu_us": round(1e6 * fab_r["add_cpu_s"] / n, 2),
        "pyroute2_route_cpu_us": round(1e6 * pr_r["add_cpu_s"] / n, 2),
        "fabric_link_msg_ms": ms_per_msg(fab_l),
        "pyroute2_link_msg_ms": ms_per_msg(pr_l),
        "pyroute2_up_msg_ms": round(1000 * pr_l["up_s"] / m, 4),
        "fabric_up_msg_ms": round(1000 * fab_l["up_s"] / m, 4),
        "fabric_up_msg_cpu_ms": round(1000 * fab_l["up_cpu_s"] / m, 4),
        "pyroute2_up_msg_cpu_ms": round(1000 * pr_l["up_cpu_s"] / m, 4),
        "fabric_veth_msg_cpu_ms": round(1000 * fab_l["veth_cpu_s"] / (2 * m), 4),
        "pyroute2_veth_msg_cpu_ms": round(1000 * pr_l["veth_cpu_s"] / (2 * m), 4),
        "links_ratio": round(ms_per_msg(pr_l) / ms_per_msg(fab_l), 2),
    }
