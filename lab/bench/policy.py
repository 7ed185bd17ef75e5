"""NetworkPolicy benchmark: how fast a change is enforced, what policy costs a CNI ADD, a
cold start and the packets, in the two-rack lab with fabricd on its four hosts.

The driver brings the lab up, then runs a worker (this module with ``--worker``) inside
node1's network namespace (``nsenter --net``; etcd is reachable only from the lab's
namespaces). The client pod ``bench/client`` is on node1 (rack 1), the server pod
``bn-<last>/server`` on node3 (rack 2), each with lab/netpol_agent.py serving TCP 80/81 and
detecting flips: the client starts a TCP connection to the server every 2 ms and reports
the CLOCK_MONOTONIC time of the first that completes, so a timing runs from just before a
change is written to etcd to the first connection the remote node lets through.

Phases, in order (one run, so every ratio compares measurements of the same machine state):
1. no policy: ``tput_base`` (iperf3 TCP, client to server, across the racks),
   ``conn_base`` (new TCP connections per second), CNI ADD p50 on node1 (``add_base``).
2. floor: a watcher in node3's namespace (policy_load.py) turns an etcd put under its own key
   into one ``nft -f`` adding a set element to a table of its own that drops client to
   server: etcd write -> watch event -> nft -> first connection: ``floor_p50_ms``.
3. load: 1,000 policies, 5,000 remote endpoints (allocations on nodes that do not exist,
   with their Pod objects), namespaces; wait until both fabricds are idle.
4. ``add_policy``: CNI ADD p50 on node1 with the load (the pods are isolated by a policy).
5. ``apply``: a policy allowing the client is written (PolicyStore.apply, the code path of
   ``fabricctl apply`` without the interpreter start) until node3 lets it through; then
   deleted and blocked again (untimed). ``samples`` times.
6. ``update``: the client's label change that moves it into the last policy's selector,
   until allowed; ``update_bytes`` is what ``nft monitor`` on node3 printed for it (the
   change as the kernel reports it: a set element, not a table).
7. with the load and the client allowed by the last policy: ``tput_pol``, ``conn_pol``.
8. cold start: 250 local pods on node1; fabricd stopped, its table deleted, started again:
   ``program_cold_s`` until its pod set holds every local pod (its snapshot restored, see
   docs/design/policy.md), ``compile_cold_s`` until the first table computed from etcd is
   written (fabricd's start-up phases); ``_nosnap``: the same without the snapshot file;
   ``floor_cold_s``: ``nft -f`` of the table it wrote; ``fabricd_rss_mb`` before that.

Targets (issue 11): apply p99 <= 250 ms, apply_ratio <= 3, add_ratio_policy <= 1.25,
cold_ratio <= 3, tput_ratio >= 0.9, conn_rate_ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fabric.dataplane.nft import Nft
from fabric.resources.policy_codec import POD, decode
from fabric.resources.policy_store import NETWORKPOLICIES as NETPOLS
from fabric.resources.policy_store import PolicyStore
from ipam.store import Store
from lab import netns, netpol, pods
from lab.bench import policy_load as load
from lab.bench.cni import Worker, libcni_conf
from lab.bench.policy_node import Monitor, batches, pod_set_size_here, rss_mb, start_phases
from lab.ipam_load import percentile
from lab.runner import Lab
from lab.view import LabError

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/fabric/v1"
CLIENT_HOST, SERVER_HOST = "node1", "node3"
GHOSTS = ("ghost1", "ghost2", "ghost3", "ghost4")  # nodes of the remote endpoints
FULL = {"policies": 1000, "namespaces": 50, "remote": 5000, "local": 250, "samples": 50,
        "adds": 50, "tput_s": 5.0, "conn_s": 3.0, "runs": 3}  # fmt: skip
QUICK = {"policies": 20, "namespaces": 2, "remote": 100, "local": 5, "samples": 5,
         "adds": 10, "tput_s": 1.0, "conn_s": 1.0, "runs": 1}  # fmt: skip
KEYS = ("bench", "policies", "remote_endpoints", "local_pods", "samples", "apply_p50_ms",
        "apply_p99_ms", "floor_p50_ms", "apply_ratio", "add_ratio_policy", "program_cold_s",
        "floor_cold_s", "cold_ratio", "compile_cold_s", "program_cold_nosnap_s", "update_p99_ms", "update_bytes_p50", "tput_ratio",
        "conn_rate_ratio", "fabricd_rss_mb")  # fmt: skip
CONN_RATE = """
import json, socket, sys, time
ip, port, dur = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
n = failed = 0
lost = 0.0
t0 = time.monotonic()
while time.monotonic() - t0 < dur:
    t = time.monotonic()
    try:
        socket.create_connection((ip, port), timeout=1).close()
        n += 1
    except OSError:
        failed += 1
        lost += time.monotonic() - t
