"""Waiting for a change's effect (``limits.settle``), closed loop on a user's overfitting script.

A small real PyTorch job that memorises noisy targets (``tests/jobs/overfit_job.py``: an MLP,
AdamW, no regularisation, train/val/grad norm logged to MLflow every 10 steps, lr, weight decay
and dropout open to atm) runs under the daemon (rules) twice per seed: with the lm preset, which
waits ``settle: {evals: 3}`` for a change's effect before another remedy for the same problem,
and with the same preset without it (``benchmarks/policies/lm-no-settle.yaml``). For each run:
where lr and weight decay ended against the policy's bounds, the final and best validation loss,
the remedies applied, and how many of those that followed an earlier one for the same problem
were decided before its effect could be known (stacked).

    python benchmarks/settle_closed_loop.py [--seeds 3] [--steps 800]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import write

from atm.adapters.mlflow_backend import MlflowBackend
from atm.bench.harness import applied, stacked_remedies
from atm.policies import load_policy
from atm.watcher.daemon import Daemon
from atm.watcher.proposers import make_proposer

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "jobs" / "overfit_job.py"
POLICIES = {"lm (settle 3 evals)": "lm", "lm without settle": str(ROOT / "benchmarks" / "policies" / "lm-no-settle.yaml")}


def one_run(uri: str, tmp: Path, policy_spec: str, seed: int, steps: int, interval: float) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    tag = f"{Path(policy_spec).stem}-{seed}"
    trace, rid_file = tmp / f"{tag}.json", tmp / f"{tag}.rid"
    job = subprocess.Popen([sys.executable, str(JOB), "--tracking-uri", uri, "--experiment", "settle", "--steps", str(steps),
                            "--step-sleep", "0.02", "--seed", str(seed), "--trace", str(trace), "--run-id-file", str(rid_file)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (rid_file.exists() and rid_file.read_text()) and job.poll() is None:
        time.sleep(0.1)
    rid = rid_file.read_text()
    policy = load_policy(policy_spec)
    daemon = Daemon(MlflowBackend(uri), policy, make_proposer("rules", policy), interval=interval)
    watcher = threading.Thread(target=daemon.watch, args=([rid],), daemon=True)
    watcher.start()
    _, err = job.communicate()
    if job.returncode != 0:
        raise SystemExit(f"the job failed (exit {job.returncode}): {err[-2000:]}")
    watcher.join(60)
    daemon.stop()
    records = MlflowBackend(uri).read_log(rid)
    steps_traced = json.loads(trace.read_text())["trace"]
    first, last = steps_traced[0], steps_traced[-1]
    client = MlflowClient(uri)
    vals = [(m.step, m.value) for m in client.get_metric_history(rid, "val_loss")]
    steps_logged = sorted(s for s, _ in vals)
    stacked, followers = stacked_remedies(records, steps_logged)
    bounds = {k: (policy.params[k].min, policy.params[k].max) for k in ("lr", "weight_decay")}
    at_bound = {k: [b for b, x in zip(("min", "max"), bounds[k]) if x is not None and abs(last[k] - x) <= 1e-12 * max(1.0, abs(x))]
                for k in bounds}
    return {
        "seed": seed, "run_id": rid, "final_val": vals[-1][1], "best_val": min(v for _, v in vals),
        "final": {k: last[k] for k in ("lr", "weight_decay", "dropout")},
        "start": {k: first[k] for k in ("lr", "weight_decay", "dropout")},
        "at_bound": at_bound,
        # At a bound because atm moved it there, not because the job started there and it was never moved.
        "moved_to_bound": {k: v for k, v in at_bound.items() if v and last[k] != first[k]},
        "applied": len(applied(records)), "stacked": stacked, "followers": followers,
        "changes": [r.summary() for r in applied(records)],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--interval", type=float, default=0.5)
    args = p.parse_args()
    out: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        from mlflow.tracking import MlflowClient

        MlflowClient(uri).search_experiments()  # create the tables before two processes open the store
        for name, spec in POLICIES.items():
            out[name] = []
            for seed in range(args.seeds):
                r = one_run(uri, tmp, spec, seed, args.steps, args.interval)
                print(f"{name:22s} seed {seed}: final val {r['final_val']:.4f} (best {r['best_val']:.4f}), "
                      f"lr {r['final']['lr']:.3g}, weight decay {r['final']['weight_decay']:.3g}, at a bound "
                      f"{ {k: v for k, v in r['at_bound'].items() if v} or 'none'}, {r['applied']} applied, "
                      f"stacked {r['stacked']} of {r['followers']}", flush=True)
                out[name].append(r)
    rows = []
    for name, runs in out.items():
        finals = [r["final_val"] for r in runs]
        at = sum(1 for r in runs for v in r["at_bound"].values() if v)
        moved = sum(len(r["moved_to_bound"]) for r in runs)
        rows.append([name, f"{statistics.fmean(finals):.4f} ± {statistics.pstdev(finals):.4f} ({', '.join(f'{v:.3f}' for v in finals)})",
                     ", ".join(f"{r['final']['lr']:.2g}" for r in runs), ", ".join(f"{r['final']['weight_decay']:.2g}" for r in runs),
                     f"{at} of {2 * len(runs)}", f"{moved} of {2 * len(runs)}", f"{sum(r['stacked'] for r in runs)} of {sum(r['followers'] for r in runs)}",
                     f"{statistics.fmean(r['applied'] for r in runs):.1f}"])
    policy = load_policy("lm")
    write("settle_closed_loop", {"runs": out, "steps": args.steps, "interval_s": args.interval}, rows,
          ["policy (rules)", "final val loss (per seed)", "final lr", "final weight decay",
           "lr / weight decay ending at a bound", "... moved there by atm", "stacked remedies", "applied a run"],
          notes=(f"Job: tests/jobs/overfit_job.py ({args.steps} steps, an evaluation every 10, 0.02 s a step), seeds 0-{args.seeds - 1}; "
                 f"daemon polling every {args.interval} s. Bounds: lr [{policy.params['lr'].min:g}, {policy.params['lr'].max:g}], "
                 f"weight decay [{policy.params['weight_decay'].min:g}, {policy.params['weight_decay'].max:g}]; the job starts at lr 3e-4, "
                 "weight decay 0 (its minimum: a weight decay never raised counts as ending at a bound, but not as moved there). "
                 "Command: `python benchmarks/settle_closed_loop.py`."))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
