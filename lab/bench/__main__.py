"""`python -m lab.bench NAME [--quick]`: run one benchmark (or `all`); last line is JSON."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

BENCHES = ["ipam"]
OUT = Path(__file__).resolve().parent.parent / "out"


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__)
    p.add_argument("name", choices=[*BENCHES, "all"])
    p.add_argument("--quick", action="store_true", help="a short smoke run (used by make test)")
    args = p.parse_args()
    names = BENCHES if args.name == "all" else [args.name]
    results = []
    for name in names:
        mod = importlib.import_module(f"lab.bench.{name}")
        results.append(mod.run(quick=args.quick))
    if args.name == "all":
        OUT.mkdir(parents=True, exist_ok=True)
        with (OUT / "bench.jsonl").open("a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
        for r in results:
            print("  ".join(f"{k}={v}" for k, v in r.items()), file=sys.stderr)
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
