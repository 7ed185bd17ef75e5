"""Convergence benchmark (docs/bench.md): a pod ADD on a rack-1 node that needs a new block,
until the block's route is in the kernel of a rack-2 node, against FRR announcing a new
static network over the same path.

Lab ``two-rack`` (tor1 FRR, spine FRR, tor2 BIRD). fabricd runs on node1, node3, node4;
node2 (rack 1, wired and peered with tor1 as node1 is, same AS) runs FRR instead. Samples,
interleaved round by round, the kinds taking turns to go first:

- ``fabric``: t0 = ``time.monotonic()`` just before exec'ing the installed CNI plugin on
  node1 for a pod whose netconf names an IP pool of its own (one /26 block, made before
  fabricd starts): the ADD claims that block, fabricd announces it;
- ``frr``: t0 just before ``network P`` is written to a vtysh session held open on node2's
  bgpd (``no bgp network import-check``): node2 -> tor1 -> spine -> tor2 -> node3;
- ``tor``: the same on tor1 itself, a hop shorter (detail line only).

Done when node3's kernel has the prefix: a netlink socket in node3's namespace on the IPv4
route group, read by a thread here (CLOCK_MONOTONIC is shared by all namespaces). UPDATEs
carrying the prefix are timestamped where they leave the announcer and tor1 and enter tor2
and node3, and node1's affinity for the block is watched in etcd: every sample is split
into hops. Targets: ratio_p50 (fabric p50 / frr p50) <= 1.5, aim 1.0; p99 < 1000 ms.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from fabric.dataplane.netlink.core import in_netns
from lab import pods, procs, render, routers
from lab.ipam_load import percentile
from lab.runner import Lab
from lab.view import LabError

TOPOLOGY = Path(__file__).resolve().parent.parent / "topologies" / "two-rack.clab.yml"
OUT = Path(__file__).resolve().parent.parent / "out"
ANNOUNCER, FRR_HOST, RECEIVER = "node1", "node2", "node3"
FABRIC_HOSTS = ("node1", "node3", "node4")
POD_POOL = "10.244.0.0/18"  # the lab's default pool, shrunk to make room for the rest
BENCH_POOLS = ipaddress.IPv4Network("10.244.64.0/18")  # one /26 pool per fabric sample
BASELINE = ipaddress.IPv4Network("10.244.128.0/18")  # FRR's prefixes (importCIDRs)
BLOCK = 26
SAMPLES, WARMUP, QUICK_SAMPLES, QUICK_WARMUP = 50, 3, 5, 1
GAP = 0.3  # s after a sample before the next starts: the tail of its propagation settles
TIMEOUT = 10.0  # s a sample may take before the run fails
KINDS = ("fabric", "frr", "tor")
# Where an UPDATE is timestamped: (point, node, interface, outgoing); "src" is the announcer
# (node1 for fabric, node2 for frr, none for tor).
POINTS = (("tor1", "tor1", "eth1", True), ("tor2", "tor2", "eth1", False),
          ("node3", RECEIVER, "eth1", False))  # fmt: skip
# The stretch ending at each point; claim + announce = host (fabric only: t0 -> affinity
# confirmed in etcd -> the UPDATE on node1's wire).
HOPS = ("claim", "announce", "host", "tor1", "spine", "tor2", "node3")
ETH_P_ALL, PACKET_OUTGOING, SO_TIMESTAMPNS = 0x0003, 4, 35
RTMGRP_IPV4_ROUTE, RTM_NEWROUTE, RTA_DST = 0x40, 24, 1
# Run in a lab namespace: prints "<monotonic> <state> <block>" for each change of node1's
# block affinities (pending: claimed; confirmed: what fabricd announces) as etcd delivers it.
AFFINITY_WATCH = """
import asyncio, json, sys, time
from ipam import keys
from ipam.store import Store
async def main(eps, prefix, node):
    async with Store(eps.split(','), prefix) as s:
        _, rev = await s.list(keys.node_affinities(node), keys_only=True)
        print('ready', flush=True)
        async for ev in s.watch(keys.node_affinities(node), rev + 1):
            state = json.loads(ev.kv.value or b'{}').get('state', 'deleted')
            print(time.monotonic(), state, keys.parse_affinity(ev.kv.key)[1], flush=True)
