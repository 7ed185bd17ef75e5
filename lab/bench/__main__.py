"""`python -m lab.bench NAME [--quick] [--load]`: run one benchmark (or `all`); last line is
JSON. `--load` (routes only): one core kept busy by an unrelated process while it measures.

`all` (`make bench`) runs every benchmark in turn, a failing one does not stop the rest;
each result is appended to lab/out/bench.jsonl as it comes. Then one JSON line per result
on stdout and the table of lab/bench/report.py on stderr; exit 1 if any failed or missed a
target.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from lab.bench import report

BENCHES = ["ipam", "routes", "converge", "cni", "netlink", "policy"]
LONG = ["soak"]  # not in `all`: 10 minutes by default
OUT = Path(__file__).resolve().parent.parent / "out"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__)
    p.add_argument("name", choices=[*BENCHES, *LONG, "all"])
    p.add_argument("--quick", action="store_true", help="a short smoke run (used by make test)")
    p.add_argument("--minutes", type=float, help="soak: how long (default 10, --quick 1)")
    p.add_argument(
        "--load", action="store_true", help="routes only: keep one core busy while measuring"
    )
    args = p.parse_args()
    if args.load and args.name != "routes":
        p.error(f"--load: only the routes benchmark takes it, not {args.name}")
    if args.name == "all":
        return run_all(args.quick)
    mod = importlib.import_module(f"lab.bench.{args.name}")
    extra: dict[str, object] = {"minutes": args.minutes} if args.minutes is not None else {}
    if extra and args.name not in LONG:
        p.error("--minutes is for soak only")
    if args.load:
        extra["load"] = True
    result = mod.run(quick=args.quick, **extra)
    print(json.dumps(result))
    return 0 if result.get("valid", True) else 1  # soak: borrowing by the limit happened


def run_all(quick: bool) -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for name in BENCHES:
        try:
            r = importlib.import_module(f"lab.bench.{name}").run(quick=quick)
        except Exception as e:  # reported as a FAIL row; the other benchmarks still run
            traceback.print_exc()
            r = {"bench": name, "error": f"{type(e).__name__}: {e}"}
        results.append(r)
        with (OUT / "bench.jsonl").open("a") as f:
            f.write(json.dumps(r) + "\n")
    for r in results:
        print(json.dumps(r), flush=True)
    print(f"\n{report.table(results)}\n(JSON lines appended to {OUT / 'bench.jsonl'})",
          file=sys.stderr)  # fmt: skip
    return 1 if any(report.verdict(r) == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
