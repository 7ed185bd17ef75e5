"""CNI verbs racing each other in fabricd, on the real dataplane: a node namespace (where
fabricd's host ends and host routes live), a pod namespace, a real etcd, the real
``Dataplane`` and ``RouteTable``. Namespaces are ``tcr`` + 4 hex digits, deleted at the end.

Addresses: 10.78.0.0/24 only (node uplink 10.78.0.254/32).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fabric.dataplane import attachment as dp
from fabric.dataplane.pods import Dataplane
from fabric.dataplane.route_table import RouteTable
from fabric.workloads.deps import Deps
from fabric.workloads.pod_ipam import PodIPAM
from fabric.workloads.server import answer
from fabric.workloads.state import Phase, StateDir
from fabric.workloads.verbs import Workloads
from ipam.allocator import Allocator
from ipam.batch import BatchingAllocator
from ipam.pool import Pool
from ipam.resources import Node
from ipam.store import Store
from lab import netns as labns

pytestmark = [pytest.mark.etcd, pytest.mark.root]
NODE = "n1"
PROTO = 199
HANDLE = "net.c1.eth0"
ROUNDS = 8


@pytest.fixture
def spaces() -> Iterator[tuple[str, str]]:
    """(node namespace, pod namespace path)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces)")
    node, pod = f"tcr{secrets.token_hex(2)}", f"tcr{secrets.token_hex(2)}"
    made: list[str] = []
    try:
        for name in (node, pod):
            labns.add(name)
            made.append(name)
        labns.batch(node, [
            "link set lo up",
            "link add up0 type veth peer name up1",
            "link set up0 up",
            "link set up1 up",
            "addr add 10.78.0.254/32 dev up0",
        ])  # fmt: skip
        yield node, f"/run/netns/{pod}"
    finally:
        for name in made:
            labns.delete(name)


@dataclass
class Node1:
    w: Workloads
    alloc: Allocator
    node: str
    pod: str
    state: Path

    async def call(self, verb: str, **conf: Any) -> tuple[int, Any]:
        env = {"CNI_COMMAND": verb, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0",
               "CNI_NETNS": self.pod, "CNI_PATH": "/opt/cni/bin"}  # fmt: skip
        doc = {"cniVersion": "1.1.0", "name": "net", "type": "fabric", **conf}
        code, out = await answer(self.w, lambda *_: None, env, json.dumps(doc).encode(), 0)
        return code, json.loads(out) if out else None

    async def gc(self) -> tuple[int, Any]:
        return await self.call("GC", **{"cni.dev/valid-attachments": []})

    async def consistent(self) -> bool:
        """Either the whole attachment is there (record ready, addresses held, host end,
        host route in the kernel) or nothing of it is. Returns whether it is there."""
        rec = self.w.records.get(HANDLE)
        held = sorted(str(a.ip) for a in await self.alloc.ips_by_handle(HANDLE))
        host = dp.host_ifname("c1", "eth0")
        link, routes = await asyncio.to_thread(kernel, self.node, host)
        files = sorted(p.name for p in self.state.iterdir()) if self.state.exists() else []
        if rec is None:
            assert (held, link, routes.strip(), files) == ([], False, "", []), (
                f"half-removed attachment: held {held}, link {link}, routes {routes!r}, {files}"
            )
            return False
        assert rec.phase is Phase.READY, rec
        want = sorted(str(i.ip) for i in rec.ips)
        assert held == want and link and files == [f"{HANDLE}.json"], (held, want, link, files)
        assert all(f"{ip} dev {host}" in routes for ip in want), routes
        return True


def kernel(node: str, host: str) -> tuple[bool, str]:
    """Whether ``host`` exists in ``node``, and ``node``'s routes of protocol PROTO."""
    link = subprocess.run(["ip", "-n", node, "link", "show", host],
                          capture_output=True, check=False).returncode == 0  # fmt: skip
    routes = subprocess.check_output(["ip", "-n", node, "route", "show", "proto", str(PROTO)],
                                     text=True)  # fmt: skip
    return link, routes


@asynccontextmanager
async def node1(endpoints: list[str], prefix: str, node: str, pod: str,
                state: Path) -> AsyncIterator[Node1]:  # fmt: skip
    async with Store(endpoints, prefix, deadline=2.0) as store:
        alloc = Allocator(store)
        await alloc.resources.create_pool(
            Pool.from_spec("pods", {"cidr": "10.78.0.0/25", "blockSize": 28}))  # fmt: skip
        await alloc.resources.put_node(Node(NODE))
        plane, routes = Dataplane(netns=node), RouteTable(PROTO, netns=node)

        async def datastore_ok() -> bool:
            return True

        ipam = PodIPAM(alloc, BatchingAllocator(alloc), NODE)
        w = Workloads(Deps(NODE, ipam, plane, routes, StateDir(state), datastore_ok))
        await w.recover()
        try:
            yield Node1(w, alloc, node, pod, state)
        finally:
            await plane.close()
            routes.close()


def test_gc_and_del_of_the_same_attachment_race(
    spaces: tuple[str, str], etcd_endpoints: list[str], prefix: str, tmp_path: Path
) -> None:
    """Issue 16: GC tore a stale attachment down without the attachment's lock, so a DEL (or
    an ADD reusing the container ID) arriving meanwhile raced it. Each round both verbs
    succeed and the attachment is either whole or entirely gone, never half."""
    node, pod = spaces

    async def go() -> None:
        async with node1(etcd_endpoints, prefix, node, pod, tmp_path / "state") as n:
            for _ in range(ROUNDS):
                code, res = await n.call("ADD")
                assert code == 0, res
                got = await asyncio.gather(n.gc(), n.call("DEL"))
                assert list(got) == [(0, None), (0, None)], got
                assert not await n.consistent()
            there = 0
            for _ in range(ROUNDS):
                code, res = await n.call("ADD")
                assert code == 0, res
                (gc_code, gc_err), (add_code, add_res) = await asyncio.gather(n.gc(), n.call("ADD"))
                assert (gc_code, add_code) == (0, 0), (gc_err, add_res)
                if await n.consistent():  # the ADD came last: its answer is what is there
                    there += 1
                    held = [str(a.ip) for a in await n.alloc.ips_by_handle(HANDLE)]
                    assert [i["address"].split("/")[0] for i in add_res["ips"]] == held
                    assert await n.call("DEL") == (0, None)
                assert not await n.consistent()

    asyncio.run(go())