asyncio.run(main(*sys.argv[1:]))
"""


def progress(msg: str) -> None:
    print(f"[bench converge] {msg}", file=sys.stderr, flush=True)


def nth(net: ipaddress.IPv4Network, i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((int(net.network_address) + (i << (32 - BLOCK)), BLOCK))


def nlri(prefix: ipaddress.IPv4Network) -> bytes:
    """The prefix as it appears in an UPDATE's NLRI: length, then the significant bytes."""
    return bytes([prefix.prefixlen]) + prefix.network_address.packed[: (prefix.prefixlen + 7) // 8]


def bgp_payload(frame: bytes) -> bytes:
    """The TCP payload of an Ethernet/IPv4 frame to or from port 179, else b""."""
    if len(frame) < 54 or frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return b""
    tcp = 14 + (frame[14] & 0x0F) * 4
    sport, dport = struct.unpack_from("!HH", frame, tcp)
    if 179 not in (sport, dport):
        return b""
    return frame[tcp + (frame[tcp + 12] >> 4) * 4 :]


def new_routes(data: bytes) -> list[ipaddress.IPv4Network]:
    """Destinations of the IPv4 RTM_NEWROUTE messages in one netlink read."""
    out, off = [], 0
    while off + 28 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind == RTM_NEWROUTE and data[off + 16] == socket.AF_INET:
            a, end = off + 28, off + length
            while a + 4 <= end:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype == RTA_DST and alen >= 8:
                    out.append(ipaddress.IPv4Network((data[a + 4 : a + 8], data[off + 17])))
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return out


def end(proc: subprocess.Popen[Any]) -> None:
    """Wait for a child of ours to exit; after 5 s kill it (by its Popen: its own PID)."""
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class Watcher:
    """One thread reading the receiver's route events and the capture sockets; per expected
    prefix, the monotonic time it was seen at each point and in the receiver's kernel."""

    def __init__(self, lab: Lab) -> None:
        def nl() -> socket.socket:
            s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            s.bind((0, RTMGRP_IPV4_ROUTE))
            return s

        self.nl = in_netns(lab.netns(RECEIVER), nl)
        self.caps: dict[socket.socket, tuple[str, bool]] = {}
        points = [*POINTS, ("src", ANNOUNCER, "eth1", True), ("src", FRR_HOST, "eth1", True)]
        for point, node, ifname, outgoing in points:
            sock = in_netns(lab.netns(node), functools.partial(self._capture, ifname))
            self.caps[sock] = (point, outgoing)
        argv = ["ip", "netns", "exec", lab.netns("node4"), sys.executable, "-c", AFFINITY_WATCH,
                ",".join(lab.etcd_endpoints), render.ETCD_PREFIX, ANNOUNCER]  # fmt: skip
        self.etcd = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert self.etcd.stdout is not None
        if self.etcd.stdout.readline().strip() != "ready":
            raise LabError("failed to start the affinity watch in node4")
        self.lock = threading.Lock()
        self.want: dict[bytes, ipaddress.IPv4Network] = {}
        self.seen: dict[ipaddress.IPv4Network, dict[str, float]] = {}
        self.done: dict[ipaddress.IPv4Network, threading.Event] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="converge-watch", daemon=True)
        self._thread.start()
        self._etcd_thread = threading.Thread(target=self._affinities, daemon=True)
        self._etcd_thread.start()

    def _affinities(self) -> None:
        assert self.etcd.stdout is not None
        for line in self.etcd.stdout:
            at, state, cidr = line.split()
            prefix = ipaddress.IPv4Network(cidr)
            with self.lock:
                if prefix in self.seen:
                    self.seen[prefix].setdefault(state, float(at))

    @staticmethod
    def _capture(ifname: str) -> socket.socket:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.bind((ifname, 0))
        return s

    def expect(self, prefix: ipaddress.IPv4Network) -> threading.Event:
        with self.lock:
            self.want[nlri(prefix)] = prefix
            self.seen[prefix] = {}
            return self.done.setdefault(prefix, threading.Event())

    def forget(self, prefix: ipaddress.IPv4Network) -> dict[str, float]:
        with self.lock:
            self.want.pop(nlri(prefix), None)
            return dict(self.seen.get(prefix, {}))

    def _run(self) -> None:
        socks = [self.nl, *self.caps]
        while not self._stop:
            ready, _, _ = select.select(socks, [], [], 0.2)
            for s in ready:
                with contextlib.suppress(OSError):
                    self._read(s)

    def _read(self, s: socket.socket) -> None:
        if s is self.nl:
            data = s.recv(1 << 16)
            now = time.monotonic()
            with self.lock:
                for dst in new_routes(data):
                    if dst in self.seen and "kernel" not in self.seen[dst]:
                        self.seen[dst]["kernel"] = now
                        self.done[dst].set()
            return
        frame, anc, _, addr = s.recvmsg(1 << 16, socket.CMSG_SPACE(16))
        point, outgoing = self.caps[s]
        if (addr[2] == PACKET_OUTGOING) != outgoing or not self.want:
            return
        payload = bgp_payload(frame)
        if not payload:
            return
        at = time.monotonic()
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("=qq", data[:16])
                at = sec + nsec / 1e9 - (time.time() - time.monotonic())
        with self.lock:
            for pattern, prefix in self.want.items():
                if pattern in payload:
                    self.seen[prefix].setdefault(point, at)

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.etcd.terminate()
        end(self.etcd)
        self._etcd_thread.join(2)
        for s in [self.nl, *self.caps]:
            s.close()


