"""A short smoke run of each benchmark: it runs and its last line is the promised JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def quick(name: str, timeout: float) -> list[dict]:  # type: ignore[type-arg]
    """``python -m lab.bench NAME --quick``: its JSON lines, after it exited 0."""
    r = subprocess.run([sys.executable, "-m", "lab.bench", name, "--quick"],
                       capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    assert r.returncode == 0, f"{r.stderr[-2000:]}\nlast line: {r.stdout.strip()[-3000:]}"
    return [json.loads(x) for x in r.stdout.strip().splitlines()]


@pytest.mark.etcd
def test_ipam_bench_smoke() -> None:
    last = quick("ipam", 300)[-1]
    for key in ("floor_txn_per_s", "allocs_per_s_1", "ratio_1_to_floor", "allocs_per_s_8",
                "allocs_per_s_1_sequential", "ratio_1_sequential_to_floor",
                "conflicts_per_alloc_8", "p50_ms", "p99_ms", "duplicates"):  # fmt: skip
        assert key in last, key
    assert last["bench"] == "ipam"
    assert last["duplicates"] == 0
    assert last["allocs_per_s_1"] > 0 and last["floor_txn_per_s"] > 0


@pytest.mark.root
@pytest.mark.lab
def test_routes_bench_smoke() -> None:
    """1,000 prefixes from a BIRD injector reach the kernel through fabricd and through BIRD."""
    if os.geteuid() != 0:
        pytest.skip("the routes benchmark builds a lab: needs root (network namespaces)")
    lines = quick("routes", 120)
    last = lines[-1]
    assert list(last) == ["bench", "n", "fabric_install_s", "bird_install_s", "install_ratio",
                          "fabric_withdraw_s", "bird_withdraw_s", "withdraw_ratio",
                          "fabricd_rss_mb", "exabgp_rss_mb", "idle_pct", "load"]  # fmt: skip
    assert last["bench"] == "routes" and last["n"] == 1000 and last["load"] is False
    per_n = lines[-2]  # the detailed line of the same run: what each kernel held
    assert per_n["n"] == 1000 and per_n["rounds"] == 1
    assert per_n["fabric_routes"] == 1000 and per_n["bird_routes"] == 1000
    for side in ("fabricd", "exabgp", "relay"):  # CPU seconds per side, both phases
        assert per_n[f"{side}_install_cpu_s"] >= 0 and per_n[f"{side}_withdraw_cpu_s"] >= 0
    # the FIB poll's own CPU per phase (it shares the cores with both sides)
    assert 0 <= per_n["probe_install_cpu_s"] < 1 and 0 <= per_n["probe_withdraw_cpu_s"] < 1
    idle = lines[-3]  # sessions up, nothing changing: CPU of each side, % of a core
    assert idle["idle_s"] >= 5 and idle["idle_pct"] == last["idle_pct"] >= 0
    assert idle["fabricd_idle_rss_mb"] > 0 and idle["exabgp_idle_rss_mb"] > 0
    for key in ("fabric_install_s", "bird_install_s", "fabric_withdraw_s", "bird_withdraw_s"):
        assert last[key] > 0, key
    assert last["fabricd_rss_mb"] > 0 and last["exabgp_rss_mb"] > 0


@pytest.mark.root
@pytest.mark.lab
def test_converge_bench_smoke() -> None:
    """Five rounds in two-rack: pod ADDs claiming new blocks, FRR networks from node2 and from
    tor1, each one timed into node3's kernel and split into hops at every capture point."""
    if os.geteuid() != 0:
        pytest.skip("the converge benchmark builds a lab: needs root (network namespaces)")
    *_, detail, last = quick("converge", 120)
    assert list(last) == ["bench", "samples", "p50_ms", "p99_ms", "frr_p50_ms", "ratio_p50"]
    assert last["bench"] == "converge" and last["samples"] == 5
    assert 0 < last["p50_ms"] <= last["p99_ms"] < 10_000 and last["frr_p50_ms"] > 0
    assert last["ratio_p50"] == round(last["p50_ms"] / last["frr_p50_ms"], 3)
    for kind, hops in (("fabric", {"claim", "announce", "host", "tor1", "spine", "tor2", "node3"}),
                       ("frr", {"host", "tor1", "spine", "tor2", "node3"}),
                       ("tor", {"tor1", "spine", "tor2", "node3"})):  # fmt: skip
        assert detail[kind]["samples"] == 5, kind
        assert set(detail[kind]["hops_p50_ms"]) == hops, kind  # every capture point saw it
    assert detail["fabric"]["add_p50_ms"] > 0


@pytest.mark.root
@pytest.mark.lab
def test_cni_bench_smoke() -> None:
    """20 ADD/DEL cycles through the installed fabric plugin and through ptp + host-local."""
    if os.geteuid() != 0:
        pytest.skip("the cni benchmark builds a lab: needs root (network namespaces)")
    if not os.path.exists("/usr/lib/cni/ptp"):
        pytest.skip("the reference plugins are not installed (containernetworking-plugins)")
    lines = quick("cni", 300)
    last = lines[-1]
    assert list(last) == ["bench", "n", "fabric_add_p50_ms", "fabric_add_p99_ms",
                          "ref_add_p50_ms", "add_ratio", "fabric_del_p50_ms", "ref_del_p50_ms",
                          "del_ratio"]  # fmt: skip
    assert last["bench"] == "cni" and last["n"] == 20
    assert all(v > 0 for k, v in last.items() if k != "bench"), last
    detail = lines[-2]  # the same run with min/p90/max of every series
    assert detail["n"] == 20 and detail["fabric_add_min_ms"] <= last["fabric_add_p50_ms"]


