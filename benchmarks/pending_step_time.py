"""Training step time while an LLM decision is pending, against step time with none pending (same run).

A job process trains a small torch model with `atm.listen` on a real MLflow run (sqlite store) and
records the wall-clock start and duration of every step; the daemon, in this process, runs the
embedded LLM proposer on the run, and the proposer is wrapped to record when each decision was in
flight. Steps are then split by whether they started while a decision was pending.

    python benchmarks/pending_step_time.py [--seconds 90] [--proposer llm|rules]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from _common import summary, write

from atm.adapters.mlflow_backend import MlflowBackend
from atm.policies import parse_policy
from atm.watcher.proposers import make_proposer
from atm.watcher.daemon import Daemon

POLICY = """
name: pending-bench
metrics: {train_loss: [train_loss], val_loss: [val_loss]}
params:
  lr: {min: 1.0e-6, max: 1.0, multipliers: [0.5, 0.75, 1.25, 2.0]}
  dropout: {min: 0.0, max: 0.5, values: [0.0, 0.1, 0.2, 0.3]}
limits: {max_changes: 2, warmup: {evals: 3}, stale_after: {evals: 1000}, eval_metric: val_loss}
"""

JOB = """
import json, sys, time, torch, torch.nn as nn, mlflow, atm
torch.set_num_threads(1)
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_experiment("pending")
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.0), nn.Linear(256, 64))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randn(32, 64)
steps = []
with mlflow.start_run() as run:
    open(sys.argv[2], "w").write(run.info.run_id)
    lst = atm.listen(opt, knobs={"dropout": atm.dropout(model)}, poll_interval=0.5)
    t_end, step, last_eval = time.time() + float(sys.argv[3]), 0, 0.0
    while time.time() < t_end:
        step += 1
        t0 = time.time(); p0 = time.perf_counter()
        opt.zero_grad(); loss = model(x).pow(2).mean(); loss.backward(); opt.step()
        steps.append((t0, time.perf_counter() - p0))
        if time.time() - last_eval > 1.0:
            last_eval = time.time()
            # An overfitting-shaped curve, so the manager has something to decide about.
            mlflow.log_metrics({"train_loss": 1.0 / step ** 0.5, "val_loss": 1.0 + 0.05 * max(0, step - 2000) / 1000}, step=step)
    lst.close()
json.dump(steps, open(sys.argv[4], "w"))
"""


class Timed:
    """Wraps a proposer and records when each decision was in flight."""

    def __init__(self, inner):
        self.inner, self.name, self.spans = inner, inner.name, []

    def propose(self, snapshot, policy, ctx, offer):
        t0 = time.time()
        try:
            return self.inner.propose(snapshot, policy, ctx, offer)
        finally:
            self.spans.append((t0, time.time()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--proposer", default="llm")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atm-pending-"))
    uri = f"sqlite:///{tmp / 'm.db'}"
    MlflowBackend(uri).client.search_experiments()
    policy = parse_policy(POLICY)
    proposer = Timed(make_proposer(args.proposer, policy))
    (tmp / "job.py").write_text(textwrap.dedent(JOB))
    job = subprocess.Popen([sys.executable, str(tmp / "job.py"), uri, str(tmp / "rid"), str(args.seconds), str(tmp / "steps.json")],
                           stdout=open(tmp / "job.log", "w"), stderr=subprocess.STDOUT)
    while not (tmp / "rid").exists() or not (tmp / "rid").read_text():
        if job.poll() is not None:
            raise SystemExit((tmp / "job.log").read_text())
        time.sleep(0.2)
    daemon = Daemon(MlflowBackend(uri), policy, proposer, interval=1.0)
    t = threading.Thread(target=daemon.watch, args=([(tmp / "rid").read_text()],), daemon=True)
    t.start()
    job.wait()
    daemon.stop_event.set()
    t.join(60)
    steps = json.loads((tmp / "steps.json").read_text())
    pending = [d for t0, d in steps if any(a <= t0 <= b for a, b in proposer.spans)]
    idle = [d for t0, d in steps if not any(a <= t0 <= b for a, b in proposer.spans)]
    p, q = summary(idle), summary(pending)
    ratio = q["p50"] / p["p50"] if pending else float("nan")
    write(
        "pending_step_time",
        {"proposer": args.proposer, "decisions": len(proposer.spans), "pending_s": sum(b - a for a, b in proposer.spans),
         "no_decision_pending_s": p, "decision_pending_s": q, "ratio_p50": ratio},
        [["no decision pending", str(p["n"]), f"{p['p50'] * 1e3:.3f}", f"{p['p95'] * 1e3:.3f}", "1.00"],
         [f"{args.proposer} decision pending ({len(proposer.spans)} decisions)", str(q["n"]), f"{q['p50'] * 1e3:.3f}",
          f"{q['p95'] * 1e3:.3f}", f"{ratio:.2f}"]],
        ["job state", "steps", "step p50 (ms)", "step p95 (ms)", "ratio p50"],
        notes="Same run, same process; the LLM runs in the daemon's process on the machine's other core. "
              "The listener never waits for a decision; any difference is CPU contention between the two processes.",
    )


if __name__ == "__main__":
    main()
