"""Helpers for the lab tests of the running fabric: allocate addresses on a node through the
IPAM library (the CNI plugin does this through fabricd; these tests exercise BGP and
routes, not the plugin), read blocks, routes and status documents."""

from __future__ import annotations

import ipaddress
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lab.runner import Lab

ALLOC = """
import asyncio, json, sys
from ipam.allocator import Allocator
from ipam.request import AssignRequest
from ipam.store import Store
async def main(eps, node, handle, v4, v6, pool):
    async with Store(eps.split(','), '/fabric/v1') as s:
        got = await Allocator(s).auto_assign(AssignRequest(handle, node, num_v4=int(v4),
            num_v6=int(v6), attrs={'pod': handle, 'namespace': 'test'},
            pools_v4=(pool,) if pool else ()))
        print(json.dumps([[str(a.ip), str(a.block)] for a in got]))
asyncio.run(main(*sys.argv[1:]))
"""


def fabric_lab(make_lab: Callable[[str], Lab], topology: str = "two-rack") -> Lab:
    """``topology`` up, every router's BGP sessions Established, fabricd on every host."""
    lab = make_lab(topology)
    for r in (*lab.nodes("frr"), *lab.nodes("bird")):
        lab.wait_for(lambda r=r: lab.established(r), 30, what=f"BGP sessions of {r}")
    lab.start_fabric()
    return lab


def allocate(
    lab: Lab, node: str, handle: str, v4: int = 1, v6: int = 0, pool: str = ""
) -> list[tuple[str, str]]:
    """Allocate addresses for ``handle`` on ``node`` (from IPv4 pool ``pool`` if given):
    [(ip, block)]."""
    eps = ",".join(lab.etcd_endpoints)
    argv = [sys.executable, "-c", ALLOC, eps, node, handle, str(v4), str(v6), pool]
    r = lab.exec(node, argv, 60, True)
    return [(ip, block) for ip, block in json.loads(r.stdout)]


def status(lab: Lab, node: str) -> dict[str, Any]:
    r = lab.fabricctl(["bgp", "status", "--node", node, "-o", "json"])
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)
    if isinstance(docs, list):
        docs = docs[0] if docs else {}
    return dict(docs)


def route_via(lab: Lab, node: str, prefix: str) -> str | None:
    """The rest of ``ip route`` for ``prefix`` installed by fabricd on ``node``, or None."""
    return lab.kernel_routes(node).get(prefix)


def in_net(ip: str, net: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(net)


@contextmanager
def watching(check: Callable[[], bool], interval: float = 0.1) -> Iterator[list[float]]:
    """Run ``check`` every ``interval`` s in the background; yields the times it failed."""
    failures: list[float] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                ok = check()
            except Exception:
                ok = False
            if not ok:
                failures.append(time.monotonic())
            stop.wait(interval)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield failures
    finally:
        stop.set()
        t.join()
