"""What the policy benchmark reads off a lab host while it runs: the bytes ``nft monitor``
shows (the size of each transaction fabricd writes), fabricd's policy batches from its
metrics, its RSS, and the size of the table's pod set."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fabric.dataplane.nft import Nft, NftError
from lab.runner import Lab


class Monitor:
    """``nft monitor`` in a host's namespace, every line kept with its arrival time."""

    def __init__(self, lab: Lab, host: str) -> None:
        argv = ["ip", "netns", "exec", lab.netns(host), "nft", "monitor"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.lines: list[tuple[float, int]] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), len(line)))

    def bytes_between(self, t0: float, t1: float) -> int:
        return sum(n for t, n in self.lines if t0 <= t <= t1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.t.join(5)


def batches(lab: Lab, host: str) -> tuple[float, int]:
    """(seconds, count) of fabricd's policy batches so far on ``host`` (its histogram
    ``fabric_reconcile_duration_seconds{reconciler="policy"}``)."""
    _, text = lab.health(host, "/metrics")
    got = {"sum": 0.0, "count": 0.0}
    for line in text.splitlines():
        for k in got:
            if line.startswith(f"fabric_reconcile_duration_seconds_{k}{{") and \
                    'reconciler="policy"' in line:  # fmt: skip
                got[k] = float(line.rsplit(None, 1)[1])
    return got["sum"], int(got["count"])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def pod_set_size_here(nft: Nft, run: Callable[[Any], Any]) -> int:
    """Elements of fabric_filter's pod set in the namespace this process is in, through
    libnftables in process (~1 ms a poll, where an ``ip netns exec nft`` takes ~10: the
    cold start is timed to within a poll)."""
    try:
        out = run(nft.run(["-j", "list", "set", "inet", "fabric_filter", "pods"]))
    except NftError:
        return 0
    return _set_size(str(out))


def _set_size(text: str) -> int:
    for item in json.loads(text).get("nftables", []):
        if "set" in item:
            return len(item["set"].get("elem", []))
    return 0


def start_phases(lab: Lab, host: str) -> dict[str, float] | None:
    """fabricd's ``fabric_start_phase_seconds`` (phase -> seconds from its process start),
    None until it is ready (its health server answers with them)."""
    status, text = lab.health(host, "/metrics")
    out = {}
    for line in text.splitlines() if status == 200 else ():
        if line.startswith('fabric_start_phase_seconds{phase="'):
            phase = line.split('"', 2)[1]
            out[phase] = round(float(line.rsplit(None, 1)[1]), 3)
    return out if "ready" in out else None
