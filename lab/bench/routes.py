"""Route learning benchmark: fabricd (ExaBGP -> relay -> RIB -> batched netlink) against BIRD.

One lab, one bridge segment: etcd, an ``injector`` BIRD, the fabric ``host`` (fabricd) and a
reference BIRD ``ref``. The injector holds N /32 blackholes from ``PREFIXES`` in a disabled
static protocol exported to both of its peers: ``ref`` (static eBGP, imports everything,
exports BGP routes to its kernel) and ``host`` (fabricd's session to the injector; fabricd
accepts the range through ``importCIDRs``; no prefix limit). The host is given no session
to ``ref``, so both learn exactly the same N routes from the same speaker.

With every session Established, t0 is ``birdc enable`` on the injector: the clock starts at
the announcement, not at session up (a session-up start would add the same connect and
retry delay to both sides). Each side is done when its kernel's main table holds baseline + N
prefixes (``/proc/<pid>/net/fib_triestat`` of a process in its namespace: a walk of the trie,
no dump to parse). Then ``birdc disable``: both times until each kernel is back at baseline.
RSS is the peak (VmHWM) of fabricd and of ExaBGP. CPU seconds are read from /proc/<pid>/stat
for fabricd, ExaBGP and its API process (the relay) from a phase's start until the lab's
daemons are idle again after it (work left behind, a garbage collection, is the phase's).

Before the first N an ``idle`` line: the CPU fabricd, ExaBGP and the relay used over
IDLE_S s with the sessions up and nothing changing, as % of one core. ``--load`` keeps one
core busy with an unrelated process (a Python spin loop pinned to the last CPU, started
after the idle line and ended by pid when the benchmark ends): both sides are measured
under it. Targets at 100,000 (issue 15): both ratios <= 1.5 quiet and <= 2.0 under
``--load``, fabricd + ExaBGP peak RSS <= 200 MB, idle <= 0.3% of a core. One JSON line per
N; the last is the largest N.
"""

from __future__ import annotations

import ipaddress
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lab import render, routers
from lab.runner import Lab
from lab.view import LabError

PREFIXES = ipaddress.IPv4Network("10.100.0.0/15")  # 131,072 /32s, only inside the lab
SIZES, QUICK_SIZES = (10_000, 100_000), (1_000,)
# s between FIB counts: at least POLL_NEAR, at most POLL (see Bench._until)
POLL, POLL_NEAR = 0.05, 0.004
SETTLE = 1.0  # s a count must hold still before a baseline is taken
# Idle: the lab's daemons used at most QUIET[0] CPU seconds in QUIET[1] s (waited up to
# QUIET_MAX s before each phase).
QUIET, QUIET_MAX = (0.02, 0.5), 15.0
# Rounds per n (median reported): this 2-vCPU VM is shared, single runs vary by +-30%.
ROUNDS = 3
IDLE_S, QUICK_IDLE_S = 60.0, 5.0  # s of the idle measurement
HOG = "while True: pass"  # --load: one core kept busy
INJECTOR, HOST, REF = "injector", "host", "ref"
HOST_PROTO = render.ROUTE_PROTOCOL

TOPOLOGY: dict[str, Any] = {
    "name": "routes-bench",
    "topology": {
        "nodes": {
            "etcd": {"labels": {"fabric.role": "etcd", "fabric.etcd.members": "1"}},
            "lan": {"kind": "bridge"},
            INJECTOR: {"labels": {"fabric.role": "bird", "fabric.asn": "65010"}},
            REF: {"labels": {"fabric.role": "bird", "fabric.asn": "65020"}},
            HOST: {"labels": {"fabric.role": "node", "fabric.asn": "64512"}},
        },
        "links": [
            {"endpoints": [f"{INJECTOR}:eth1", "lan:p1"]},
            {"endpoints": [f"{REF}:eth1", "lan:p2"]},
            {"endpoints": [f"{HOST}:eth1", "lan:p3"]},
        ],
    },
}


def progress(msg: str) -> None:
    print(f"[bench routes] {msg}", file=sys.stderr, flush=True)


def static_name(n: int) -> str:
    return f"inject{n}"


