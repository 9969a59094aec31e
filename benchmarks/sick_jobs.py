"""Does atm help a sick job? The same user's script as ``do_no_harm.py`` in configurations that go wrong,
closed loop, against the same job alone and against what a user would otherwise reach for.

A user's script (``benchmarks/jobs/digits_job.py``: an MLP on scikit-learn's digits, train and val loss
logged to MLflow once an epoch) runs in configurations that go wrong: it overfits noisy labels (with
or without a dropout layer the job registers as a knob, under Adam or SGD), or its lr is too high.
Each configuration and seed runs three times side by side, each in its own local MLflow store:

- alone;
- managed: atm's listener with the README's full integration (rollback to the best weights offered;
  on ``stop`` the job restores them and ends), watched by ``atm-watch --proposer rules`` (the CLI);
- with ReduceLROnPlateau on val loss (factor 0.5, patience 5).

Early stopping with restore (patience 10 evaluations) is replayed on the alone run's val curve. The
figures are final val losses: managed over alone, and managed over the better of ReduceLROnPlateau and
early stopping (below 1: atm did better than the usual automatic answer).

    python benchmarks/sick_jobs.py [--seeds 3] [--configs noisy-labels-adam,lr-too-high-sgd] [--epochs 150]

Writes benchmarks/results/sick_jobs.json and .md and prints the table (about 1.5 min a configuration
and seed).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import write
from do_no_harm import _final, applied, arguments, chosen, decisions, start, stopped_at, watched

from atm.training.workloads.tinystories.train import early_stop_with_restore

#: Sick configurations: name -> the job's arguments.
CONFIGS: dict[str, list[str]] = {
    # 500 examples, 30% of them mislabelled, 512 hidden units, Adam at its default lr: val loss is at its
    # best around epoch 33 and climbs 28% by epoch 150 as the noise is memorised. A dropout layer at 0,
    # registered as the knob `dropout`.
    "noisy-labels-adam-dropout": ["--train-size", "500", "--label-noise", "0.3", "--hidden", "512",
                                  "--optimizer", "adam", "--lr", "1e-3", "--dropout", "0"],
    # The same without a dropout layer: atm has the lr and weight decay to work with.
    "noisy-labels-adam": ["--train-size", "500", "--label-noise", "0.3", "--hidden", "512", "--optimizer", "adam",
                          "--lr", "1e-3"],
    # All 1300 examples, 30% mislabelled, SGD with momentum: a noisy rise after epoch 33.
    "noisy-labels-sgd-momentum": ["--label-noise", "0.3", "--hidden", "512", "--optimizer", "sgd", "--lr", "0.05",
                                  "--momentum", "0.9"],
    # Adam at 20x its usual lr: best at epoch 15, then an overconfident model's val loss climbs 55%.
    "lr-too-high-adam": ["--optimizer", "adam", "--lr", "0.02"],
    # SGD with momentum 0.9 at 0.5: best around epoch 45, then a slow climb.
    "lr-too-high-sgd": ["--optimizer", "sgd", "--lr", "0.5", "--momentum", "0.9"],
}

#: Early stopping's patience, in evaluations (epochs), as a user would set it for a run of this length.
PATIENCE = 10


def curve(out: str) -> list[tuple[int, float]]:
    return [(int(ln.split()[1]), float(ln.split()[2])) for ln in out.splitlines() if ln.startswith("VAL ")]


def trio(tmp: Path, config: str, seed: int, epochs: int, interval: float) -> dict[str, Any]:
    """The configuration alone, managed and under ReduceLROnPlateau, side by side, each in its own store."""
    job = [*CONFIGS[config], "--seed", str(seed), "--epochs", str(epochs)]
    alone, _ = start(tmp, job, f"{config}-{seed}-alone")
    plateau, _ = start(tmp, job, f"{config}-{seed}-plateau", "--plateau")
    managed, uri = start(tmp, job, f"{config}-{seed}-managed", "--managed", "--full")
    out_managed, records = watched(managed, uri, interval, [alone, plateau])
    out_alone, out_plateau = alone.communicate()[0], plateau.communicate()[0]
    val = curve(out_alone)
    if not val:
        raise SystemExit(f"the job alone printed no VAL lines:\n{out_alone[-2000:]}")
    early = early_stop_with_restore(val, PATIENCE)
    fa, fm, fp = _final(out_alone), _final(out_managed), _final(out_plateau)
    best_usual = min(fp, early.final_val_loss)
    return {
        "config": config, "seed": seed, "alone": fa, "managed": fm, "plateau": fp,
        "early_stop": early.final_val_loss, "early_stop_epoch": early.stop_step if early.stopped else None,
        "best_alone": min(v for _, v in val), "ratio_alone": fm / fa, "ratio_usual": fm / best_usual,
        "stopped_at": stopped_at(out_managed), "decisions": records,
    }


def main() -> int:
    args = arguments(__doc__, CONFIGS, epochs=150).parse_args()
    configs = chosen(args.configs, CONFIGS, "sick_jobs")
    runs: list[dict[str, Any]] = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        for config in configs:
            for seed in range(args.seeds):
                r = trio(Path(d), config, seed, args.epochs, args.interval)
                runs.append(r)
                print(f"[{time.time() - t0:5.0f}s] {config:22s} seed {seed}: managed {r['managed']:.4f}, alone "
                      f"{r['alone']:.4f}, plateau {r['plateau']:.4f}, early stop {r['early_stop']:.4f} "
                      f"({r['ratio_alone']:.3f}x alone, {r['ratio_usual']:.3f}x the better usual); {decisions(r)}"
                      + (f"; stopped at epoch {r['stopped_at']}" if r["stopped_at"] else ""), flush=True)
    rows = []
    for config in configs:
        mine = [r for r in runs if r["config"] == config]

        def mean(key: str) -> str:
            return f"{statistics.fmean(r[key] for r in mine):.4f}"

        usual = [r["ratio_usual"] for r in mine]
        rows.append([config, mean("alone"), mean("early_stop"), mean("plateau"), mean("managed"),
                     f"{statistics.fmean(r['ratio_alone'] for r in mine):.3f}",
                     f"{statistics.fmean(usual):.3f} ({', '.join(f'{x:.3f}' for x in usual)})",
                     f"{sum(len(applied(r)) for r in mine) / len(mine):.1f}",
                     ", ".join(str(r["stopped_at"]) for r in mine if r["stopped_at"]) or "none"])
    rows.append(["all", "", "", "", "", f"{statistics.fmean(r['ratio_alone'] for r in runs):.3f}",
                 f"{statistics.fmean(r['ratio_usual'] for r in runs):.3f} (worst {max(r['ratio_usual'] for r in runs):.3f})",
                 "", f"{sum(1 for r in runs if r['stopped_at'])} of {len(runs)}"])
    write("sick_jobs", {"runs": runs, "epochs": args.epochs, "interval_s": args.interval, "seeds": args.seeds,
                        "early_stop_patience": PATIENCE}, rows,
          ["configuration", "alone", "early stop (restore)", "ReduceLROnPlateau", "managed", "managed / alone",
           "managed / better usual (per seed)", "decisions applied a run", "stopped at epoch"],
          notes=(f"Final val loss, mean of seeds 0-{args.seeds - 1} (the model's initialisation). Job: "
                 f"benchmarks/jobs/digits_job.py, {args.epochs} epochs, one evaluation an epoch, 0.25 s between "
                 "epochs. Managed: `atm-watch --proposer rules --policy lm "
                 f"--interval {args.interval:g}`, the job offering rollback to its best weights and acting on stop. "
                 f"Early stop: patience {PATIENCE}, best weights restored, replayed on the alone run's curve. "
                 "ReduceLROnPlateau: factor 0.5, patience 5. Below 1 the managed run ended better. "
                 f"Command: `python benchmarks/sick_jobs.py --seeds {args.seeds}`."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