class Vty:
    """A vtysh session held open on one FRR's bgpd, in ``address-family ipv4 unicast`` of
    its ``router bgp``: a ``network`` line reaches bgpd with no process start (as a
    controller holding a vty would). Its output (the echo, ``%`` errors) is kept."""

    def __init__(self, node_dir: Path, asn: int) -> None:
        argv = [routers.VTYSH, "--vty_socket", str(node_dir), "-d", "bgpd"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        self.out: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.send("configure terminal", f"router bgp {asn}", "no bgp network import-check",
                  "address-family ipv4 unicast")  # fmt: skip

    def _read(self) -> None:
        assert self.proc.stdout is not None
        self.out.extend(self.proc.stdout)

    def send(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{ln}\n" for ln in lines))
        self.proc.stdin.flush()

    def errors(self) -> list[str]:
        return [ln.strip() for ln in self.out if ln.lstrip().startswith("%")]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("end", "exit")
        end(self.proc)
        self._reader.join(2)


class Bench:
    def __init__(self, lab: Lab, n_pools: int) -> None:
        self.lab, self.n_pools = lab, n_pools
        self.frr_dir = lab.dir / FRR_HOST / "frr"
        self.children: list[subprocess.Popen[bytes]] = []
        self.watch: Watcher | None = None
        self.vty: dict[str, Vty] = {}
        self.plugin_exec_ms = 0.0
        self.samples: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}

    def setup(self) -> None:
        lab = self.lab
        for r in ("spine", "tor1", "tor2"):
            lab.wait_for(functools.partial(lab.established, r), 60, 0.5, f"BGP sessions of {r}")
        self._write_resources()
        lab.configure_fabric()
        for h in FABRIC_HOSTS:
            progress(f"starting fabricd in {h}")
            lab.start_fabricd(h)
        for h in FABRIC_HOSTS:
            lab.wait_for(functools.partial(self._ready, h), 90, 0.5, f"fabricd in {h} ready")
        pods.install(lab, [ANNOUNCER])
        self.plugin_exec_ms = self._plugin_exec()
        progress(f"starting FRR (zebra, bgpd) in {FRR_HOST}; a vtysh session on it and on tor1")
        self._start_frr_host()
        self.vty = {"frr": Vty(self.frr_dir, lab.node(FRR_HOST).asn or 0),
                    "tor": Vty(lab.dir / "tor1", lab.node("tor1").asn or 0)}  # fmt: skip
        hosts = {lab.address(ANNOUNCER), lab.address(FRR_HOST)}
        lab.wait_for(lambda: self._tor1_hosts_up(hosts), 60, 0.5, "tor1's host sessions")
        self.watch = Watcher(lab)
        time.sleep(2.0)  # initial updates and End-of-RIBs settle

    def _write_resources(self) -> None:
        """The lab's resources with a smaller default pool, one /26 pool per fabric sample
        (selecting rack 1), and BASELINE in importCIDRs so fabricd installs FRR's prefixes."""
        docs = render.fabric_resources(self.lab.plan, pool=POD_POOL)
        for doc in docs:
            if doc["kind"] == "BGPConfiguration":
                doc["spec"]["importCIDRs"] = [str(BASELINE)]
        for i in range(self.n_pools):
            spec = {"cidr": str(nth(BENCH_POOLS, i)), "blockSize": BLOCK,
                    "nodeSelector": "fabric.rack == '1'", "natOutgoing": False}  # fmt: skip
            docs.append({"apiVersion": "fabric/v1", "kind": "IPPool",
                         "metadata": {"name": f"converge-{i}"}, "spec": spec})  # fmt: skip
        path = self.lab.dir / "fabric-resources.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    def _ready(self, host: str) -> bool:
        if not self.lab.fabricd_running(host):
            raise LabError(f"fabricd in {host} exited; see {self.lab.dir / host / 'fabricd.out'}")
        return self.lab.health(host, "/readyz")[0] == 200

    def _start_frr_host(self) -> None:
        """zebra + bgpd in node2's namespace: AS 65101 toward tor1, nothing accepted in (its
        kernel stays as it is), its ``network`` statements out."""
        lab, d = self.lab, self.frr_dir
        d.mkdir(mode=0o755, exist_ok=True)
        tor1 = lab.node(FRR_HOST).neighbors[0]
        nb = tor1.address
        node = lab.node(FRR_HOST)
        (d / "zebra.conf").write_text(f"hostname {FRR_HOST}\nlog file {d / 'zebra.log'}\n")
        (d / "bgpd.conf").write_text("\n".join([
            f"hostname {FRR_HOST}", f"log file {d / 'bgpd.log'} informational", "!",
            "route-map NONE deny 10", "exit", "route-map ALL permit 10", "exit", "!",
            f"router bgp {node.asn}", f" bgp router-id {lab.address(FRR_HOST)}",
            " no bgp ebgp-requires-policy", " no bgp network import-check",
            f" neighbor {nb} remote-as {tor1.asn}", f" neighbor {nb} timers 3 9",
            f" neighbor {nb} timers connect 2", f" neighbor {nb} advertisement-interval 0",
            " address-family ipv4 unicast", f"  neighbor {nb} activate",
            f"  neighbor {nb} route-map NONE in", f"  neighbor {nb} route-map ALL out",
            " exit-address-family", "exit", ""]))  # fmt: skip
        routers.prepare_frr_dir(d)
        for what, argv in routers.frr_commands(d):
            child, rec = procs.spawn(argv, lab.netns(FRR_HOST), d / f"{what}.out", FRR_HOST, what)
            self.children.append(child)
            lab.state.add_proc(rec)  # down() stops it by this record
        lab.wait_for(lambda: routers.ready("frr", d), 30, 0.2, f"FRR in {FRR_HOST} to answer")
        up = lambda: routers.frr_sessions(d).get(str(nb)) == "Established"  # noqa: E731
        lab.wait_for(up, 60, 0.5, f"{FRR_HOST}'s FRR session with tor1")

    def _tor1_hosts_up(self, hosts: set[str]) -> bool:
        sessions = self.lab.bgp_sessions("tor1")
        return all(sessions.get(h) == "Established" for h in hosts)

    def _plugin_exec(self) -> float:
        """p50 ms of exec'ing the installed plugin for VERSION (answered without fabricd):
        the part of every ADD that is only getting the plugin running."""
        exe = str(pods.cni_dir(self.lab, ANNOUNCER) / "bin" / "fabric")
        took = []
        for _ in range(10):
            t0 = time.monotonic()
            r = self.lab.exec(ANNOUNCER, ["env", "-i", "CNI_COMMAND=VERSION", exe], input="{}")
            took.append(time.monotonic() - t0)
            if r.returncode != 0:
                raise LabError(f"CNI VERSION on {ANNOUNCER} failed: {r.stdout}{r.stderr}")
        return round(percentile(took, 0.5) * 1000, 1)

    def _finish(self, kind: str, prefix: ipaddress.IPv4Network, t0: float,
                done: threading.Event, extra: dict[str, float]) -> dict[str, float]:  # fmt: skip
        assert self.watch is not None
        if not done.wait(TIMEOUT):
            seen = self.watch.forget(prefix)
            vty = self.vty[kind].errors() if kind in self.vty else []
            raise LabError(f"{kind}: {prefix} not in {RECEIVER}'s kernel after {TIMEOUT} s "
                           f"(seen at {sorted(seen)}; vtysh errors {vty})")  # fmt: skip
        seen = self.watch.forget(prefix)
        out = {k: round((v - t0) * 1000, 3) for k, v in seen.items()}
        out.update({k: round(v * 1000, 3) for k, v in extra.items()})
        return out

    def fabric(self, i: int) -> dict[str, float]:
        """A pod ADD on node1 claiming the block of pool ``i``."""
        assert self.watch is not None
        lab, block = self.lab, nth(BENCH_POOLS, i)
        cid = f"converge{i}"
        netns = lab.add_netns(f"{lab.plan.prefix}p{cid}")
        conf = pods.netconf(ipam={"type": "fabric-ipam", "pools": [f"converge-{i}"]})
        done = self.watch.expect(block)
        t0 = time.monotonic()
        code, doc = pods.cni(lab, ANNOUNCER, "ADD", cid, netns, conf)
        add = time.monotonic() - t0
        if code != 0 or not isinstance(doc, dict):
            raise LabError(f"CNI ADD of {cid} on {ANNOUNCER} failed ({code}): {doc}")
        ip = ipaddress.ip_interface(doc["ips"][0]["address"]).ip
        if ip not in block:
            raise LabError(f"CNI ADD of {cid} got {ip}, not an address of {block}")
        return self._finish("fabric", block, t0, done, {"add": add})

    def frr(self, i: int, kind: str) -> dict[str, float]:
        """``network P`` through the vty held on node2's FRR (``frr``) or tor1's (``tor``)."""
        assert self.watch is not None
        half = BASELINE.num_addresses >> (32 - BLOCK + 1)  # frr: first half, tor: second
        prefix = nth(BASELINE, i + (half if kind == "tor" else 0))
        done = self.watch.expect(prefix)
        t0 = time.monotonic()
        self.vty[kind].send(f"network {prefix}")
        return self._finish(kind, prefix, t0, done, {})

    def measure(self, rounds: int, warmup: int) -> None:
        """``warmup`` discarded rounds, then ``rounds``; each round one sample of each kind,
        the kinds taking turns to go first, GAP s of quiet after every sample."""
        for r in range(warmup + rounds):
            for kind in KINDS[r % 3 :] + KINDS[: r % 3]:
                got = self.fabric(r) if kind == "fabric" else self.frr(r, kind)
                if r >= warmup:
                    self.samples[kind].append(got)
                time.sleep(GAP)
            n = r + 1 - warmup
            if n == 0 or (n > 0 and n % 10 == 0):
                progress(f"{n}/{rounds} rounds" if n else f"{warmup} warm-up round(s) done")


def hops(kind: str, s: dict[str, float]) -> dict[str, float]:
    """One sample split at the capture points (ms); a stretch whose ends were not both seen
    is left out."""
    ends = {"claim": ("t0", "confirmed"), "announce": ("confirmed", "src"), "host": ("t0", "src"),
            "tor1": ("t0" if kind == "tor" else "src", "tor1"), "spine": ("tor1", "tor2"),
            "tor2": ("tor2", "node3"), "node3": ("node3", "kernel")}  # fmt: skip
    at = {"t0": 0.0, **s}
    return {h: at[b] - at[a] for h, (a, b) in ends.items() if a in at and b in at}


def summarize(samples: dict[str, list[dict[str, float]]], plugin_exec_ms: float) -> dict[str, Any]:
    """Per kind: p50/p99/min/max of t0 -> kernel, and the p50 of each hop (ms)."""
    out: dict[str, Any] = {"bench": "converge", "detail": True}
    for kind, rows in samples.items():
        total = [r["kernel"] for r in rows]
        split = [hops(kind, r) for r in rows]
        seen = [h for h in HOPS if any(h in x for x in split)]
        step = {h: round(percentile([x[h] for x in split if h in x], 0.5), 1) for h in seen}
        out[kind] = {
            "samples": len(rows),
            "p50_ms": round(percentile(total, 0.5), 1),
            "p99_ms": round(percentile(total, 0.99), 1),
            "min_ms": round(min(total, default=0.0), 1),
            "max_ms": round(max(total, default=0.0), 1),
            "hops_p50_ms": step,
            "split_complete": sum(1 for x in split if len(x) == len(seen)),
        }
    out["fabric"]["add_p50_ms"] = round(percentile([r["add"] for r in samples["fabric"]], 0.5), 1)
    out["fabric"]["plugin_exec_p50_ms"] = plugin_exec_ms
    out["ratio_p50_vs_tor"] = round(out["fabric"]["p50_ms"] / out["tor"]["p50_ms"], 3)
    out["loadavg"] = round(os.getloadavg()[0], 2)  # a busy machine widens every tail
    return out


def run(quick: bool = False) -> dict[str, Any]:
    rounds, warmup = (QUICK_SAMPLES, QUICK_WARMUP) if quick else (SAMPLES, WARMUP)
    lab = Lab(TOPOLOGY, name=f"converge-{os.getpid()}", progress=progress)
    bench = Bench(lab, rounds + warmup)
    try:
        lab.up()
        bench.setup()
        progress(f"measuring: {warmup} warm-up + {rounds} rounds of {', '.join(KINDS)}")
        bench.measure(rounds, warmup)
        errors = [e for v in bench.vty.values() for e in v.errors()]
        if errors:
            raise LabError(f"vtysh refused a command: {errors}")
    finally:
        for vty in bench.vty.values():
            vty.close()
        if bench.watch is not None:
            bench.watch.close()
        lab.down()
        for child in bench.children:  # stopped by down(); reaped here
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(5)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "converge-samples.json").write_text(json.dumps(bench.samples, indent=1))
    detail = summarize(bench.samples, bench.plugin_exec_ms)
    print(json.dumps(detail), flush=True)
    fab, frr = detail["fabric"], detail["frr"]
    return {
        "bench": "converge",
        "samples": rounds,
        "p50_ms": fab["p50_ms"],
        "p99_ms": fab["p99_ms"],
        "frr_p50_ms": frr["p50_ms"],
        "ratio_p50": round(fab["p50_ms"] / frr["p50_ms"], 3),
    }