def injector_conf(base: str, sizes: tuple[int, ...]) -> str:
    """The lab's bird.conf for the injector plus one disabled static protocol per size (the
    first n /32s of PREFIXES as blackholes), and static routes exported to every peer."""
    marker = "filter to_peers {\n"
    if marker not in base:
        raise LabError("failed to extend the injector's bird.conf: no to_peers filter")
    out = [base.replace(marker, marker + "  if source = RTS_STATIC then accept;\n", 1)]
    first = int(PREFIXES.network_address)
    for n in sizes:
        out.append(f"protocol static {static_name(n)} {{\n  disabled;\n  ipv4;\n")
        out += [f"  route {ipaddress.IPv4Address(first + i)}/32 blackhole;\n" for i in range(n)]
        out.append("}\n")
    return "".join(out)


def fib_prefixes(pid: int) -> int:
    """Prefixes in the main FIB of ``pid``'s network namespace (local ones included)."""
    text = Path(f"/proc/{pid}/net/fib_triestat").read_text()
    section = text.split("\nMain:", 1)[1]
    for line in section.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Prefixes":
            return int(value)
    raise LabError(f"failed to read the FIB size of pid {pid}: no Prefixes line")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """This process's user + system CPU seconds so far (its FIB reads are kernel time)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (every thread's ``children`` list)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LabError(f"failed to read {field} of pid {pid}")


class Bench:
    """The lab of this benchmark, up and converged, and the measurement of one N."""

    def __init__(self, lab: Lab, sizes: tuple[int, ...]) -> None:
        self.lab, self.sizes = lab, sizes
        self.inj_dir = lab.dir / INJECTOR
        self.host_pid = self.ref_pid = self.inj_pid = self.exabgp_pid = self.relay_pid = 0
        self.base = (0, 0)  # FIB sizes (host, ref) before any announcement
        self.peak_kb = 0  # fabricd + ExaBGP VmRSS, sampled around each measurement

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        lab = self.lab
        conf = self.inj_dir / "bird.conf"
        conf.write_text(injector_conf(conf.read_text(), self.sizes))
        r = routers.birdc(self.inj_dir, "configure", timeout=120)
        if r.returncode != 0 or "Reconfigured" not in r.stdout:
            raise LabError(f"failed to reconfigure the injector: {r.stdout}{r.stderr}")
        self._write_resources()
        progress("starting fabricd")
        lab.start_fabric(timeout=90)
        self.host_pid = lab.fabricd_pid(HOST)
        self.ref_pid, self.inj_pid = (
            next(r.pid for r in lab.state.procs if r.node == node and r.what == "bird")
            for node in (REF, INJECTOR)
        )
        lab.wait_for(self._sessions_up, 60, 0.5, "the injector's sessions to be Established")
        self.exabgp_pid = lab.wait_for(self._exabgp_pid, 30, 0.5, "fabricd's status document")
        self.relay_pid = lab.wait_for(
            lambda: next(iter(children(self.exabgp_pid)), 0), 30, 0.2, "ExaBGP's API process"
        )
        self.base = self._baseline()
        progress(f"sessions up; baseline FIB sizes host {self.base[0]}, ref {self.base[1]}")

    def _write_resources(self) -> None:
        """The lab's resources, with the host peering only with the injector and accepting
        PREFIXES (importCIDRs); no maxPrefixes on that peer."""
        ref_ip = self.lab.address(REF)
        docs = []
        for doc in render.fabric_resources(self.lab.plan):
            if doc["kind"] == "BGPPeer" and doc["spec"]["peerIP"] == ref_ip:
                continue
            if doc["kind"] == "BGPConfiguration":
                doc["spec"]["importCIDRs"] = [str(PREFIXES)]
            docs.append(doc)
        path = self.lab.dir / "fabric-resources.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))

    def _sessions_up(self) -> bool:
        inj = routers.bird_sessions(self.inj_dir)
        ref = routers.bird_sessions(self.lab.dir / REF)
        dyn = [s for name, s in inj.items() if name.startswith("h0_")]
        return (
            inj.get(f"r_{REF}") == "Established"
            and ref.get(f"r_{INJECTOR}") == "Established"
            and "Established" in dyn
        )

    def _exabgp_pid(self) -> int:
        """ExaBGP's pid from fabricd's status document once its session is up, else 0."""
        r = self.lab.fabricctl(["bgp", "status", "--node", HOST, "-o", "json"])
        if r.returncode != 0:
            return 0
        doc = json.loads(r.stdout)
        doc = doc[0] if isinstance(doc, list) and doc else doc
        sessions = doc.get("sessions") or [{}]
        if sessions[0].get("state") != "up":
            return 0
        return int((doc.get("speaker") or {}).get("pid") or 0)

    def _baseline(self) -> tuple[int, int]:
        last = (-1, -1)
        while True:
            now = (fib_prefixes(self.host_pid), fib_prefixes(self.ref_pid))
            if now == last:
                return now
            last = now
            time.sleep(SETTLE)

    # ------------------------------------------------------------------ one N

    def _until(self, t0: float, want: tuple[int, int], n: int, timeout: float) -> list[float]:
        """Poll the host's and the reference's FIB until each holds ``want`` prefixes (or
        more when adding, fewer when removing); each one's time since ``t0``.

        A count walks the trie (2.5 ms of kernel time at 100k prefixes) and this VM has two
        cores, which both sides need: the poll must cost little. Sides already done are not
        read again, and the next read is due at half of the soonest expected finish (the
        rest of the way at each side's average rate so far), between POLL_NEAR and POLL
        apart; before either side moved, at half the time since ``t0``. 0.09-0.15 s of CPU
        per 100k phase (was a read every 4-50 ms: 0.25-0.29 s per phase, taken from the two
        cores both measured sides run on)."""
        pids, at = (self.host_pid, self.ref_pid), [0.0, 0.0]
        adding = want[0] > self.base[0]
        start = self.base if adding else (self.base[0] + n, self.base[1] + n)
        todo = {0, 1}
        while todo:
            wait = POLL
            for i in sorted(todo):
                count, t = fib_prefixes(pids[i]), time.monotonic() - t0
                if (count - want[i]) * (1 if adding else -1) >= 0:
                    at[i] = t
                    todo.discard(i)
                elif t > timeout:
                    side = (HOST, REF)[i]
                    raise LabError(
                        f"timed out after {timeout:.0f} s: {side} has {count} prefixes "
                        f"({self._diagnose()})"
                    )
                else:
                    done = abs(count - start[i])
                    left = abs(want[i] - count)
                    wait = min(wait, t / 2 if done == 0 else left * t / done / 2)
            self.peak_kb = max(self.peak_kb, self._rss_kb())
            if todo:
                time.sleep(max(POLL_NEAR, wait))
        return at

    def _diagnose(self) -> str:
        """What a timed-out phase leaves to look at: sessions on both sides, fabricd's log."""
        inj = routers.bird_sessions(self.inj_dir)
        status = self.lab.fabricctl(["bgp", "status", "--node", HOST, "-o", "json"]).stdout
        out = self.lab.dir / HOST / "fabricd.out"
        tail = out.read_text(errors="replace")[-1500:] if out.exists() else "(no fabricd.out)"
        return f"injector sessions {inj}; fabricd bgp status {status[:600]}; fabricd.out: {tail}"

    def _rss_kb(self) -> int:
        return status_kb(self.host_pid, "VmRSS") + status_kb(self.exabgp_pid, "VmRSS")

    def _birdc(self, command: str) -> None:
        r = routers.birdc(self.inj_dir, command, timeout=30)
        if r.returncode != 0:
            raise LabError(f"failed to run birdc {command} on the injector: {r.stderr}")

    def _cpu(self) -> tuple[float, float, float]:
        """CPU seconds so far of fabricd, ExaBGP and the relay."""
        return cpu_s(self.host_pid), cpu_s(self.exabgp_pid), cpu_s(self.relay_pid)

    def idle(self, seconds: float) -> dict[str, Any]:
        """The idle line: CPU of fabricd, ExaBGP and the relay over ``seconds`` with the
        sessions up and nothing changing, % of one core; their RSS now."""
        self._quiet()
        t0, cpu0 = time.monotonic(), self._cpu()
        time.sleep(seconds)
        cpu, dt = self._cpu(), time.monotonic() - t0
        pct = [round(100 * (b - a) / dt, 3) for a, b in zip(cpu0, cpu, strict=True)]
        return {
            "bench": "routes",
            "idle_s": round(dt, 1),
            "idle_pct": round(pct[0] + pct[1] + pct[2], 3),
            "fabricd_idle_pct": pct[0],
            "exabgp_idle_pct": pct[1],
            "relay_idle_pct": pct[2],
            "fabricd_idle_rss_mb": round(status_kb(self.host_pid, "VmRSS") / 1024, 1),
            "exabgp_idle_rss_mb": round(status_kb(self.exabgp_pid, "VmRSS") / 1024, 1),
        }

    def _quiet(self) -> None:
        """Wait until fabricd, ExaBGP and both BIRDs are idle (work left over from the last
        phase, a deferred garbage collection for one, would be billed to the next)."""
        pids = [self.host_pid, self.exabgp_pid, self.ref_pid, self.inj_pid]
        end, last = time.monotonic() + QUIET_MAX, sum(map(cpu_s, pids))
        while time.monotonic() < end:
            time.sleep(QUIET[1])
            now = sum(map(cpu_s, pids))
            if now - last <= QUIET[0]:
                return
            last = now
        progress(f"still busy after {QUIET_MAX:.0f} s; measuring anyway")

    def measure(self, n: int) -> dict[str, float]:
        """One round: announce n, wait for both kernels, withdraw, wait again. Times in s,
        CPU seconds of fabricd and ExaBGP while installing."""
        timeout = 30 + n / 1000
        self._quiet()
        t0, cpu0 = time.monotonic(), self._cpu()
        self._birdc(f"enable {static_name(n)}")
        probe0 = own_cpu_s()
        install = self._until(t0, (self.base[0] + n, self.base[1] + n), n, timeout)
        probe = own_cpu_s() - probe0
        self._quiet()  # work a phase leaves behind (a garbage collection) is its own
        cpu = [b - a for a, b in zip(cpu0, self._cpu(), strict=True)]
        installed = self._proto_count(HOST, str(HOST_PROTO)), self._proto_count(REF, "bird")
        if installed != (n, n):
            raise LabError(f"n={n}: {installed[0]} routes in the host's kernel with protocol "
                           f"{HOST_PROTO}, {installed[1]} in the reference's")  # fmt: skip
        self._quiet()
        t0, wcpu0 = time.monotonic(), self._cpu()
        self._birdc(f"disable {static_name(n)}")
        probe0 = own_cpu_s()
        withdraw = self._until(t0, self.base, n, timeout)
        wprobe = own_cpu_s() - probe0
        self._quiet()
        wcpu = [b - a for a, b in zip(wcpu0, self._cpu(), strict=True)]
        progress(
            f"n={n}: installed in {install[0]:.2f} s (fabric) / {install[1]:.2f} s (BIRD), "
            f"withdrawn in {withdraw[0]:.2f} s / {withdraw[1]:.2f} s"
        )
        return {
            "fabric_install_s": install[0],
            "bird_install_s": install[1],
            "fabric_withdraw_s": withdraw[0],
            "bird_withdraw_s": withdraw[1],
            "fabricd_cpu_s": cpu[0],
            "exabgp_cpu_s": cpu[1],
            "relay_cpu_s": cpu[2],
            "fabricd_withdraw_cpu_s": wcpu[0],
            "exabgp_withdraw_cpu_s": wcpu[1],
            "relay_withdraw_cpu_s": wcpu[2],
            "probe_install_cpu_s": probe,
            "probe_withdraw_cpu_s": wprobe,
            "fabric_routes": installed[0],
            "bird_routes": installed[1],
        }

    def row(self, n: int, rounds: list[dict[str, float]], extra: dict[str, Any]) -> dict[str, Any]:
        """The JSON line of one n: median times and median per-round ratios (a round's two
        sides ran at the same time, under the same load), peak RSS."""

        def med(key: str) -> float:
            return round(statistics.median(r[key] for r in rounds), 3)

        def ratios(side: str) -> list[float]:
            return [round(r[f"fabric_{side}_s"] / r[f"bird_{side}_s"], 3) for r in rounds]

        return {
            "bench": "routes",
            "n": n,
            "fabric_install_s": med("fabric_install_s"),
            "bird_install_s": med("bird_install_s"),
            "install_ratio": round(statistics.median(ratios("install")), 3),
            "fabric_withdraw_s": med("fabric_withdraw_s"),
            "bird_withdraw_s": med("bird_withdraw_s"),
            "withdraw_ratio": round(statistics.median(ratios("withdraw")), 3),
            "fabricd_rss_mb": round(status_kb(self.host_pid, "VmHWM") / 1024, 1),
            "exabgp_rss_mb": round(status_kb(self.exabgp_pid, "VmHWM") / 1024, 1),
            "rounds": len(rounds),
            "install_ratios": ratios("install"),
            "withdraw_ratios": ratios("withdraw"),
            "fabricd_install_cpu_s": med("fabricd_cpu_s"),
            "exabgp_install_cpu_s": med("exabgp_cpu_s"),
            "fabricd_withdraw_cpu_s": med("fabricd_withdraw_cpu_s"),
            "exabgp_withdraw_cpu_s": med("exabgp_withdraw_cpu_s"),
            "relay_install_cpu_s": med("relay_cpu_s"),
            "relay_withdraw_cpu_s": med("relay_withdraw_cpu_s"),
            "probe_install_cpu_s": med("probe_install_cpu_s"),
            "probe_withdraw_cpu_s": med("probe_withdraw_cpu_s"),
            "rss_sampled_mb": round(self.peak_kb / 1024, 1),
            "fabric_routes": min(int(r["fabric_routes"]) for r in rounds),
            "bird_routes": min(int(r["bird_routes"]) for r in rounds),
            **extra,
        }

    def _proto_count(self, node: str, proto: str) -> int:
        """Routes of ``proto`` in ``node``'s main table inside PREFIXES (one dump)."""
        cmd = f"ip -4 route show proto {proto} root {PREFIXES} | wc -l"
        return int(self.lab.exec(node, cmd, timeout=60, check=True).stdout.strip() or 0)


KEYS = ("bench", "n", "fabric_install_s", "bird_install_s", "install_ratio",
        "fabric_withdraw_s", "bird_withdraw_s", "withdraw_ratio", "fabricd_rss_mb",
        "exabgp_rss_mb", "idle_pct", "load")  # fmt: skip


def hog() -> subprocess.Popen[bytes]:
    """--load: a Python spin loop pinned to the last CPU (ended by the caller, by pid)."""
    cpu = str((os.cpu_count() or 1) - 1)
    return subprocess.Popen(["taskset", "-c", cpu, sys.executable, "-c", HOG])


def run(quick: bool = False, load: bool = False) -> dict[str, Any]:
    sizes = QUICK_SIZES if quick else SIZES
    lab = Lab(TOPOLOGY, name=f"routes-bench-{os.getpid()}", progress=progress)
    rows = []
    spin: subprocess.Popen[bytes] | None = None
    try:
        lab.up()
        bench = Bench(lab, sizes)
        bench.setup()
        idle = bench.idle(QUICK_IDLE_S if quick else IDLE_S)
        print(json.dumps(idle), flush=True)
        progress(f"idle: {idle['idle_pct']}% of a core (fabricd, ExaBGP, relay)")
        if load:
            spin = hog()
            progress(f"--load: pid {spin.pid} keeps CPU {os.cpu_count() or 1} - 1 busy")
        extra = {"idle_pct": idle["idle_pct"], "load": load}
        for n in sizes:
            bench.peak_kb = 0
            rounds = [bench.measure(n) for _ in range(1 if quick else ROUNDS)]
            rows.append(bench.row(n, rounds, extra))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
        lab.down()
    return {k: rows[-1][k] for k in KEYS}