print(json.dumps({"rate": n / (time.monotonic() - t0 - lost), "failed": failed}))
"""  # the rate of answered attempts: one lost SYN waits out the 1 s timeout (Linux resends
# a SYN after 1 s), which in a 1 s quick run would be most of the run; failures are counted


def progress(msg: str) -> None:
    print(f"[bench policy] {msg}", file=sys.stderr, flush=True)


def ms(samples: list[float], q: float) -> float:
    return round(percentile(samples, q) * 1000, 2)


class Bench:
    """The worker's state: the lab, one etcd client on one event loop, the two pods."""

    def __init__(self, lab: Lab, size: dict[str, Any]) -> None:
        self.lab, self.size = lab, size
        self.loop = asyncio.new_event_loop()
        self.store = Store(list(lab.etcd_endpoints), PREFIX)
        self.ps = PolicyStore(self.store)
        self.server_ns = load.ns_name(size["namespaces"] - 1)
        self.row: dict[str, Any] = {"bench": "policy"}
        self.procs: list[subprocess.Popen[Any]] = []

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def apply(self, docs: list[dict[str, Any]]) -> None:
        self.run(self.ps.apply([decode(d) for d in docs]))

    # ------------------------------------------------------------------ pods and probes
    def setup(self) -> None:
        ns_docs = load.namespaces(self.size["namespaces"])
        self.apply(ns_docs)
        client_doc = netpol.pod_doc(load.CLIENT_NS, "client", {"role": "idle"})
        server_doc = netpol.pod_doc(self.server_ns, "server", {"app": "server", "tier": "web"})
        self.apply([client_doc, server_doc])
        self.client = netpol.attach(self.lab, CLIENT_HOST, f"{load.CLIENT_NS}/client")
        self.server = netpol.attach(self.lab, SERVER_HOST, f"{self.server_ns}/server")
        self.client.ready()
        self.server.ready()
        self.sip = self.server.ips[4]
        self.wait(True, 30)
        argv = ["ip", "netns", "exec", self.server.pod.netns_name, "iperf3", "-s"]
        self.procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))  # fmt: skip

    def flip(self, change: Callable[[], Any], timeout: float = 10.0) -> float:
        """Seconds from just before ``change()`` to the first connection let through."""
        self.client.send({"watch": [self.sip, 80], "want": True, "interval": 0.002,
                          "timeout": timeout})  # fmt: skip
        if not self.client.receive().get("watching"):
            raise LabError("the client's agent did not start watching")
        t0 = time.monotonic()
        change()
        got = self.client.receive()
        if got["t"] is None:
            raise LabError(f"the server was not reachable within {timeout:.0f} s of a change")
        return float(got["t"]) - t0

    def wait(self, allowed: bool, timeout: float = 20.0) -> None:
        """Until client -> server TCP 80 is allowed (or blocked)."""
        self.client.send({"watch": [self.sip, 80], "want": allowed, "interval": 0.01,
                          "timeout": timeout})  # fmt: skip
        self.client.receive()
        if self.client.receive()["t"] is None:
            state = "allowed" if allowed else "blocked"
            raise LabError(f"client -> server not {state} within {timeout:.0f} s")

    def tput(self) -> float:
        """iperf3 TCP client -> server, Gbit/s received: the median of ``runs`` runs."""
        return statistics.median(self._tput() for _ in range(self.size["runs"]))

    def _tput(self) -> float:
        argv = ["ip", "netns", "exec", self.client.pod.netns_name, "iperf3", "-c", self.sip,
                "-t", str(self.size["tput_s"]), "-J"]  # fmt: skip
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if r.returncode != 0:
            raise LabError(f"iperf3 failed: {r.stdout[-500:]} {r.stderr[-500:]}")
        bps = json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"]
        return round(float(bps) / 1e9, 3)

    def conn_rate(self) -> tuple[float, int]:
        """New TCP connections per second, client -> server:80, one at a time (the median
        of ``runs`` runs); and how many attempts failed (no answer within 1 s)."""
        got = [self._conn_rate() for _ in range(self.size["runs"])]
        return statistics.median(r for r, _ in got), sum(f for _, f in got)

    def _conn_rate(self) -> tuple[float, int]:
        # the client's closed connections sit in TIME_WAIT for 60 s: without reuse, the
        # phases after the first (~5,000 connections/s) ran out of ephemeral ports and
        # connect() crawled (a --quick run's second no-policy phase: 199/s against 11,479/s)
        netns.sysctls(self.client.pod.netns_name, {"net.ipv4.tcp_tw_reuse": "1"})
        argv = ["ip", "netns", "exec", self.client.pod.netns_name, netpol.AGENT_PYTHON, "-I",
                "-S", "-c", CONN_RATE, self.sip, "80", str(self.size["conn_s"])]  # fmt: skip
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if r.returncode != 0:
            raise LabError(f"the connection-rate loop failed: {r.stderr[-500:]}")
        got = json.loads(r.stdout)
        return round(float(got["rate"]), 1), int(got["failed"])

    def adds(self, n: int) -> float:
        """CNI ADD p50 (ms) of ``n`` ADD/DEL cycles of the installed plugin on node1."""
        d = self.lab.dir / CLIENT_HOST / "cni"
        conf = libcni_conf(json.loads((d / "net.d" / "10-fabric.conflist").read_text()))
        w = Worker(self.lab, d / "bin", conf, {"type": "ptp"})
        for i in range(n + 3):
            w.cycle("fabric", record=i >= 3)
        return ms(w.samples["fabric_add"], 0.5)

    # ------------------------------------------------------------------ phases
    def base(self) -> None:
        progress("no policy: iperf3, connection rate, CNI ADDs")
        for host in (CLIENT_HOST, SERVER_HOST):
            self.settle(host)
        self.row["tput_base_gbps"] = self.tput()
        self.row["conn_base_per_s"], self.row["conn_base_failed"] = self.conn_rate()
        self.row["add_base_p50_ms"] = self.adds(self.size["adds"])

    def floor(self) -> None:
        progress(f"floor: etcd watch -> nft -f on {SERVER_HOST}, {self.size['samples']} samples")
        cip = self.client.ips[4]
        self.lab.exec(SERVER_HOST, ["nft", "-f", "-"], check=True,
                      input=load.floor_table(cip, self.sip))  # fmt: skip
        argv = ["ip", "netns", "exec", self.lab.netns(SERVER_HOST), sys.executable, "-m",
                "lab.bench.policy_load", "--floor", "--endpoints", ",".join(self.lab.etcd_endpoints),
                "--prefix", PREFIX, "--key", "bench/floor", "--client", cip]  # fmt: skip
        w = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.procs.append(w)
        assert w.stdout is not None
        w.stdout.readline()  # {"watching": rev}
        samples = []
        try:
            self.wait(False)
            for _ in range(self.size["samples"]):
                samples.append(self.flip(lambda: self.run(self.store.put("bench/floor", b"allow"))))
                self.run(self.store.put("bench/floor", b"deny"))
                self.wait(False)
        finally:
            w.terminate()
            w.wait(10)
            self.lab.exec(SERVER_HOST, ["nft", "delete", "table", "inet", load.FLOOR_TABLE])
        self.row["floor_p50_ms"] = ms(samples, 0.5)
        self.row["floor_p99_ms"] = ms(samples, 0.99)
        self.wait(True)

    def load(self) -> None:
        s = self.size
        progress(f"load: {s['policies']} policies, {s['remote']} remote endpoints")
        t = time.monotonic()
        eps = list(self.lab.etcd_endpoints)
        per = s["remote"] // len(GHOSTS)

        async def allocate() -> None:
            await asyncio.gather(*(load.allocate_remote(eps, PREFIX, g, i * per, per,
                                                        s["namespaces"])
                                   for i, g in enumerate(GHOSTS)))  # fmt: skip

        self.run(allocate())
        self.apply([load.remote_pod(load.ns_name(k % s["namespaces"]), k)
                    for k in range(per * len(GHOSTS))])  # fmt: skip
        self.apply(load.policies(s["policies"], s["namespaces"]))
        self.row["load_s"] = round(time.monotonic() - t, 1)
        self.wait(False, 120)  # the server is isolated: node3 has the policies
        for host in (CLIENT_HOST, SERVER_HOST):
            self.settle(host)

    def cpu(self, host: str, children: bool = False) -> float:
        """CPU seconds fabricd on ``host`` has used (user + system), or its reaped
        children have (the nft execs)."""
        stat = Path(f"/proc/{self.lab.fabricd_pid(host)}/stat")
        f = stat.read_text().rsplit(")", 1)[1].split()
        i = 13 if children else 11
        return (int(f[i]) + int(f[i + 1])) / os.sysconf("SC_CLK_TCK")

    def cpus(self) -> tuple[float, float]:
        return self.cpu(SERVER_HOST), self.cpu(SERVER_HOST, children=True)

    def settle(self, host: str, timeout: float = 300.0) -> None:
        """Until fabricd on ``host`` used under 5% of a CPU over one second."""

        def cpu() -> float:
            return self.cpu(host)

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            before = cpu()
            time.sleep(1.0)
            if cpu() - before < 0.05:
                return
        raise LabError(f"fabricd in {host} still busy after {timeout:.0f} s")

    def note_batches(self, what: str, before: tuple[float, int],
                     cpu0: tuple[float, float]) -> None:  # fmt: skip
        """The mean wall duration of node3's policy batches since ``before`` (fabricd's own
        clock: compile, render, nft) and fabricd's CPU per batch since ``cpu0`` (every
        batch's work, whatever the machine's load), to split the timings."""
        after = batches(self.lab, SERVER_HOST)
        n = after[1] - before[1]
        self.row[f"{what}_batches"] = n
        self.row[f"{what}_batch_mean_ms"] = round((after[0] - before[0]) / n * 1000, 2) if n else 0
        cpu = self.cpu(SERVER_HOST) - cpu0[0]
        nft = self.cpu(SERVER_HOST, children=True) - cpu0[1]
        self.row[f"{what}_cpu_per_batch_ms"] = round(cpu / n * 1000, 2) if n else 0
        self.row[f"{what}_nft_cpu_per_batch_ms"] = round(nft / n * 1000, 2) if n else 0

    def apply_samples(self) -> None:
        progress(f"apply: {self.size['samples']} policies applied until enforced on {SERVER_HOST}")
        doc = netpol.substitute({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"namespace": self.server_ns, "name": "flip"},
               "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                            "kubernetes.io/metadata.name": load.CLIENT_NS}},
                            "podSelector": {"matchLabels": {"role": "idle"}}}],
                            "ports": [{"protocol": "TCP", "port": 80}]}]}}, {})  # fmt: skip
        obj = decode(doc)
        samples = []
        before, cpu0 = batches(self.lab, SERVER_HOST), self.cpus()
        for _ in range(self.size["samples"]):
            samples.append(self.flip(lambda: self.run(self.ps.apply([obj]))))
            self.run(self.ps.delete("NetworkPolicy", "flip", self.server_ns))
            self.wait(False)
        self.note_batches("apply", before, cpu0)
        self.row["apply_p50_ms"] = ms(samples, 0.5)
        self.row["cli_apply_p50_ms"] = self.cli_apply(doc)
        self.row["apply_p99_ms"] = ms(samples, 0.99)
        self.row["apply_ratio"] = round(self.row["apply_p50_ms"] / self.row["floor_p50_ms"], 3)

    def cli_apply(self, doc: dict[str, Any]) -> float:
        """What ``fabricctl apply -f`` of the same policy takes until it returns (interpreter
        start, imports, the write): context for apply_*, which starts at the write."""
        path = self.lab.dir / "flip.yaml"
        path.write_text(json.dumps(doc))
        took = []
        for _ in range(max(2, self.size["samples"] // 10)):
            t0 = time.monotonic()
            self.lab.fabricctl(["apply", "-f", str(path)], CLIENT_HOST)
            took.append(time.monotonic() - t0)
            self.run(self.ps.delete("NetworkPolicy", "flip", self.server_ns))
        self.wait(False)
        return ms(took, 0.5)

    def update_samples(self) -> None:
        progress(f"update: {self.size['samples']} label changes until enforced")
        mon = Monitor(self.lab, SERVER_HOST)
        samples, sizes = [], []
        before, cpu0 = batches(self.lab, SERVER_HOST), self.cpus()
        try:
            for _ in range(self.size["samples"]):
                t0 = time.monotonic()
                took = self.flip(lambda: self.run(
                    self.ps.label(POD, "client", load.CLIENT_NS, {"role": "client"}, ())))  # fmt: skip
                time.sleep(0.2)  # the rest of the transaction's lines
                samples.append(took)
                sizes.append(mon.bytes_between(t0, time.monotonic()))
                self.run(self.ps.label(POD, "client", load.CLIENT_NS, {"role": "idle"}, ()))
                self.wait(False)
        finally:
            mon.stop()
        self.note_batches("update", before, cpu0)
        self.row["update_p50_ms"] = ms(samples, 0.5)
        self.row["update_p99_ms"] = ms(samples, 0.99)
        self.row["update_bytes_p50"] = int(percentile([float(x) for x in sizes], 0.5))

    def with_policies(self) -> None:
        progress("with the policies: iperf3, connection rate, CNI ADDs")
        self.row["add_policy_p50_ms"] = self.adds(self.size["adds"])
        self.row["add_ratio_policy"] = round(
            self.row["add_policy_p50_ms"] / self.row["add_base_p50_ms"], 3)  # fmt: skip
        self.run(self.ps.label(POD, "client", load.CLIENT_NS, {"role": "client"}, ()))
        self.wait(True)
        for host in (CLIENT_HOST, SERVER_HOST):  # the ADDs' batches done, as before the load
            self.settle(host)
        self.row["tput_pol_gbps"] = self.tput()
        self.row["conn_pol_per_s"], self.row["conn_pol_failed"] = self.conn_rate()
        self.base_again()
        tput_base = (self.row["tput_base_gbps"] + self.row["tput_base2_gbps"]) / 2
        conn_base = (self.row["conn_base_per_s"] + self.row["conn_base2_per_s"]) / 2
        self.row["tput_ratio"] = round(self.row["tput_pol_gbps"] / tput_base, 3)
        self.row["conn_rate_ratio"] = round(self.row["conn_pol_per_s"] / conn_base, 3)

    def base_again(self) -> None:
        """The no-policy packet figures once more (every policy deleted, then applied
        again): the ratios compare with the mean of before and after, so a drift of the
        shared machine's load between the phases cancels out (A-B-A)."""
        progress("no policy again: iperf3, connection rate")
        docs = load.policies(self.size["policies"], self.size["namespaces"])
        self.run(self.store.delete(NETPOLS, prefix=True))
        for host in (CLIENT_HOST, SERVER_HOST):
            self.settle(host)
        self.row["tput_base2_gbps"] = self.tput()
        self.row["conn_base2_per_s"], self.row["conn_base2_failed"] = self.conn_rate()
        self.apply(docs)
        self.wait(True)
        for host in (CLIENT_HOST, SERVER_HOST):
            self.settle(host)

    def cold(self) -> None:
        n = self.size["local"]
        progress(f"cold start: {n} local pods on {CLIENT_HOST}")
        ns = load.ns_name(0)
        self.apply([netpol.pod_doc(ns, f"l-{i:04d}", {"tier": "web", "app": f"app-{i % 10}"})
                    for i in range(n)])  # fmt: skip
        for i in range(n):
            pods.add(self.lab, CLIENT_HOST, f"{ns}-l-{i:04d}",
                     args=f";K8S_POD_NAMESPACE={ns};K8S_POD_NAME=l-{i:04d}")  # fmt: skip
        want = n + 1  # and the client
        self.settle(CLIENT_HOST)
        self.row["fabricd_rss_mb"] = rss_mb(self.lab.fabricd_pid(CLIENT_HOST))
        snapshot = pods.state_dir(self.lab, CLIENT_HOST) / "policy-table.nft"
        out = self.lab.dir / CLIENT_HOST / "fabricd.out"  # "restored the snapshot": counted
        nft = Nft()  # this worker runs in CLIENT_HOST's namespace: polled in process
        for key, keep in (("", True), ("_nosnap", False)):  # with fabricd's snapshot, without
            self.lab.stop_fabricd(CLIENT_HOST)  # (a clean stop writes the snapshot)
            self.lab.exec(CLIENT_HOST, ["nft", "delete", "table", "inet", "fabric_filter"],
                          check=True)  # fmt: skip
            if not keep:
                snapshot.unlink(missing_ok=True)
            before = out.read_text(errors="replace").count("restored the snapshot")
            t0 = time.monotonic()
            self.lab.start_fabricd(CLIENT_HOST)
            self.lab.wait_for(lambda: pod_set_size_here(nft, self.run) >= want, 300, 0.002,
                              what=f"{want} pods in fabric_filter on {CLIENT_HOST}")  # fmt: skip
            self.row[f"program_cold{key}_s"] = round(time.monotonic() - t0, 3)
            phases = self.lab.wait_for(lambda: start_phases(self.lab, CLIENT_HOST), 120, 0.05,
                                       what=f"fabricd ready on {CLIENT_HOST}")  # fmt: skip
            self.row[f"compile_cold{key}_s"] = phases and phases["policy"]  # from its start
            self.row[f"start_phases{key}"] = phases
            after = out.read_text(errors="replace").count("restored the snapshot")
            self.row[f"snapshot_restored{key}"] = after > before
            self.settle(CLIENT_HOST)
        text = self.lab.exec(CLIENT_HOST, ["nft", "list", "table", "inet", "fabric_filter"],
                             check=True).stdout  # fmt: skip
        self.row["table_bytes"] = len(text)
        self.lab.stop_fabricd(CLIENT_HOST)
        self.lab.exec(CLIENT_HOST, ["nft", "delete", "table", "inet", "fabric_filter"], check=True)
        t0 = time.monotonic()
        self.lab.exec(CLIENT_HOST, ["nft", "-f", "-"], check=True, input=text, timeout=300)
        self.row["floor_cold_s"] = round(time.monotonic() - t0, 3)
        self.row["cold_ratio"] = round(self.row["program_cold_s"] / self.row["floor_cold_s"], 3)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
        for pod in (getattr(self, "client", None), getattr(self, "server", None)):
            if pod is not None:
                pod.stop()
        self.run(self.store.close())
        self.loop.close()


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench.policy --worker")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--lab", required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    size = QUICK if args.quick else FULL
    b = Bench(Lab.attach(args.lab), size)
    try:
        b.setup()
        b.base()
        b.floor()
        b.load()
        b.apply_samples()
        b.update_samples()
        b.with_policies()
        b.cold()
    finally:
        b.close()
    row = {**b.row, "policies": size["policies"], "remote_endpoints": size["remote"],
           "local_pods": size["local"], "samples": size["samples"],
           "loadavg": round(os.getloadavg()[0], 2)}  # fmt: skip
    print(json.dumps(row), flush=True)
    return 0


def run(quick: bool = False) -> dict[str, Any]:
    lab = Lab("two-rack", name=f"policy-bench-{os.getpid()}", progress=progress)
    try:
        lab.up()
        for router in (*lab.nodes("frr"), *lab.nodes("bird")):
            lab.wait_for(functools.partial(lab.established, router), 60,
                         what=f"BGP sessions of {router}")  # fmt: skip
        lab.start_fabric(timeout=90)
        pods.install(lab)
        argv = ["nsenter", f"--net={netns.NETNS_DIR / lab.netns(CLIENT_HOST)}", sys.executable,
                "-m", "lab.bench.policy", "--worker", "--lab", lab.name,
                *(["--quick"] if quick else [])]  # fmt: skip
        r = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=3600, check=False,
                           stdin=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip
        if r.returncode != 0:
            for host in (CLIENT_HOST, SERVER_HOST):
                log = lab.dir / host / "fabricd.out"
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                progress(f"fabricd.out of {host}, last lines:\n{tail}")
            raise LabError(f"the benchmark worker failed ({r.returncode})")
        row: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        lab.down()
    print(json.dumps(row), flush=True)
    return {k: row[k] for k in KEYS if k in row}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
