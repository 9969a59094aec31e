"""Generate the counterfactual decision dataset: real runs branched at decision points, one branch per move.

Usage:
    nice -n 19 python benchmarks/counterfactual/generate.py                 # every family, 3 seeds
    nice -n 19 python benchmarks/counterfactual/generate.py --families cartpole --extend
    nice -n 19 python benchmarks/counterfactual/generate.py --families mlp --extend --follow-ups
    nice -n 19 python benchmarks/counterfactual/generate.py --families mlp --extend --follow-ups --to-end
    python benchmarks/counterfactual/generate.py --families mlp --seeds 2 --out /tmp/mlp.jsonl
    python benchmarks/counterfactual/generate.py --merge /tmp/a.jsonl.gz /tmp/b.jsonl.gz   # side-by-side processes
    python benchmarks/counterfactual/generate.py --families mlp --relog   # a series added to what runs log
    python benchmarks/counterfactual/generate.py --resplit   # lines take the split their family has now

Writes benchmarks/counterfactual/dataset.jsonl.gz (one line per decision point; schema in
atm/watcher/counterfactual.py), rewritten after each decision point. ``--extend`` keeps the lines
of the runs not generated now, and the finished points of those that are (an interrupted generation
goes on where it stopped). One process, one CPU thread. Score it with ``atm eval --dataset``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from atm.bench.counterfactual import Recipe, generate, relog
from atm.bench.counterfactual_families import FAMILIES, recipes, split_of
from atm.watcher.counterfactual import DatasetError, DatasetLine, load_dataset, write_dataset

DEFAULT_OUT = HERE / "dataset.jsonl.gz"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated (default: %(default)s)")
    p.add_argument("--runs", default="", help="comma-separated run names within the families (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="data-order seeds per branch (default: %(default)s)")
    p.add_argument("--policy", default=None,
                   help="the policy whose offer is branched (default: each family's, lm or rl-ppo)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output file, .gz to compress (default: %(default)s)")
    p.add_argument("--points", default="",
                   help="comma-separated point indices to branch (default: all); processes can share a run's points")
    p.add_argument("--follow-ups", action="store_true",
                   help="also branch a follow-up point 2 evaluations after each point where the rules applied a "
                        "remedy, while it is in effect but not yet measured (what limits.settle decides on); "
                        "supervised families")
    p.add_argument("--to-end", action="store_true",
                   help="carry every branch on to the run's last step and keep its outcome there too (at_end; "
                        "atm eval --horizon end scores on it); costs about 3x the branching")
    p.add_argument("--merge", nargs="+", metavar="FILE", default=None,
                   help="generate nothing: put the lines of these files (made by processes side by side, each "
                        "with its own --out) into --out: new runs and points, and outcomes at the run's end for "
                        "its lines of the same branches")
    p.add_argument("--relog", action="store_true",
                   help="branch nothing: re-run the main runs of these families (supervised) and give their lines "
                        "in --out the history the runs log now (a series added), checking that every series they "
                        "held comes out the same")
    p.add_argument("--resplit", action="store_true",
                   help="branch nothing: give every line in --out the split its family has now (a family a rule "
                        "was drawn from moves from test to train)")
    p.add_argument("--extend", action="store_true",
                   help="keep the file's other runs and the finished points of these runs")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.merge:
        return merge(args.out, args.merge)
    if args.resplit:
        return resplit(args.out)
    try:
        todo = recipes([f for f in args.families.split(",") if f])
    except ValueError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    if args.runs:
        wanted = set(args.runs.split(","))
        unknown = wanted - {r.run for r, _ in todo}
        if unknown:
            print(f"generate: unknown runs {sorted(unknown)}; these families have "
                  f"{', '.join(r.run for r, _ in todo)}", file=sys.stderr)
            return 2
        todo = [(r, s) for r, s in todo if r.run in wanted]
    if args.relog:
        return relog_file(args.out, todo, t0)
    keep: list[DatasetLine] = []
    if args.extend and Path(args.out).exists():
        try:
            keep = load_dataset(args.out)
        except DatasetError as exc:
            print(f"generate: {exc}", file=sys.stderr)
            return 2
    only = [int(i) for i in args.points.split(",")] if args.points else None
    lines = generate(todo, args.out, policy=args.policy, seeds=args.seeds, keep=keep, only=only,
                     follow_ups=args.follow_ups, to_end=args.to_end, progress=lambda msg: print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True))
    print(f"{len(lines)} decision points, {sum(len(ln.moves) for ln in lines)} moves -> {args.out} "
          f"({time.time() - t0:.0f} s)")
    return 0


def relog_file(out: str, todo: list, t0: float) -> int:
    try:
        lines = load_dataset(out)
    except DatasetError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    done: dict[tuple[str, int], DatasetLine] = {}
    for recipe, _ in todo:
        mine = [ln for ln in lines if ln.run == recipe.run]
        if not isinstance(recipe, Recipe) or not mine:
            continue
        try:
            done.update({(ln.run, ln.point): ln for ln in relog(recipe, mine)})
        except ValueError as exc:
            print(f"generate: {exc}", file=sys.stderr)
            return 1
        print(f"[{time.time() - t0:6.0f}s] {recipe.family}/{recipe.run}: {len(mine)} lines re-logged", flush=True)
    write_dataset([done.get((ln.run, ln.point), ln) for ln in lines], out)
    print(f"{len(done)} of {len(lines)} lines re-logged -> {out}")
    return 0


def resplit(out: str) -> int:
    """Every line of ``out`` in the split its family has now (:func:`split_of`); says which families moved."""
    try:
        lines = load_dataset(out)
    except DatasetError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    moved = sorted({f"{ln.family}: {ln.split} -> {split_of(ln.family)}" for ln in lines if ln.split != split_of(ln.family)})
    write_dataset([ln.model_copy(update={"split": split_of(ln.family)}) for ln in lines], out)
    print(f"{len(lines)} lines -> {out}; " + (f"moved {'; '.join(moved)}" if moved else "every family already in its split"))
    return 0


def merge(out: str, files: list[str]) -> int:
    """Lines of ``files`` into ``out``: what they measured further (outcomes at the run's end) is added to
    ``out``'s line of the same run and point when both branched the same moves with the same outcomes at
    the horizon (branches are deterministic, so they do unless the code changed what a run does); a line
    whose branches differ (the rules' own combined move changed since) stays as ``out`` has it, and is
    named. Runs and points ``out`` does not have are added. Among the files, a line with outcomes at the
    run's end wins over one without."""
    try:
        base = load_dataset(out) if Path(out).exists() else []
        new: dict[tuple[str, int], DatasetLine] = {}
        for f in files:
            for ln in load_dataset(f):
                have = new.get((ln.run, ln.point))
                if have is None or ln.has_end or not have.has_end:
                    new[(ln.run, ln.point)] = ln
    except DatasetError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2

    def branches(ln: DatasetLine) -> list[tuple[str, list[float]]]:
        return [(m.move.key, m.outcomes) for m in ln.moves]

    merged, ended, differ = [], 0, []
    for ln in base:
        repl = new.pop((ln.run, ln.point), None)
        if repl is not None and branches(repl) != branches(ln):
            differ.append(f"{ln.run}#{ln.point}")
            repl = None
        ended += repl is not None and repl.has_end and not ln.has_end
        merged.append(repl or ln)
    merged += new.values()
    write_dataset(merged, out)
    print(f"{len(merged)} lines -> {out}: {ended} given their outcomes at the run's end, {len(new)} added"
          + (f"; kept as they were, their branches differ: {', '.join(differ)}" if differ else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
