"""`make demo`: bring up the two-rack lab and show, step by step, what the fabric does.

Each step prints a heading, runs real commands inside the lab's namespaces (fabricctl
against the lab's etcd, FRR's and BIRD's own commands, ip, ping), and records a check:
fabricd on every host peers with its top-of-rack router, IP pools are created, two pods
per host are attached through the installed CNI plugin, their blocks are announced and
installed, a pod in rack 1 reaches a pod in rack 2, a host taken down has its blocks
withdrawn from the ToRs, and comes back; a deny-all NetworkPolicy in one namespace blocks
a pod, an allow rule opens one port again. The run ends with a summary, one line per check,
exits non-zero if any failed, writes a picture of the topology under lab/out/, and tears
the lab down unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from lab import demo_policy, graph, pods, routers
from lab.runner import Lab

BIN = Path(sys.executable).parent
FABRICCTL = str(BIN / "fabricctl")
OUT = Path("lab/out")


class Demo:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.checks: list[tuple[str, bool]] = []
        self.ctl = [FABRICCTL, *lab.etcd_args, "--prefix", "/fabric/v1"]

    def heading(self, text: str) -> None:
        print(f"\n=== {text} ===", flush=True)

    def run(self, node: str, argv: list[str], show: bool = True,
            stdin: str | None = None) -> tuple[int, str]:  # fmt: skip
        r = self.lab.exec(node, argv, timeout=60, input=stdin)
        if show:
            shown = [Path(a).name if a.startswith(str(BIN)) else a for a in argv]
            if shown[:1] == ["fabricctl"]:
                shown = ["fabricctl", *shown[len(self.ctl) :]]
            print(f"[{node}]$ {shlex.join(shown)}")
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
        tors = ["tor1", "tor2"]
        routers_ = lab.nodes("frr") + lab.nodes("bird")
        hosts = lab.nodes("node")
        self.heading("1. BGP between the top-of-rack routers and the spine")
        self.wait(
            "ToR and spine BGP sessions Established",
            lambda: all(lab.established(r) for r in routers_),
            60,
        )

        self.heading("2. IP pools and BGP peers in etcd (fabricctl apply -f)")
        print((lab.dir / "fabric-resources.yaml").read_text().rstrip()[:1200])
        lab.progress("starting fabricd on every host")
        try:
            lab.start_fabric(timeout=90)
            self.check("fabricd runs and is ready on every host", True)
        except Exception as e:
            self.check(f"fabricd runs and is ready on every host ({e})", False)
            return
        self.run(hosts[0], [*self.ctl, "pool", "list"])

        self.heading("3. Two pods per host through the CNI plugin (/opt/cni/bin/fabric)")
        pods.install(lab)
        made: dict[str, list[pods.Pod]] = {}
        for h in hosts:
            for i in range(2):
                try:
                    pod = pods.add(lab, h, f"{h}-pod{i}")
                except pods.PodError as e:
                    print(f"  {h}: {e}")
                    continue
                made.setdefault(h, []).append(pod)
                print(f"  {pod.name:12} on {h}: {pod.ip}  (netns {pod.netns})")
        self.check(
            f"{len(hosts) * 2} pods attached", sum(map(len, made.values())) == len(hosts) * 2
        )
        if len(made) < len(hosts):
            return

        self.heading("4. Pools and blocks (fabricctl ipam show --show-blocks)")
        self.run(hosts[0], [*self.ctl, "ipam", "show", "--show-blocks"])
        self.wait(
            "every host owns a confirmed block, blackholed locally",
            lambda: all(self._blocks(h) for h in hosts),
            30,
        )
        blocks = {h: self._blocks(h) for h in hosts}
        rc, _ = self.run(hosts[0], [*self.ctl, "ipam", "check"], show=False)
        self.check("fabricctl ipam check is clean", rc == 0)

        self.heading("5. BGP sessions (fabricctl bgp status)")
        self.run(hosts[0], [*self.ctl, "bgp", "status", "--node", hosts[0]])
        self.wait(
            "every host's session to its ToR is up",
            lambda: all(self._sessions_up(h) for h in hosts),
            30,
        )

        self.heading("6. tor1's BGP table as FRR shows it (vtysh: show ip bgp)")
        all_blocks = {b for bs in blocks.values() for b in bs}
        self.wait(
            "both ToRs hold exactly the confirmed blocks",
            lambda: all(self._tor_prefixes(t) == all_blocks for t in tors),
            30,
        )
        print(routers.vtysh(lab.dir / "tor1", "show ip bgp").stdout.rstrip())

        self.heading(f"7. {hosts[0]}'s kernel routes from the fabric (ip route show proto fabric)")
        far = hosts[-1]
        self.wait(
            f"{hosts[0]} routes {far}'s block through its ToR",
            lambda: all(b in lab.kernel_routes(hosts[0]) for b in blocks[far]),
            30,
        )
        self.run(hosts[0], ["ip", "route", "show", "proto", "201"])

        self.heading("8. A pod in rack 1 pings a pod in rack 2")
        a, b = made[hosts[0]][0], made[far][0]
        self.wait(
            f"{far} routes {hosts[0]}'s block back through its ToR",
            lambda: all(x in lab.kernel_routes(far) for x in blocks[hosts[0]]),
            30,
        )
        self.check(f"{a.name} in rack 1 reaches {b.name} in rack 2", self._reach(a, b))

        self.heading(f"9. {far} taken down (its links cut): its blocks leave the ToRs")
        started = time.monotonic()
        lab.set_links(far, "down")
        gone = self.wait(
            f"{far}'s blocks withdrawn from both ToRs",
            lambda: all(not (self._tor_prefixes(t) & set(blocks[far])) for t in tors),
            60,
        )
        if gone:
            print(f"  withdrawn {time.monotonic() - started:.1f} s after the links went down")
        near = made[hosts[1]][0]
        self.check(
            f"pods elsewhere keep talking ({a.name} -> {near.name})", pods.ping(lab, a, near.ip)
        )

        self.heading(f"10. {far} back")
        lab.set_links(far, "up")
        self.wait(
            f"{far}'s blocks announced again and its pods reachable",
            lambda: pods.ping(lab, a, b.ip),
            90,
        )

        demo_policy.policy_step(self, hosts[0], far)

        self.heading("12. A picture of the fabric (lab/out/)")
        try:
            for p in graph.write(lab, OUT):
                print(f"  {p}")
            self.check("topology picture written (SVG, PNG)", True)
        except Exception as e:
            self.check(f"topology picture written ({e})", False)

    def _reach(self, a: pods.Pod, b: pods.Pod, within: float = 15.0) -> bool:
        """``a`` pings ``b``. The hosts' routes are in place when this runs, but the ToRs'
        and the spine's forwarding tables are not checked by the steps before (their BGP
        tables are): when the first pings are lost, print every hop's route both ways and
        keep pinging for ``within`` s, saying when the replies came."""
        lab = self.lab
        if pods.ping(lab, a, b.ip, count=3):
            print(f"  {a.name} ({a.ip}) -> {b.name} ({b.ip}): replies")
            return True
        started = time.monotonic()
        print(f"  {a.name} ({a.ip}) -> {b.name} ({b.ip}): no reply; each hop's route:")
        for node in [a.node, *lab.nodes("frr"), *lab.nodes("bird"), b.node]:
            for dst in (b.ip, a.ip):
                r = lab.exec(node, ["ip", "-4", "route", "get", dst], timeout=10)
                print(f"    [{node}] {(r.stdout or r.stderr).strip().splitlines()[:1]}")
        try:
            lab.wait_for(lambda: pods.ping(lab, a, b.ip), within, what="replies")
        except TimeoutError:
            print(f"  still no reply after {within:.0f} s")
            return False
        print(f"  replies {time.monotonic() - started:.1f} s after the first lost pings")
        return True

    def _blocks(self, host: str) -> list[str]:
        _, out = self.run(host, [*self.ctl, "routes", "--node", host, "-o", "json"], show=False)
        try:
            docs = json.loads(out)
            doc = docs[0] if isinstance(docs, list) else docs
            items = doc["routes"]["items"] if "routes" in doc else doc.get("items", [])
        except (ValueError, KeyError, IndexError, TypeError):
            return []
        return sorted(r["dst"] for r in items if r.get("type") == "blackhole")

    def _sessions_up(self, host: str) -> bool:
        _, out = self.run(
            host, [*self.ctl, "bgp", "status", "--node", host, "-o", "json"], show=False
        )
        try:
            sessions = json.loads(out)[0]["sessions"]
        except (ValueError, KeyError, IndexError):
            return False
        return bool(sessions) and all(s["state"] == "up" for s in sessions)

    def _tor_prefixes(self, tor: str) -> set[str]:
        d = self.lab.dir / tor
        if self.lab.node(tor).role == "frr":
            text = routers.vtysh(d, "show ip bgp").stdout
        else:
            text = routers.birdc(d, "show route").stdout
        return set(re.findall(r"(10\.244\.\d+\.\d+/\d+)", text))

    def summary(self) -> int:
        self.heading("Summary")
        for what, ok in self.checks:
            print(f"  [{'PASS' if ok else 'FAIL'}] {what}")
        failed = sum(1 for _, ok in self.checks if not ok)
        print(f"\n{len(self.checks) - failed} passed, {failed} failed")
        return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m lab.demo", description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="leave the lab up for exploring")
    p.add_argument("--name", default="demo")
    p.add_argument("--tls", action="store_true",
                   help="etcd requires TLS and client certificates (made for the lab)")  # fmt: skip
    args = p.parse_args()
    lab = Lab("two-rack", name=args.name, progress=lambda m: print(f"  [lab] {m}", flush=True),
              tls=args.tls)  # fmt: skip
    print(
        "Bringing up the two-rack lab (FRR and BIRD ToRs, an FRR spine, 4 hosts, etcd) "
        "from network namespaces..."
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
