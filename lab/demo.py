"""`make demo`: bring up the two-rack lab and show, step by step, what the fabric does today.

Each step prints a heading, runs real commands inside the lab's namespaces (fabricctl against
the lab's etcd, FRR's and BIRD's own status commands, ping), and records a check. The run ends
with a summary, one line per check, and exits non-zero if any failed. The lab is torn down at
the end unless --keep is given.

Today (foundation + lab): routers peer, etcd answers from every node, IP pools are created
with fabricctl, every node claims a block and allocates addresses for two pods, the IPAM data
checks clean, hosts in different racks reach each other. The agent and CNI issues add BGP from
the nodes, kernel routes and pods attached through the CNI plugin.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from lab.runner import Lab

BIN = Path(sys.executable).parent
FABRICCTL = str(BIN / "fabricctl")
PY = sys.executable

# Allocates two pod addresses on this node through the IPAM library (the CNI plugin will do
# this through fabricd once the agent exists).
ALLOC = """
import asyncio, sys
from ipam.allocator import Allocator, AssignRequest
from ipam.resources import Node
from ipam.store import Store
async def main(eps, prefix, node, rack):
    async with Store(eps.split(','), prefix) as s:
        a = Allocator(s)
        await a.resources.put_node(Node(node, labels={'rack': rack}))
        for i in range(2):
            got = await a.auto_assign(AssignRequest(f'demo.{node}-pod{i}.eth0', node,
                attrs={'pod': f'{node}-pod{i}', 'namespace': 'demo'}))
            print(node, got[0].ip, got[0].block)
asyncio.run(main(*sys.argv[1:]))
"""


class Demo:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.checks: list[tuple[str, bool]] = []
        eps = ",".join(lab.etcd_endpoints)
        self.ctl = [FABRICCTL, "--etcd-endpoints", eps, "--prefix", "/fabric/v1"]

    def heading(self, text: str) -> None:
        print(f"\n=== {text} ===", flush=True)

    def run(self, node: str, argv: list[str], show: bool = True) -> tuple[int, str]:
        r = self.lab.exec(node, argv, timeout=60)
        if show:
            print(
                f"[{node}]$ {shlex.join(a if not a.startswith(str(BIN)) else Path(a).name for a in argv)}"
            )
            out = (r.stdout + r.stderr).rstrip()
            if out:
                print(out)
        return r.returncode, r.stdout

    def check(self, what: str, ok: bool) -> bool:
        self.checks.append((what, ok))
        print(f"  -> {'PASS' if ok else 'FAIL'}: {what}", flush=True)
        return ok

    def wait(self, what: str, pred: Callable[[], bool], timeout: float = 30) -> bool:
        try:
            self.lab.wait_for(pred, timeout, what=what)
            return self.check(what, True)
        except TimeoutError:
            return self.check(what, False)

    def steps(self) -> None:
        lab = self.lab
        routers = lab.nodes("frr") + lab.nodes("bird")
        nodes = lab.nodes("node")
        self.heading("BGP between the top-of-rack routers and the spine")
        self.wait(
            "ToR and spine BGP sessions Established",
            lambda: all(lab.established(r) for r in routers),
            60,
        )
        for r in routers:
            print(f"  {r}: {json.dumps(lab.bgp_sessions(r))}")

        self.heading("The etcd service answers from every node")
        ok = all(
            self.run(n, [*self.ctl, "pool", "list"], show=n == nodes[0])[0] == 0 for n in nodes
        )
        self.check("fabricctl reaches etcd from every node", ok)

        self.heading("IP pools (fabricctl pool add)")
        rc1, _ = self.run(
            nodes[0], [*self.ctl, "pool", "add", "pods-v4", "--cidr", "10.244.0.0/16"]
        )
        rc2, _ = self.run(
            nodes[0], [*self.ctl, "pool", "add", "pods-v6", "--cidr", "fd00:244::/64"]
        )
        rc3, _ = self.run(nodes[0], [*self.ctl, "pool", "add", "bad", "--cidr", "10.244.1.0/24"])
        self.check(
            "pools created; an overlapping pool is refused with exit 1",
            (rc1, rc2, rc3) == (0, 0, 1),
        )
        self.run(nodes[0], [*self.ctl, "pool", "list"])

        self.heading("Two pod addresses per node (IPAM with block affinity)")
        eps = ",".join(lab.etcd_endpoints)
        allocated = 0
        for n in nodes:
            rack = lab.topology.nodes[n].labels.get("fabric.rack", "")
            rc, out = self.run(n, [PY, "-c", ALLOC, eps, "/fabric/v1", n, rack], show=False)
            print(out.rstrip())
            allocated += out.count(n) if rc == 0 else 0
        self.check(f"{len(nodes) * 2} addresses allocated", allocated == len(nodes) * 2)

        self.heading("Pools and blocks (fabricctl ipam show --show-blocks)")
        self.run(nodes[0], [*self.ctl, "ipam", "show", "--show-blocks"])
        rc, out = self.run(
            nodes[0], [*self.ctl, "ipam", "show", "--show-blocks", "-o", "json"], show=False
        )
        blocks = _blocks_by_node(out) if rc == 0 else {}
        self.check("every node owns its own block", sorted(blocks) == sorted(nodes))

        self.heading("IPAM integrity (fabricctl ipam check)")
        rc, _ = self.run(nodes[0], [*self.ctl, "ipam", "check"])
        self.check("ipam check is clean", rc == 0)

        self.heading("Hosts in different racks reach each other through the routers")
        a, b = nodes[0], nodes[-1]
        self.wait(
            f"{a} -> {b} ping",
            lambda: lab.exec(a, ["ping", "-c1", "-W1", lab.address(b)]).returncode == 0,
        )
        self.run(a, ["ping", "-c2", "-W1", lab.address(b)])

    def summary(self) -> int:
        self.heading("Summary")
        for what, ok in self.checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {what}")
        failed = sum(1 for _, ok in self.checks if not ok)
        print(f"\n{len(self.checks) - failed} passed, {failed} failed")
        return 1 if failed else 0


def _blocks_by_node(out: str) -> dict[str, list[str]]:
    """Node -> blocks from `fabricctl ipam show --show-blocks -o json`."""
    try:
        pools = json.loads(out)["pools"]
    except (ValueError, KeyError):
        return {}
    found: dict[str, list[str]] = {}
    for p in pools:
        for b in p["blocks"]:
            if b["node"]:
                found.setdefault(b["node"], []).append(b["cidr"])
    return found


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="leave the lab up for exploring")
    p.add_argument("--name", default="demo")
    args = p.parse_args()
    lab = Lab("two-rack", name=args.name, progress=lambda m: print(f"  [lab] {m}", flush=True))
    print(
        "Bringing up the two-rack lab (2 ToRs, a spine, 4 hosts, etcd) from network namespaces..."
    )
    rc = 1
    try:
        lab.up()
        demo = Demo(lab)
        demo.steps()
        rc = demo.summary()
    finally:
        if args.keep:
            print(f"\nThe lab is still up. Explore it with `python -m lab status {args.name}`, "
                  f"`python -m lab exec --name {args.name} node1 -- ip route`; "
                  f"remove it with `python -m lab down {args.name}`.")  # fmt: skip
        else:
            lab.down()
            print("Lab torn down.")
    return rc


if __name__ == "__main__":
    sys.exit(main())
