"""Score proposers on the counterfactual decision dataset, beside the fixed strategies.

Usage:
    python benchmarks/counterfactual/score.py                      # rules + fixed strategies, test and train splits
    python benchmarks/counterfactual/score.py --llm --split test --name counterfactual_llm_test   # the embedded LLM too

Points branched on to the run's end (generate.py --to-end) are scored there too ("at the run's end" rows;
``atm eval --dataset ... --horizon end``), beside the same points at the branch horizon.

Writes benchmarks/results/counterfactual.json and .md (or ``--name``'s) and prints the table (the same figures as
``atm eval --dataset benchmarks/counterfactual/dataset.jsonl.gz --split test``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NO_SETTLE = HERE.parent / "policies" / "lm-no-settle.yaml"
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE.parent))

from _common import write

from atm.watcher.counterfactual import (
    BASELINES,
    NOOP,
    DatasetLine,
    DatasetReport,
    Rates,
    at_run_end,
    load_dataset,
    rates,
    rates_row,
    score_dataset,
    select,
)
from atm.watcher.proposers import make_proposer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=str(HERE / "dataset.jsonl.gz"))
    p.add_argument("--split", action="append", choices=("test", "train", "all"),
                   help="repeatable (default: test and train)")
    p.add_argument("--llm", action="store_true", help="also score the embedded LLM proposer")
    p.add_argument("--name", default="counterfactual",
                   help="results file name in benchmarks/results/, without .json/.md (default: %(default)s)")
    args = p.parse_args(argv)
    lines = load_dataset(args.dataset)
    shown = Path(args.dataset).resolve()
    shown_name = str(shown.relative_to(HERE.parent.parent)) if shown.is_relative_to(HERE.parent.parent) else str(shown)
    kinds = ["rules", "llm"] if args.llm else ["rules"]
    reports: dict[str, list[DatasetReport]] = {}
    table: list[list[str]] = []
    for split in args.split or ["test", "train"]:
        # The main runs' points; the follow-up points (an earlier remedy in effect) are scored below.
        chosen = select(lines, split, "main")
        proposers = [make_proposer(k) for k in kinds] + [make() for make in BASELINES.values()]
        reports[split] = [score_dataset(pr, chosen, dataset=shown_name, split=split) for pr in proposers]
        for r in reports[split]:
            table.append([split, *rates_row(r.proposer, r.summary)])
        # Per family for every proposer (the fixed strategies too), per diagnosis for the deciding ones.
        for r in reports[split]:
            for fam, fam_rates in r.by_family.items():
                table.append([split, *rates_row(f"{r.proposer}, family {fam}", fam_rates)])
        for r in reports[split][: len(kinds)]:
            for diag, diag_rates in r.by_diagnosis.items():
                table.append([split, *rates_row(f"{r.proposer}, diagnosis {diag}", diag_rates)])
    # The same decisions judged at the run's end, on the points branched that far, beside the same
    # points at the horizon: does a move that helps over the horizon still help when the run is over?
    at_end: dict[str, dict[str, object]] = {}
    end_notes = ""
    for split in reports:
        here = [ln for ln in select(lines, split, "main") if ln.has_end]
        if not here:
            continue
        ended = [at_run_end(ln) for ln in here]

        def scored(chosen: list[DatasetLine], label: str) -> list[DatasetReport]:
            rs = [score_dataset(pr, chosen, dataset=shown_name, split=split)
                  for pr in [make_proposer(k) for k in kinds] + [make() for make in BASELINES.values()]]
            table.extend([label, *rates_row(r.proposer, r.summary)] for r in rs)
            return rs

        scored(here, f"{split}, {len(here)} points at the horizon")
        label = f"{split}, the same at the run's end"
        rs = scored(ended, label)
        table.extend([label, *rates_row(f"{r.proposer}, family {fam}", fr)]
                     for r in rs[: len(kinds)] for fam, fr in r.by_family.items())
        ag = agreement(here, ended)
        at_end[split] = {"reports": [r.model_dump(mode="json") for r in rs], "agreement": ag}
        end_notes += (f" At the run's end ({split}, {len(here)} points, generate.py --to-end): the horizon's best move is "
                  f"acceptable there at {ag['best_still_acceptable']:.0%} of points; of {ag['helped']} moves that helped "
                  f"over the horizon, {ag['helped_then_hurt']} hurt by the end; no-op acceptable at "
                  f"{ag['noop_acceptable_horizon']:.0%} of points at the horizon, {ag['noop_acceptable_end']:.0%} at the end.")
    families = {split: sorted({ln.family for ln in select(lines, split)}) for split in reports}
    notes = (
        f"Dataset: {shown_name}, {len(lines)} decision points; families by split: {families}. "
        "The split rows score the main runs' points; the follow-up rows the follow-up points. "
        "Regret: the chosen move's mean outcome minus the best move's, in units of the point's noise "
        "(the seeds' pooled spread)."
    )
    notes += end_notes
    # limits.settle on the follow-up points (a remedy in effect, not yet measured), every split: the
    # rules as they decide under each line's policy, and under the same with settle off.
    follow = [ln for ln in lines if ln.earlier]
    settle: dict[str, DatasetReport] = {}

    def stacked_row(label: str, name: str, r: Rates) -> list[str]:
        *cells, regret = rates_row(name, r)
        return [label, *cells, f"{regret}; stacked {r.stacked} of {r.follow_ups}"]

    if follow:
        for name, pol in (("rules (settle 3 evals)", None), ("rules without settle", str(NO_SETTLE))):
            settle[name] = score_dataset(make_proposer("rules"), follow, dataset=shown_name, split="follow-ups", policy=pol)
            table.append(stacked_row("follow-ups", name, settle[name].summary))
            for split in sorted({ln.split for ln in follow}):
                part = [i for i, ln in enumerate(follow) if ln.split == split]
                sub = rates([settle[name].decisions[i] for i in part], [follow[i] for i in part])
                table.append(stacked_row(f"follow-ups, {split}", name, sub))
        notes += (f" Follow-ups: {len(follow)} points 2 evaluations after a point where the rules applied a remedy, "
                  "on the branch that applied it (generate.py --follow-ups); 'stacked': another remedy for the same "
                  "problem before the first could be measured (divergence, where settle does not wait, not counted); "
                  f"without settle: {NO_SETTLE.relative_to(HERE.parent.parent)}.")
    write(args.name,
          {"dataset": shown_name, "families": families,
           "reports": {s: [r.model_dump(mode="json") for r in rs] for s, rs in reports.items()},
           "settle_follow_ups": {k: r.model_dump(mode="json") for k, r in settle.items()},
           "at_run_end": at_end},
          table,
          ["split", "proposer", "n", "acceptable", "harmful", "no-op precision", "no-op recall",
           "mean regret (noise units)"],
          notes)
    return 0


def agreement(lines: list[DatasetLine], ended: list[DatasetLine]) -> dict[str, float | int]:
    """How the labels at the horizon hold at the run's end: ``lines`` and the same judged there
    (:func:`at_run_end`). Pure."""
    best_ok = sum(any(k in e.labels.acceptable for k in ln.labels.best) for ln, e in zip(lines, ended))
    helped = [(m.move.key, e) for ln, e in zip(lines, ended) for m in ln.moves if m.label == "helped"]
    flipped = sum(e.outcome(k).label == "hurt" for k, e in helped)  # type: ignore[union-attr]
    return {
        "points": len(lines),
        "best_still_acceptable": best_ok / len(lines),
        "helped": len(helped),
        "helped_then_hurt": flipped,
        "noop_acceptable_horizon": sum(NOOP in ln.labels.acceptable for ln in lines) / len(lines),
        "noop_acceptable_end": sum(NOOP in e.labels.acceptable for e in ended) / len(lines),
    }


if __name__ == "__main__":
    raise SystemExit(main())
