"""CNI benchmark: the installed ``fabric`` plugin against Debian's ``ptp`` + ``host-local``.

One lab: etcd and one host running fabricd. ``fabricctl cni install`` writes the plugin into
the lab directory. A worker (this module with ``--worker``) runs inside the host's network
namespace (``nsenter --net``: the root mount namespace is kept, so the pod namespaces it
creates reach fabricd, which lives in ``ip netns exec``'s slave mount namespace) and does,
N times, one fabric cycle and one reference cycle, alternating which goes first:

    create a fresh netns (recorded in the lab's state first)   untimed
    ADD: exec the plugin, CNI_* env + network config on stdin   timed
    DEL: the same, with the ADD's result as prevResult (libcni) timed
    delete the netns                                            untimed

Both plugins get the same environment (CNI_PATH the fabric bin dir then /usr/lib/cni,
CNI_ARGS as podman sends it) and the config shape libcni hands a plugin (name and cniVersion
1.0.0 injected). The clock covers fork, exec, the plugin's work and wait: what a runtime
waits for. ``ptp`` turns forwarding on where it runs: only in the lab's host namespace.
Three untimed warm-up cycles of each come first. Targets: add_ratio and del_ratio <= 1.5
(fabric p50 / reference p50), aim <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lab import netns, pods
from lab.ipam_load import percentile
from lab.runner import Lab
from lab.view import LabError

N, QUICK_N = 200, 20
WARMUP = 3
HOST = "host"
NETWORK = "fabric"
REF_SUBNET = "10.98.64.0/24"  # host-local's range; exists only in the lab's namespaces
CNI_VERSION = "1.0.0"  # the newest Debian's ptp and host-local (1.1.1) speak
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
REFERENCE_DIR = "/usr/lib/cni"
WORKER_TIMEOUT = 1800.0
ROOT = Path(__file__).resolve().parents[2]

TOPOLOGY: dict[str, Any] = {
    "name": "cni-bench",
    "topology": {
        "nodes": {
            "etcd": {"labels": {"fabric.role": "etcd", "fabric.etcd.members": "1"}},
            HOST: {"labels": {"fabric.role": "node", "fabric.asn": "64512"}},
        },
        "links": [],
    },
}
KEYS = ("bench", "n", "fabric_add_p50_ms", "fabric_add_p99_ms", "ref_add_p50_ms", "add_ratio",
        "fabric_del_p50_ms", "ref_del_p50_ms", "del_ratio")  # fmt: skip


def progress(msg: str) -> None:
    print(f"[bench cni] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- worker (in the host)


class CycleError(RuntimeError):
    """A plugin call of a cycle failed."""


def invoke(exe: str, env: dict[str, str], conf: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Exec ``exe`` as a runtime does; (seconds from fork to reaped, stdout JSON or {})."""
    stdin = json.dumps(conf).encode()
    t0 = time.perf_counter()
    p = subprocess.run([exe], input=stdin, env=env, capture_output=True, check=False)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise CycleError(f"failed to run {exe} {env['CNI_COMMAND']} for "
                         f"{env['CNI_CONTAINERID']}: {p.stdout!r} {p.stderr!r}")  # fmt: skip
    return took, (json.loads(p.stdout) if p.stdout.strip() else {})


class Worker:
    """The timed loop; runs in the host's network namespace."""

    def __init__(self, lab: Lab, bin_dir: Path, fabric_conf: dict[str, Any],
                 ref_conf: dict[str, Any]) -> None:  # fmt: skip
        self.lab = lab
        self.cni_path = f"{bin_dir}:{REFERENCE_DIR}"
        self.plugins = {"fabric": (str(bin_dir / "fabric"), fabric_conf),
                        "ref": (f"{REFERENCE_DIR}/{ref_conf['type']}", ref_conf)}  # fmt: skip
        self.samples: dict[str, list[float]] = {
            f"{k}_{v}": [] for k in self.plugins for v in ("add", "del")
        }
        self._seq = 0

    def env(self, verb: str, cid: str, ns: str) -> dict[str, str]:
        return {"CNI_COMMAND": verb, "CNI_CONTAINERID": cid, "CNI_NETNS": ns,
                "CNI_IFNAME": "eth0", "CNI_PATH": self.cni_path, "PATH": PATH,
                "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAME={cid}"}  # fmt: skip

    def cycle(self, kind: str, record: bool) -> None:
        exe, conf = self.plugins[kind]
        self._seq += 1
        name = f"{self.lab.plan.prefix}b{self._seq}"
        cid = f"bench{kind}{self._seq:05d}"
        path = self.lab.add_netns(name)  # recorded in the lab's state before it exists
        try:
            t_add, result = invoke(exe, self.env("ADD", cid, path), conf)
            if not result.get("ips"):
                raise CycleError(f"{kind} ADD of {cid} returned no address: {result}")
            t_del, _ = invoke(exe, self.env("DEL", cid, path), {**conf, "prevResult": result})
        finally:
            netns.delete(name)
        if record:
            self.samples[f"{kind}_add"].append(t_add)
            self.samples[f"{kind}_del"].append(t_del)

    def run(self, n: int) -> dict[str, list[float]]:
        for _ in range(WARMUP):
            for kind in self.plugins:
                self.cycle(kind, record=False)
        kinds = list(self.plugins)
        for i in range(n):
            for kind in kinds if i % 2 == 0 else kinds[::-1]:  # neither always goes first
                self.cycle(kind, record=True)
            if (i + 1) % 50 == 0:
                progress(f"{i + 1}/{n} cycles of each")
        return self.samples


