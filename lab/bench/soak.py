"""`python -m lab.bench soak [--minutes N] [--quick]`: pods created and deleted on every host
of the two-rack lab (3-member etcd, fabricd on every host) at a steady rate while faults are
injected, measuring whether a new pod works from its first packet.

- Churn: ``rate`` ADDs per second cluster-wide (default 2, hosts in turn) through the
  installed plugin, every tenth asking for an address (``IP=``) in 10.244.255.0/26 (node1's
  block from the start), which the other hosts borrow (their pod's /32 announced); each pod
  lives 3-8 s (four in five) or 30-90 s, then is deleted (as many DELs as ADDs).
- Borrowing by the limit (soak_limit): ``maxBlocksPerHost`` is 1 for the run and node4's one
  block is filled with long-lived pods first, so node4's ordinary pods borrow too. Per kind
  (``kinds``: ordinary, ip_request, borrowed_by_limit) the pods made and those that lost a
  first ping; a run where no ordinary pod borrowed, or IPAM disagrees, is ``valid: false``. An ADD answered 11 is retried for 30 s, as a runtime does; only one
  that still fails is an error.
- Every new pod pings a long-lived pod in the other rack 20 times at 50 ms from the moment
  its ADD returns (``first_ping_loss_pct``: new pods that lost any; the worst run of
  unanswered pings in ms). The first late reply captures the node (routes, neighbours, the
  pod's, nstat) into the run's directory. The reference, measured in the same run: every
  fourth pod pings again once the first series ended (``settled_loss_pct``).
- Long-lived pods probe across racks and within each rack every 100 ms (``established_lost``;
  per fault, the pings lost within its window).
- Faults at 20/40/60/80 % of the run: fabricd SIGKILLed on node2 (back 2 s later), ExaBGP
  SIGKILLed on node3, the etcd leader killed (back 5 s later), tor2's BIRD restarted.
- End: every pod deleted; ``ipam check`` clean and no address in use (``ipam_leaks``); no
  veth, host route, state record, recorded DEL or netns left (``dataplane_leaks``); every
  host's fabric routes are its blocks' blackholes and the other hosts' blocks
  (``route_mismatch``); fabricd's RSS and open fds from start to end (``rss_growth_mb``,
  ``fd_growth``; node2's from its restart).
The machine is shared: timings carry the load; the last line is the JSON result.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import functools
import ipaddress
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import netns, pods
from lab.bench import soak_limit
from lab.bench.soak_limit import LIMITED, block_of
from lab.bench.soak_probe import FirstPing, capture, leftovers, rss_fds
from lab.pods import Pod, Probe
from lab.runner import Lab
from lab.topology import load

OUT = Path(__file__).resolve().parent.parent / "out"
RACKS = {"node1": 1, "node2": 1, "node3": 2, "node4": 2}
RETRY = 30.0  # s a runtime keeps retrying an ADD or DEL answered 11
GRACE = 15.0  # s after a fault is repaired during which losses are still its own
REQUESTED = ipaddress.ip_network("10.244.255.0/26")  # IP= requests (in the lab's pool)


@dataclass
class Stats:
    created: int = 0
    add_errors: int = 0
    del_errors: int = 0
    add_retries: int = 0
    lossy: int = 0
    worst_gap_ms: float = 0.0
    settled: int = 0
    settled_lossy: int = 0
    first: list[tuple[float, int]] = field(default_factory=list)  # (started, pings lost)
    blocks: set[str] = field(default_factory=set)  # /26s that held a pod already
    new_block: list[int] = field(default_factory=list)  # pings lost by pods opening a block
    kinds: dict[str, list[int]] = field(  # pings lost per new pod, per kind
        default_factory=lambda: {k: [] for k in ("ordinary", "ip_request", "borrowed_by_limit")}
    )
    ip_taken: int = 0  # IP= requests refused (100): the address was still held
    pods: list[dict[str, Any]] = field(default_factory=list)  # per new pod, to first-pings.jsonl
    captures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Soak:
    def __init__(self, lab: Lab, out: Path, rate: float, seconds: float) -> None:
        self.lab, self.out, self.rate, self.seconds = lab, out, rate, seconds
        self.hosts = lab.nodes("node")
        self.stats = Stats()
        self.live: list[tuple[float, Pod]] = []  # (expires, pod)
        self.gone: dict[str, set[str]] = {h: set() for h in self.hosts}
        self.anchor: dict[int, Pod] = {}  # rack -> a long-lived pod there
        self.own: dict[str, set[str]] = {}  # host -> its blocks (the limit allows no more)
        self.ipam_borrowed, self.ipam_agrees = 0, False  # LIMITED's, at the churn's end
        self.ipam_disagree: dict[str, list[str]] = {}  # what IPAM and the pods disagree on
        self.fillers = (0, 0)  # LIMITED's filler pods: in its block, in all
        self.dup_ips: list[str] = []  # an address two long-lived or filler pods were given
        self.base: dict[str, tuple[float, int]] = {}
        self.faults: list[dict[str, Any]] = []
        self._ids = itertools.count()
        self._pool = concurrent.futures.ThreadPoolExecutor(8)

    # ------------------------------------------------------------------ churn

    def _add(self, host: str) -> None:
        i = next(self._ids)
        cid = f"s{i}-{host}"
        # every tenth pod asks for an address (IP=) in one /26 that the pool's automatic
        # choice leaves alone: the first asker claims its block, every other host borrows
        # (its pod's /32 announced on its own)
        args = f";IP={REQUESTED.network_address + 1 + (i // 10) % 62}" if i % 10 == 9 else ""
        end = time.monotonic() + RETRY
        while True:
            try:
                pod = pods.add(self.lab, host, cid, args=args)
                break
            except pods.PodError as e:
                if e.code == 100:  # still held by an earlier pod (a long-lived one): skip
                    with self.stats.lock:
                        self.stats.ip_taken += 1
                    self._del_quietly(host, cid)
                    return
                if e.code == 11 and time.monotonic() < end:
                    with self.stats.lock:
                        self.stats.add_retries += 1
                    self._del_quietly(host, cid)  # a runtime DELs after a failed ADD
                    time.sleep(1.0)
                    continue
                with self.stats.lock:
                    self.stats.add_errors += 1
                    self.stats.errors.append(str(e))
                self._del_quietly(host, cid)
                return
        other = self.anchor[3 - RACKS[host]]
        fp = FirstPing(self.lab, pod, other.ip, lambda: self._capture(pod, other.ip))
        with self.stats.lock:
            self.stats.created += 1
            n = self.stats.created
            life = random.uniform(3, 8) if random.random() < 0.8 else random.uniform(30, 90)
            self.live.append((time.monotonic() + life, pod))
        lost, gap = fp.wait()
        block = block_of(pod.ip)
        kind = (
            "ip_request" if args else "ordinary" if block in self.own[host] else "borrowed_by_limit"
        )
        with self.stats.lock:
            self.stats.kinds[kind].append(lost)
            self.stats.pods.append({"pod": pod.name, "ip": pod.ip, "kind": kind,
                                    "new_block": block not in self.stats.blocks,
                                    "started": round(fp.started, 3), "lost": lost,
                                    "worst_gap_ms": gap})  # fmt: skip
            if block not in self.stats.blocks:  # its block was claimed (and announced) just now
                self.stats.blocks.add(block)
                self.stats.new_block.append(lost)
            self.stats.first.append((fp.started, lost))
            self.stats.lossy += lost > 0
            self.stats.worst_gap_ms = max(self.stats.worst_gap_ms, gap)
        if n % 4 == 0:  # the reference: the same path once the pod has settled
            lost2, _ = FirstPing(self.lab, pod, other.ip, lambda: None).wait()
            with self.stats.lock:
                self.stats.settled += 1
                self.stats.settled_lossy += lost2 > 0

    def _capture(self, pod: Pod, dst: str) -> None:
        with self.stats.lock:
            if len(self.stats.captures) >= 50:
                return
        path = capture(self.lab, pod, dst, self.out / f"late-{pod.name}.txt")
        with self.stats.lock:
            self.stats.captures.append(path.name)

    def _del_quietly(self, host: str, cid: str) -> None:
        ns = f"{self.lab.plan.prefix}p{cid[:40]}"
        pods.cni(self.lab, host, "DEL", cid, str(netns.NETNS_DIR / ns))
        netns.delete(ns)
        self.gone[host].add(cid)

    def _del(self, pod: Pod) -> None:
        end = time.monotonic() + RETRY
        while True:
            code, doc = pods.cni(self.lab, pod.node, "DEL", pod.name, pod.netns)
            if code == 0:
                break
            if time.monotonic() > end:
                with self.stats.lock:
                    self.stats.del_errors += 1
                    self.stats.errors.append(f"DEL {pod.name}: {pods.why(doc)}")
                return
            time.sleep(1.0)
        netns.delete(pod.netns_name)
        self.gone[pod.node].add(pod.name)

    # ------------------------------------------------------------------ faults

    def _fault(self, name: str, action: Any) -> None:
        t0 = time.monotonic()
        try:
            action()
            ok = True
        except Exception as e:  # reported; the run goes on
            ok = False
            self.stats.errors.append(f"fault {name}: {type(e).__name__}: {e}")
        self.faults.append({"fault": name, "at": time.time() - (time.monotonic() - t0),
                            "seconds": round(time.monotonic() - t0, 1), "ok": ok})  # fmt: skip

    def _kill_fabricd(self) -> None:
        self.lab.stop_fabricd("node2", signal.SIGKILL)
        time.sleep(2.0)
        self.lab.start_fabricd("node2")
        self.lab.wait_for(lambda: self.lab.health("node2")[0] == 200, 90, what="fabricd back")
        self.base["node2"] = rss_fds(self.lab.fabricd_pid("node2"))

    def _speaker(self, host: str) -> dict[str, Any]:
        r = self.lab.fabricctl(["bgp", "status", "--node", host, "-o", "json"])
        docs = json.loads(r.stdout)
        return dict((docs[0] if isinstance(docs, list) else docs)["speaker"])

    def _kill_exabgp(self) -> None:
        sp = self._speaker("node3")
        os.kill(int(sp["pid"]), signal.SIGKILL)
        self.lab.wait_for(lambda: self._speaker("node3")["pid"] != sp["pid"], 60,
                          what="ExaBGP restarted")  # fmt: skip
        self.lab.wait_for(lambda: self.lab.health("node3")[0] == 200, 60, what="node3 ready")

    def _kill_etcd_leader(self) -> None:
        etcd = self.lab.etcd
        assert etcd is not None
        leader = self.lab.wait_for(etcd.leader, 20, what="an etcd leader")
        assert leader is not None
        leader.kill()
        self.lab.wait_for(lambda: (etcd.leader() or leader) is not leader, 30, what="new leader")
        time.sleep(5.0)
        etcd.restart(leader)

    def _restart_tor(self) -> None:
        self.lab.restart_router("tor2")
        self.lab.wait_for(lambda: self.lab.established("tor2"), 60, what="tor2 sessions")

    # ------------------------------------------------------------------ the run

    def run(self) -> dict[str, Any]:
        lab = self.lab
        soak_limit.set_limit(lab)  # before any block is claimed: every host gets one
        limit_at = time.monotonic()
        longs = {h: pods.add(lab, h, f"ll-{h}") for h in self.hosts}
        # the IP= block is node1's from the start (its last address held all along)
        longs["req"] = pods.add(lab, "node1", "ll-req", args=f";IP={REQUESTED[-1]}")
        self.own = {h: {block_of(longs[h].ip)} for h in self.hosts}
        self.own["node1"].add(str(REQUESTED))
        self.stats.blocks = {b for bs in self.own.values() for b in bs}
        time.sleep(max(0.0, limit_at + 6.0 - time.monotonic()))  # fabricd's settings TTL
        fillers = soak_limit.fill(lab, LIMITED, block_of(longs[LIMITED].ip))
        held = [p.ip for p in [*longs.values(), *fillers]]
        self.dup_ips = sorted({ip for ip in held if held.count(ip) > 1})  # IPAM must never
        (self.out / "limit.json").write_text(json.dumps({  # what the limit run started from
            "own_blocks": {h: sorted(b) for h, b in self.own.items()},
            "long_lived": {k: p.ip for k, p in longs.items()},
            "fillers": {p.name: p.ip for p in fillers},
            "blocks": json.loads(lab.fabricctl(["ipam", "show", "--show-blocks", "-o", "json"]).stdout),
        }, indent=1))  # fmt: skip
        self.anchor = {1: longs["node1"], 2: longs["node3"]}
        pairs = [(longs["node1"], longs["node3"]), (longs["node3"], longs["node1"]),
                 (longs["node1"], longs["node2"]), (longs["node4"], longs["node3"])]  # fmt: skip
        flows = pods.Flows(lab, pairs, timeout=60)
        flows.__enter__()
        self.base = {h: rss_fds(lab.fabricd_pid(h)) for h in self.hosts}
        plan = [(0.2, "fabricd SIGKILL node2", self._kill_fabricd),
                (0.4, "ExaBGP SIGKILL node3", self._kill_exabgp),
                (0.6, "etcd leader killed", self._kill_etcd_leader),
                (0.8, "tor2 BIRD restarted", self._restart_tor)]  # fmt: skip
        t0 = time.monotonic()
        end, next_add, hosts = t0 + self.seconds, t0, itertools.cycle(self.hosts)
        work: list[concurrent.futures.Future[None]] = []
        fault_threads = []
        while time.monotonic() < end:
            now = time.monotonic()
            if plan and now >= t0 + plan[0][0] * self.seconds:
                _, name, action = plan.pop(0)
                t = threading.Thread(target=self._fault, args=(name, action), daemon=True)
                t.start()
                fault_threads.append(t)
            if now >= next_add:
                work.append(self._pool.submit(self._add, next(hosts)))
                next_add += 1.0 / self.rate
            with self.stats.lock:
                due = [p for e, p in self.live if e <= now]
                self.live = [(e, p) for e, p in self.live if e > now]
            work += [self._pool.submit(self._del, p) for p in due]
            time.sleep(0.02)
        for t in fault_threads:
            t.join(300)
        concurrent.futures.wait(work)
        # IPAM's view must match the pods': LIMITED's live churn pods outside its block
        mine = [p for _, p in self.live if p.node == LIMITED]
        want = {p.ip for p in mine if block_of(p.ip) not in self.own[LIMITED]}
        seen = {b["ip"] for b in soak_limit.borrowed(lab) if b["borrowingNode"] == LIMITED}
        got = seen & {p.ip for p in mine}
        self.ipam_agrees = got == want
        self.ipam_disagree = {"borrowed_not_in_ipam": sorted(want - got),
                              "ipam_borrowed_not_outside": sorted(got - want)}  # fmt: skip
        self.ipam_borrowed = len(want)
        with self.stats.lock:
            rest, self.live = [p for _, p in self.live], []
        concurrent.futures.wait([self._pool.submit(self._del, p) for p in rest])
        losses = flows.stop()
        lost_at = [t for p in flows.probes for t in p.times(_missing(p))]
        (self.out / "established-losses.json").write_text(
            json.dumps(  # when, per flow
                {name: p.times(_missing(p)) for name, p in zip(losses, flows.probes, strict=True)}
            )
        )
        growth = {}
        for h in self.hosts:
            (rss, fds), (rss0, fds0) = rss_fds(lab.fabricd_pid(h)), self.base[h]
            growth[h] = (rss - rss0, float(fds - fds0))
        concurrent.futures.wait([self._pool.submit(self._del, p)
                                 for p in [*longs.values(), *fillers]])  # fmt: skip
        own = self.own[LIMITED]
        self.fillers = (sum(block_of(p.ip) in own for p in fillers), len(fillers))
        return self._result(losses, lost_at, growth)

    def _result(self, losses: dict[str, pods.Loss], lost_at: list[float],
                growth: dict[str, tuple[float, float]]) -> dict[str, Any]:  # fmt: skip
        lab, s = self.lab, self.stats
        for f in self.faults:
            f["established_lost"] = sum(1 for t in lost_at if self._fault_of(t) is f)
            f["new_pods_lossy"] = sum(1 for t, n in s.first if n and self._during(t, f))
        in_faults = sum(f["established_lost"] for f in self.faults)
        calm = [n for t, n in s.first if not any(self._during(t, f) for f in self.faults)]
        leaks = [x for h in self.hosts for x in leftovers(lab, h, self.gone[h])]
        with contextlib.suppress(TimeoutError):
            lab.wait_for(lambda: self._route_diff() == 0, 60, 1.0, "the intended routes")
        mismatch = self._route_diff()
        in_use = _ips_in_use(lab)
        check = lab.fabricctl(["ipam", "check"])
        (self.out / "faults.json").write_text(json.dumps(self.faults, indent=2))
        (self.out / "first-pings.jsonl").write_text("".join(json.dumps(x) + "\n" for x in s.pods))
        first = _pct(s.lossy, s.created)
        # the run is valid only if ordinary pods really borrowed because of the limit (and
        # IPAM, asked at the end of the churn, agreed that the live ones are borrowed)
        valid = bool(s.kinds["borrowed_by_limit"]) and self.ipam_agrees and not self.dup_ips
        invalid = "" if valid else (
            f"invalid run: {len(s.kinds['borrowed_by_limit'])} ordinary pods borrowed because "
            f"of maxBlocksPerHost; IPAM agrees: {self.ipam_agrees} ({self.ipam_disagree}); "
            f"addresses given twice: {self.dup_ips}")  # fmt: skip
        if invalid:
            s.errors.append(invalid)
        (self.out / "errors.txt").write_text("\n".join(s.errors + leaks))
        settled = _pct(s.settled_lossy, s.settled)
        return {
            "bench": "soak",
            "minutes": round(self.seconds / 60, 2),
            "pods_created": s.created,
            "first_ping_loss_pct": first,
            "first_ping_worst_gap_ms": round(s.worst_gap_ms, 1),
            "first_ping_loss_pct_outside_faults": _pct(sum(1 for n in calm if n), len(calm)),
            "kinds": {
                k: {"created": len(v), "lossy": sum(1 for n in v if n)} for k, v in s.kinds.items()
            },
            "borrowed_by_limit_pods": len(s.kinds["borrowed_by_limit"]),
            "limit": {
                "maxBlocksPerHost": soak_limit.MAX_BLOCKS,
                "host": LIMITED,
                "fillers_in_block": self.fillers[0],
                "fillers_borrowed": self.fillers[1] - self.fillers[0],
                "duplicate_ips": self.dup_ips,
                "live_borrowed_at_end": self.ipam_borrowed,
                "ipam_agrees": self.ipam_agrees,
            },
            "valid": valid,
            "invalid_reason": invalid,
            "ip_request_pods": len(s.kinds["ip_request"]),
            "ip_request_pods_lossy": sum(1 for n in s.kinds["ip_request"] if n),
            "ip_request_taken": s.ip_taken,
            "new_block_pods": len(s.new_block),
            "new_block_pods_lossy": sum(1 for n in s.new_block if n),
            "settled_loss_pct": settled,
            "ratio_first_to_settled": round(first / settled, 3) if settled else None,
            "established_lost": sum(v.lost for v in losses.values()),
            "established_lost_outside_faults": len(lost_at) - in_faults,
            "established_lost_by_flow": {k: v.lost for k, v in losses.items() if v.lost},
            "faults": {
                f["fault"]: {
                    "seconds": f["seconds"],
                    "ok": f["ok"],
                    "established_lost": f["established_lost"],
                    "new_pods_lossy": f["new_pods_lossy"],
                }
                for f in self.faults
            },
            "add_errors": s.add_errors,
            "add_retries": s.add_retries,
            "del_errors": s.del_errors,
            "ipam_leaks": in_use + (0 if check.returncode == 0 else 1),
            "dataplane_leaks": len(leaks),
            "route_mismatch": mismatch,
            "rss_growth_mb": round(max(g[0] for g in growth.values()), 1),
            "fd_growth": int(max(g[1] for g in growth.values())),
            "captures": len(s.captures),
            "out": str(self.out),
        }

    def _fault_of(self, t: float) -> dict[str, Any] | None:
        """The fault whose window holds ``t``: the last one started before it, until it was
        repaired plus GRACE (routes relearned after the sessions are back)."""
        before = sorted((f for f in self.faults if f["at"] <= t), key=lambda f: f["at"])
        if before and t <= before[-1]["at"] + before[-1]["seconds"] + GRACE:
            return before[-1]
        return None

    @staticmethod
    def _during(started: float, f: dict[str, Any]) -> bool:
        """A new pod's 20 pings (~1 s from ``started``; 2 s with their waits) overlap the
        window of fault ``f`` (until it was repaired plus GRACE)."""
        at, seconds = float(f["at"]), float(f["seconds"])
        return started + 2.0 >= at and started <= at + seconds + GRACE

    def _route_diff(self) -> int:
        """How many fabric routes differ from the intended ones over all hosts (every pod is
        gone): each host holds its blocks as blackholes and every other host's blocks."""
        routes = {h: self.lab.kernel_routes(h) for h in self.hosts}
        every = {d for r in routes.values() for d, how in r.items() if how == "blackhole"}
        return sum(len(set(r) ^ every) for r in routes.values())


