"""List the decisions a proposer gets wrong on one split of the counterfactual dataset, with the
telemetry it saw: what to read while improving a detector.

Usage:
    python benchmarks/counterfactual/failures.py                 # rules, train split, failures only
    python benchmarks/counterfactual/failures.py --all           # every decision of the split
    python benchmarks/counterfactual/failures.py --proposer fitted
    python benchmarks/counterfactual/failures.py --family cartpole

Develop on the train split only: the test families are held out, and a detector tuned by reading
their failures no longer measures what generalises.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from atm.policies import load_policy
from atm.watcher.counterfactual import (
    HORIZONS,
    NOOP,
    POINTS,
    applied,
    chosen_key,
    judged_at,
    line_situation,
    load_dataset,
    score_choice,
    select,
)
from atm.watcher.proposers import make_proposer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(HERE / "dataset.jsonl.gz"))
    p.add_argument("--split", default="train", choices=("train", "test", "all"))
    p.add_argument("--points", default="all", choices=POINTS,
                   help="the main runs' points, the follow-up points (an earlier remedy in effect), or both")
    p.add_argument("--horizon", default="branch", choices=HORIZONS,
                   help="judge the moves at the branches' horizon, or at the run's end (the points branched that far)")
    p.add_argument("--proposer", default="rules")
    p.add_argument("--family", action="append", default=[], help="only this family (repeatable)")
    p.add_argument("--all", action="store_true", help="every decision, not only the failures")
    args = p.parse_args(argv)
    proposer = make_proposer(args.proposer)
    wrong = 0
    lines = [ln for ln in judged_at(select(load_dataset(args.dataset), args.split, args.points), args.horizon)
             if not args.family or ln.family in args.family]
    for line in lines:
        sit = line_situation(line, load_policy(line.policy))
        proposal = proposer.propose(sit.snapshot, sit.policy, sit.ctx, sit.offer).proposal
        key = chosen_key(line, applied(proposal, sit))
        ok, harm, regret = score_choice(line, key)
        wrong += not ok
        if ok and not args.all:
            continue
        noise = line.labels.noise
        noop = line.outcome(NOOP)
        assert noop is not None
        verdict = "HARMFUL" if harm else "ok" if ok else "not acceptable"
        print(f"== {line.family} {line.run} #{line.point} step {line.step}: {verdict}, regret {regret}")
        for e in line.earlier:
            changes = ", ".join(f"{k} {old:g}->{new:g}" for k, (old, new) in e.changes.items())
            print(f"   earlier: {e.diagnosis.value} at step {e.step}: {changes}" + (f" with {e.action.value}" if e.action else ""))
        print(f"   chose {key} ({proposal.diagnosis.value}): {proposal.rationale}")
        # As costs: negative is better than no-op, whether the outcome is a loss or a return.
        sign = -1.0 if line.higher_is_better else 1.0
        ranked = sorted(line.moves, key=lambda m: sign * m.mean)
        print("   moves vs no-op (noise units, negative is better): " + ", ".join(
            f"{m.move.key}{'*' if m.move.key in line.labels.acceptable else ''} "
            f"{sign * (m.mean - noop.mean) / noise:+.1f}" for m in ranked[:8]))
        sig = sit.snapshot.signals
        print("   signals: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(sig.items())))
        for role, st in sit.snapshot.series.items():
            # The last 30 points: an RL run logs every update.
            print(f"   {role:10s} {st.key:16s} " + " ".join(f"{v:.4g}" for _, v in line.history[st.key][-30:]))
    print(f"{wrong} of {len(lines)} not acceptable ({args.split} split, {args.proposer})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