def worker_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench.cni --worker")
    p.add_argument("--worker", action="store_true", required=True)
    p.add_argument("--lab", required=True)
    p.add_argument("--bin-dir", type=Path, required=True)
    p.add_argument("--fabric-conf", type=Path, required=True)
    p.add_argument("--ref-conf", type=Path, required=True)
    p.add_argument("-n", type=int, required=True)
    args = p.parse_args(argv)
    lab = Lab.attach(args.lab)
    w = Worker(lab, args.bin_dir, json.loads(args.fabric_conf.read_text()),
               json.loads(args.ref_conf.read_text()))  # fmt: skip
    print(json.dumps(w.run(args.n)), flush=True)
    return 0


# ---------------------------------------------------------------------- driver


def libcni_conf(conflist: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """Plugin ``index`` of a config list as libcni hands it over: name and cniVersion in."""
    return {**conflist["plugins"][index], "name": conflist["name"],
            "cniVersion": conflist["cniVersion"]}  # fmt: skip


def ref_conflist(data_dir: Path) -> dict[str, Any]:
    ipam = {"type": "host-local", "ranges": [[{"subnet": REF_SUBNET}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(data_dir)}  # fmt: skip
    plugin = {"type": "ptp", "ipMasq": False, "mtu": 1500, "ipam": ipam}
    return {"cniVersion": CNI_VERSION, "name": "ref", "plugins": [plugin]}


def ms(samples: list[float], q: float) -> float:
    return round(percentile(samples, q) * 1000, 2)


def summarize(samples: dict[str, list[float]], n: int) -> dict[str, Any]:
    """The detailed row (min, p50, p90, p99, max of each series) and the ratios."""
    row: dict[str, Any] = {"bench": "cni", "n": n}
    for series in ("fabric_add", "ref_add", "fabric_del", "ref_del"):
        s = samples[series]
        if len(s) != n:
            raise LabError(f"{series}: {len(s)} samples, expected {n}")
        row[f"{series}_min_ms"] = round(min(s) * 1000, 2)
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            row[f"{series}_{name}_ms"] = ms(s, q)
        row[f"{series}_max_ms"] = round(max(s) * 1000, 2)
    row["add_ratio"] = round(row["fabric_add_p50_ms"] / row["ref_add_p50_ms"], 3)
    row["del_ratio"] = round(row["fabric_del_p50_ms"] / row["ref_del_p50_ms"], 3)
    row["loadavg"] = round(os.getloadavg()[0], 2)
    return row


def install(lab: Lab) -> tuple[Path, dict[str, Any]]:
    """``fabricctl cni install`` into the lab dir; (bin dir, the fabric plugin's config)."""
    d = lab.dir / HOST / "cni"
    sock = yaml.safe_load(lab.fabricd_config_path(HOST).read_text())["cni"]["socket"]
    r = lab.fabricctl(["cni", "install", "--bin-dir", str(d / "bin"), "--conf-dir",
                       str(d / "net.d"), "--socket", str(sock), "--network-name", NETWORK,
                       "--state-dir", str(pods.state_dir(lab, HOST)),
                       "--cni-version", CNI_VERSION], HOST)  # fmt: skip
    if r.returncode != 0:
        raise LabError(f"failed to install the CNI plugin: {r.stderr.strip()}")
    conflist = json.loads((d / "net.d" / "10-fabric.conflist").read_text())
    return d / "bin", libcni_conf(conflist)


def measure(lab: Lab, n: int) -> dict[str, list[float]]:
    bin_dir, fabric_conf = install(lab)
    ref = libcni_conf(ref_conflist(lab.dir / HOST / "host-local"))
    confs = {"fabric": fabric_conf, "ref": ref}
    for kind, conf in confs.items():
        (lab.dir / f"{kind}-conf.json").write_text(json.dumps(conf))
    argv = ["nsenter", f"--net={netns.NETNS_DIR / lab.netns(HOST)}", sys.executable, "-m",
            "lab.bench.cni", "--worker", "--lab", lab.name, "--bin-dir", str(bin_dir),
            "--fabric-conf", str(lab.dir / "fabric-conf.json"),
            "--ref-conf", str(lab.dir / "ref-conf.json"), "-n", str(n)]  # fmt: skip
    progress(f"{n} ADD/DEL cycles of fabric and of ptp + host-local in {lab.netns(HOST)}")
    r = subprocess.run(argv, capture_output=True, text=True, timeout=WORKER_TIMEOUT,
                       check=False, stdin=subprocess.DEVNULL, cwd=ROOT)  # fmt: skip
    sys.stderr.write(r.stderr)
    if r.returncode != 0:
        raise LabError(f"the benchmark worker failed ({r.returncode}): {r.stderr[-2000:]}")
    samples: dict[str, list[float]] = json.loads(r.stdout.strip().splitlines()[-1])
    return samples


def run(quick: bool = False) -> dict[str, Any]:
    n = QUICK_N if quick else N
    lab = Lab(TOPOLOGY, name=f"cni-bench-{os.getpid()}", progress=progress)
    try:
        lab.up()
        lab.start_fabric(timeout=90)
        row = summarize(measure(lab, n), n)
    finally:
        lab.down()
    print(json.dumps(row), flush=True)
    return {k: row[k] for k in KEYS}


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