@pytest.mark.root
def test_netlink_bench_smoke() -> None:
    """500 routes and 40 link messages each way, hand codec and pyroute2 (ADR 0002's guard)."""
    if os.geteuid() != 0:
        pytest.skip("the netlink benchmark uses a network namespace: needs root")
    *_, detail, last = quick("netlink", 300)
    assert last["bench"] == "netlink" and last["n"] == 500 and last["link_messages"] == 120
    for key in ("fabric_routes_per_s", "pyroute2_routes_per_s", "routes_ratio",
                "fabric_link_msg_ms", "pyroute2_link_msg_ms", "links_ratio"):  # fmt: skip
        assert last[key] > 0, key
    assert set(detail) == {"routes", "links"}
    assert set(detail["routes"]) == set(detail["links"]) == {"fabric", "pyroute2"}


@pytest.mark.root
@pytest.mark.lab
def test_policy_bench_smoke() -> None:
    """Two-rack at smoke size (20 policies, 100 remote endpoints, 5 samples of each timing):
    every phase ran and every figure is there and positive."""
    if os.geteuid() != 0:
        pytest.skip("the policy benchmark builds a lab: needs root (network namespaces)")
    if not os.path.exists("/usr/bin/iperf3"):
        pytest.skip("iperf3 is not installed (scripts/install-deps.sh installs it)")
    *_, detail, last = quick("policy", 600)
    assert list(last) == ["bench", "policies", "remote_endpoints", "local_pods", "samples",
                          "apply_p50_ms", "apply_p99_ms", "floor_p50_ms", "apply_ratio",
                          "add_ratio_policy", "program_cold_s", "floor_cold_s", "cold_ratio",
                          "compile_cold_s", "program_cold_nosnap_s", "update_p99_ms", "update_bytes_p50", "tput_ratio", "conn_rate_ratio",
                          "fabricd_rss_mb"]  # fmt: skip
    assert last["bench"] == "policy" and last["policies"] == 20 and last["samples"] == 5
    assert all(v > 0 for k, v in last.items() if k != "bench"), last
    assert 0 < last["apply_p50_ms"] <= last["apply_p99_ms"] < 10_000
    assert last["apply_ratio"] == round(last["apply_p50_ms"] / last["floor_p50_ms"], 3)
    # the label change is written as set elements, not a table (nft monitor on the node)
    assert last["update_bytes_p50"] < detail["table_bytes"]
    assert detail["apply_batches"] >= 5 and detail["update_batches"] >= 5  # node3 programmed each
    # the cold start restored fabricd's snapshot, the run without it did not
    assert detail["snapshot_restored"] and not detail["snapshot_restored_nosnap"], detail


@pytest.mark.root
@pytest.mark.lab
def test_soak_bench_smoke() -> None:
    """One minute of churn (1 ADD + 1 DEL per second) on the two-rack lab with a 3-member
    etcd, every fault injected once, node4's ordinary pods borrowing (maxBlocksPerHost 1, its
    block full); nothing leaks, no error, every field there."""
    if os.geteuid() != 0:
        pytest.skip("the soak benchmark builds a lab: needs root (network namespaces)")
    last = quick("soak", 600)[-1]
    for key in ("pods_created", "first_ping_loss_pct", "first_ping_worst_gap_ms",
                "first_ping_loss_pct_outside_faults", "settled_loss_pct", "established_lost",
                "established_lost_outside_faults", "add_errors", "del_errors", "ipam_leaks",
                "dataplane_leaks", "route_mismatch", "rss_growth_mb", "fd_growth"):  # fmt: skip
        assert key in last, key
    assert last["bench"] == "soak" and last["minutes"] == 1.0
    assert last["pods_created"] >= 40, last
    assert set(last["faults"]) == {"fabricd SIGKILL node2", "ExaBGP SIGKILL node3",
                                   "etcd leader killed", "tor2 BIRD restarted"}  # fmt: skip
    assert all(f["ok"] for f in last["faults"].values()), last["faults"]
    assert last["add_errors"] == last["del_errors"] == 0, last
    assert last["ipam_leaks"] == last["dataplane_leaks"] == last["route_mismatch"] == 0, last
    # node4 at maxBlocksPerHost 1 with its block full: its ordinary pods borrowed, as IPAM says
    assert last["valid"] and last["limit"]["ipam_agrees"], last
    assert set(last["kinds"]) == {"ordinary", "ip_request", "borrowed_by_limit"}, last
    assert last["kinds"]["borrowed_by_limit"]["created"] > 0, last
    assert sum(k["created"] for k in last["kinds"].values()) == last["pods_created"], last
