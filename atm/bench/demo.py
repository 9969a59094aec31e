"""``atm demo``: the bundled overfitting job twice on one seed, unmanaged and managed live, on a local MLflow store.

Both runs are the TinyStories-style reference workload (``atm-train tinystories --recipe overfit``),
each a separate process as a user's job would be, started together (one core each). The daemon
here manages the second. When both end it prints the two runs side by side, with what early
stopping would have kept of the unmanaged one (its best evaluation, restored), the managed run's
interventions, and a chart of both validation curves with the interventions marked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

EXPERIMENT = "atm-demo"


def run_demo(args: argparse.Namespace) -> int:
    from atm.adapters.mlflow_backend import MlflowBackend, ensure_experiment
    from atm.policies import load_policy
    from atm.watcher.daemon import Daemon
    from atm.watcher.proposers import embedded_llm_installed, make_proposer
    from atm.watcher.reconcile import reconcile
    from atm.watcher.report import print_history
    from atm.watcher.status import log_changes

    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    # The store's tables and the experiment, before two jobs open the same file; its artifacts beside the store.
    ensure_experiment(uri, EXPERIMENT, str(work / "artifacts"))
    proposer_kind = args.proposer or ("llm" if embedded_llm_installed() else "rules")
    policy = load_policy("lm")
    proposer = make_proposer(proposer_kind, policy)
    print(f"atm demo: MLflow store {uri}; the same job twice on one seed: unmanaged, and managed by the "
          f"{proposer_kind} proposer", flush=True)

    started = time.time()
    jobs = {arm: _start_job(work, uri, arm, quick=args.quick, listen=arm == "managed") for arm in ("unmanaged", "managed")}
    try:
        run_id = _wait_for_run_id(jobs["managed"], work / "managed.log")
        if run_id is None:
            print(f"atm demo: the managed job ended before it started a run; see {work / 'managed.log'}", file=sys.stderr)
            return 1
        print(f"atm demo: watching run {run_id} (job logs: {work / 'managed.log'}, {work / 'unmanaged.log'})", flush=True)
        logging.getLogger("atm").setLevel(logging.INFO)
        backend = MlflowBackend(uri)
        daemon = Daemon(backend, policy, proposer, interval=2.0, on_change=log_changes())
        daemon.watch([run_id])
        codes = {arm: proc.wait() for arm, proc in jobs.items()}
    except KeyboardInterrupt:
        for proc in jobs.values():
            proc.terminate()
        return 130
    finally:
        for proc in jobs.values():
            if proc.poll() is None:
                proc.terminate()
    records = reconcile(backend.read_log(run_id), backend.poll(run_id))[0]
    print_history(run_id, records)
    if any(codes.values()):
        print(f"atm demo: a job failed ({codes}); see the logs in {work}", file=sys.stderr)
        return 1
    results = {arm: json.loads((work / f"{arm}.json").read_text()) for arm in jobs}
    print(comparison(results, time.time() - started))
    chart = plot(results, records, work / "demo.png")
    if chart:
        print(f"Chart: {chart}")
    print(f"Review it in the MLflow UI:  mlflow ui --backend-store-uri {uri}   (run {run_id}: tags atm.*, "
          "artifact atm/interventions.jsonl, charts atm/*)")
    return 0


def comparison(results: dict[str, dict[str, Any]], seconds: float) -> str:
    """The two runs side by side, and what early stopping would have kept of the unmanaged one."""
    from atm.training.workloads.tinystories.train import early_stop_with_restore

    fixed, managed = results["unmanaged"], results["managed"]
    cfg = fixed["config"]
    early = early_stop_with_restore(fixed["val_curve"], cfg["early_stop_patience"], cfg["early_stop_min_delta"])
    best = min(fixed["val_curve"], key=lambda p: p[1])
    rows = [
        ("unmanaged, final", fixed["final_val_loss"], f"after {fixed['steps_done']} steps"),
        ("unmanaged, early stopping", early.final_val_loss,
         f"best of the unmanaged run (step {best[0]}), restored at step {early.stop_step}"),
        ("managed, final", managed["final_val_loss"],
         f"after {managed['steps_done']} steps, {managed['interventions']} interventions"
         + (", stopped by the manager" if managed["stopped_by_manager"] else "")),
        ("managed, best", managed["best_val_loss"], ""),
    ]
    lines = [f"\natm demo: done in {seconds:.0f}s, seed {cfg['seed']}. Validation loss:"]
    lines += [f"  {name:28s} {value:7.3f}   {note}" for name, value, note in rows]
    ratio = managed["final_val_loss"] / early.final_val_loss
    verdict = "below" if ratio < 1 else "not below"
    lines.append(f"  managed final / early stopping: {ratio:.2f}x ({verdict} the best a practitioner keeps of the "
                 "unmanaged run)")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], records: list[Any], path: Path) -> Path | None:
    """Both validation curves, the managed run's interventions marked; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("atm demo: no chart (install matplotlib: pip install 'atm[bench]')")
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, style in (("unmanaged", "tab:gray"), ("managed", "tab:blue")):
        curve = results[arm]["val_curve"]
        ax.plot([s for s, _ in curve], [v for _, v in curve], color=style, label=f"{arm} val loss")
    for rec in records:
        if rec.status.value == "applied" and rec.effective_step is not None:
            ax.axvline(rec.effective_step, color="tab:orange", alpha=0.6, linestyle="--")
            what = ", ".join(f"{k} {c.new:.3g}" for k, c in rec.changes.items())
            what += (", " if what and rec.action else "") + (rec.action.value if rec.action else "")
            ax.annotate(f"#{rec.seq} {what}", (rec.effective_step, ax.get_ylim()[1]), rotation=90, va="top",
                        ha="right", fontsize=7, color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("atm demo: the same job, unmanaged and managed")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _start_job(work: Path, uri: str, arm: str, *, quick: bool, listen: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "atm.training.workloads.cli", "tinystories", "--tracking", "mlflow",
           "--tracking-uri", uri, "--experiment", EXPERIMENT, "--recipe", "overfit", "--run-name", arm,
           "--json", str(work / f"{arm}.json")]
    if quick:
        cmd.append("--quick")
    if not listen:
        cmd.append("--no-listen")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    log = open(work / f"{arm}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(env, PYTHONUNBUFFERED="1"))


def _wait_for_run_id(job: subprocess.Popen, log: Path) -> str | None:
    """The run id the job prints when its run starts (``run id <id>``), or None if it ends first."""
    while True:
        m = re.search(r"^run id (\w+)", log.read_text() if log.exists() else "", re.M)
        if m:
            return m.group(1)
        if job.poll() is not None:
            return None
        time.sleep(0.5)
