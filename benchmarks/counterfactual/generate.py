"""Generate the counterfactual decision dataset: real runs branched at decision points, one branch per move.

Usage:
    nice -n 10 python benchmarks/counterfactual/generate.py                 # every family, 3 seeds
    python benchmarks/counterfactual/generate.py --families mlp --seeds 2 --out /tmp/mlp.jsonl

Writes benchmarks/counterfactual/dataset.jsonl.gz (one line per decision point; schema in
atm/watcher/counterfactual.py). One process, one CPU thread. Score it with ``atm eval --dataset``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from atm.bench.counterfactual import generate
from atm.bench.counterfactual_families import FAMILIES, recipes

DEFAULT_OUT = HERE / "dataset.jsonl.gz"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="data-order seeds per branch (default: %(default)s)")
    p.add_argument("--policy", default="lm", help="the policy whose offer is branched (default: %(default)s)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output file, .gz to compress (default: %(default)s)")
    args = p.parse_args(argv)
    t0 = time.time()
    try:
        todo = recipes([f for f in args.families.split(",") if f])
    except ValueError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    lines = generate(todo, args.out, policy=args.policy, seeds=args.seeds,
                     progress=lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True))
    print(f"{len(lines)} decision points, {sum(len(ln.moves) for ln in lines)} moves -> {args.out} "
          f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
