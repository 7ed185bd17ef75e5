"""The table ``python -m lab.bench all`` (``make bench``) ends with: one row per benchmark,
its key metrics, its ratio against its baseline, its targets and whether it met them.

Targets are the issues' "must reach" values, one ``SPECS`` entry per benchmark; a benchmark
without an entry is shown with its first numbers and "no target". A result with an
``error`` key (the benchmark raised) is a FAIL. Targets stated for one size only (routes:
at 100,000 prefixes) are not checked on other sizes (a ``--quick`` run): "n/a".
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq,
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Target:
    """``key op bound``; ``key`` may be a sum ``a+b`` of result keys."""

    key: str
    op: str
    bound: float

    def value(self, result: Mapping[str, Any]) -> float | None:
        parts = [result.get(k) for k in self.key.split("+")]
        if not all(isinstance(p, int | float) and not isinstance(p, bool) for p in parts):
            return None
        return float(sum(parts))  # type: ignore[arg-type]

    def met(self, result: Mapping[str, Any]) -> bool:
        v = self.value(result)
        return v is not None and _OPS[self.op](v, self.bound)

    def __str__(self) -> str:
        return f"{self.key} {self.op} {self.bound:g}"


@dataclass(frozen=True, slots=True)
class Spec:
    metrics: tuple[str, ...]  # shown as key=value
    ratio: str | None  # the ratio against the baseline
    targets: tuple[Target, ...]
    at: tuple[str, Any] | None = None  # the targets hold only where result[key] == value

    def applies(self, result: Mapping[str, Any]) -> bool:
        return self.at is None or result.get(self.at[0]) == self.at[1]


SPECS: dict[str, Spec] = {
    "ipam": Spec(("allocs_per_s_1", "allocs_per_s_8", "p99_ms"), "ratio_1_to_floor",
                 (Target("ratio_1_to_floor", ">=", 0.5), Target("conflicts_per_alloc_8", "<=", 0.05),
                  Target("duplicates", "==", 0))),
    "routes": Spec(("n", "fabric_install_s", "bird_install_s"), "install_ratio",
                   (Target("install_ratio", "<=", 1.5), Target("withdraw_ratio", "<=", 1.5),
                    Target("fabricd_rss_mb+exabgp_rss_mb", "<=", 200),
                    Target("idle_pct", "<=", 0.3)), ("n", 100_000)),
    "cni": Spec(("fabric_add_p50_ms", "ref_add_p50_ms", "fabric_del_p50_ms"), "add_ratio",
                (Target("add_ratio", "<=", 1.5), Target("del_ratio", "<=", 1.5))),
    "converge": Spec(("p50_ms", "p99_ms", "frr_p50_ms"), "ratio_p50",
                     (Target("ratio_p50", "<=", 1.5), Target("p99_ms", "<", 1000))),
    # the guard of docs/adr/0002-netlink.md: below 5x, pyroute2 is worth reconsidering
    "netlink": Spec(("fabric_routes_per_s", "pyroute2_routes_per_s", "pyroute2_link_msg_ms"),
                    "routes_ratio", (Target("routes_ratio", ">=", 5.0),)),
    "policy": Spec(("apply_p50_ms", "apply_p99_ms", "floor_p50_ms", "program_cold_s"), "apply_ratio",
                   (Target("apply_p99_ms", "<=", 250), Target("apply_ratio", "<=", 3),
                    Target("add_ratio_policy", "<=", 1.25), Target("cold_ratio", "<=", 3),
                    Target("tput_ratio", ">=", 0.9), Target("conn_rate_ratio", ">=", 0.8)),
                   ("policies", 1000)),
    "soak": Spec(("pods_created", "first_ping_loss_pct", "established_lost", "rss_growth_mb"),
                 "ratio_first_to_settled",
                 (Target("first_ping_loss_pct_outside_faults", "==", 0),
                  Target("established_lost_outside_faults", "==", 0),
                  Target("add_errors+del_errors", "==", 0),
                  Target("ipam_leaks+dataplane_leaks+route_mismatch", "==", 0),
                  Target("rss_growth_mb", "<", 10),
                  Target("borrowed_by_limit_pods", ">", 0)), ("minutes", 10.0)),
}  # fmt: skip


def verdict(result: Mapping[str, Any]) -> str:
    """PASS, FAIL (a target missed, or the benchmark failed) or "n/a" (no target)."""
    if "error" in result:
        return "FAIL"
    spec = SPECS.get(str(result.get("bench")))
    if spec is None or not spec.targets or not spec.applies(result):
        return "n/a"
    return "PASS" if all(t.met(result) for t in spec.targets) else "FAIL"


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def row(result: Mapping[str, Any]) -> list[str]:
    name = str(result.get("bench", "?"))
    spec = SPECS.get(name)
    if "error" in result:
        return [name, f"error: {str(result['error'])[:60]}", "-", "-", "FAIL"]
    if spec is None:
        nums = [k for k, v in result.items() if isinstance(v, int | float) and k != "bench"][:3]
        spec = Spec(tuple(nums), None, ())
    metrics = " ".join(f"{k}={_fmt(result[k])}" for k in spec.metrics if k in result)
    ratio = _fmt(result[spec.ratio]) if spec.ratio and spec.ratio in result else "-"
    missed = [t for t in spec.targets if not t.met(result)]
    targets = (
        ", ".join(f"{t}{'' if t not in missed else ' (missed)'}" for t in spec.targets)
        or "no target"
    )
    if spec.at is not None and not spec.applies(result):
        targets = f"targets stated at {spec.at[0]}={_fmt(spec.at[1])}"
    return [name, metrics, ratio, targets, verdict(result)]


def table(results: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    rows = [["bench", "key metrics", "ratio", "target", "result"], *map(row, results)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
