"""A short smoke run of each benchmark: it runs and its last line is the promised JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.etcd
def test_ipam_bench_smoke() -> None:
    r = subprocess.run([sys.executable, "-m", "lab.bench", "ipam", "--quick"],
                       capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("floor_txn_per_s", "allocs_per_s_1", "ratio_1_to_floor", "allocs_per_s_8",
                "allocs_per_s_1_sequential", "ratio_1_sequential_to_floor",
                "conflicts_per_alloc_8", "p50_ms", "p99_ms", "duplicates"):  # fmt: skip
        assert key in last, key
    assert last["bench"] == "ipam"
    assert last["duplicates"] == 0
    assert last["allocs_per_s_1"] > 0 and last["floor_txn_per_s"] > 0