def _missing(p: Probe) -> list[int]:
    got: set[int] = set()
    lost: set[int] = set()
    for ln in p._lines:
        if "icmp_seq=" in ln:
            seq = int(ln.split("icmp_seq=")[1].split()[0])
            (got if "bytes from" in ln else lost).add(seq)
    sent = max(got | lost, default=0)
    return sorted(set(range(1, sent + 1)) - got)


def _pct(a: int, b: int) -> float:
    return round(100.0 * a / b, 2) if b else 0.0


def _ips_in_use(lab: Lab) -> int:
    r = lab.fabricctl(["ipam", "show", "-o", "json"])
    return sum(p["ipsInUse"] for p in json.loads(r.stdout)["pools"]) if r.returncode == 0 else -1


def topology() -> dict[str, Any]:
    raw = copy.deepcopy(dict(load("two-rack").raw))
    raw["topology"]["nodes"]["etcd"]["labels"]["fabric.etcd.members"] = "3"
    return raw


def run(quick: bool = False, minutes: float | None = None, rate: float = 2.0) -> dict[str, Any]:
    seconds = 60.0 * (minutes if minutes is not None else (1.0 if quick else 10.0))
    out = OUT / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    lab = Lab(topology(), name=f"soak{os.getpid()}", progress=lambda m: print(f"  {m}",
              file=sys.stderr, flush=True))  # fmt: skip
    try:
        lab.up()
        for r in (*lab.nodes("frr"), *lab.nodes("bird")):
            lab.wait_for(functools.partial(lab.established, r), 60, what=f"BGP sessions of {r}")
        lab.start_fabric(90)
        pods.install(lab)
        result = Soak(lab, out, 1.0 if quick else rate, seconds).run()
    finally:
        for m in lab.etcd.members if lab.etcd else ():
            m.stop(timeout=3)
        lab.down()
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench.soak", description=__doc__)
    p.add_argument("--minutes", type=float)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    result = run(args.quick, args.minutes)
    print(json.dumps(result))
    return 0 if result["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())
