"""``atm demo``: the bundled overfitting job, managed live, on a local MLflow store.

Runs the TinyStories-style reference workload (``atm-train tinystories --recipe overfit``) as a
separate process, exactly as a user's job would run, and the daemon here watching it. When the
job ends it prints the interventions and how to open them in the MLflow UI.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

EXPERIMENT = "atm-demo"


def run_demo(args: argparse.Namespace) -> int:
    from atm.adapters import RunNotFound
    from atm.adapters.mlflow_backend import MlflowBackend
    from atm.policies import load_policy
    from atm.watcher.daemon import Daemon
    from atm.watcher.proposers import embedded_llm_installed, make_proposer
    from atm.watcher.status import log_changes

    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    backend = MlflowBackend(uri)
    try:  # also creates the store's tables before the job opens the same file
        before = set(backend.running_runs(EXPERIMENT))
    except RunNotFound:
        before = set()
    proposer_kind = args.proposer or ("llm" if embedded_llm_installed() else "rules")
    policy = load_policy("lm")
    proposer = make_proposer(proposer_kind, policy)
    print(f"atm demo: MLflow store {uri}; proposer {proposer_kind}", flush=True)

    started = time.time()
    cmd = [sys.executable, "-m", "atm.training.workloads.cli", "tinystories", "--tracking", "mlflow",
           "--tracking-uri", uri, "--experiment", EXPERIMENT, "--recipe", "overfit"]
    if args.quick:
        cmd.append("--quick")
    job_log = open(work / "job.log", "w")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    job = subprocess.Popen(cmd, stdout=job_log, stderr=subprocess.STDOUT, env=dict(env, PYTHONUNBUFFERED="1"))
    print(f"atm demo: training job started (pid {job.pid}, log {work / 'job.log'})", flush=True)
    try:
        run_id = _wait_for_run(backend, job, before)
        if run_id is None:
            print(f"atm demo: the job ended before it started a run; see {work / 'job.log'}", file=sys.stderr)
            return 1
        print(f"atm demo: watching run {run_id}", flush=True)
        logging.getLogger("atm").setLevel(logging.INFO)
        daemon = Daemon(backend, policy, proposer, interval=2.0, on_change=log_changes())
        daemon.watch([run_id])
        code = job.wait()
    except KeyboardInterrupt:
        job.terminate()
        return 130
    finally:
        if job.poll() is None:
            job.terminate()
        job_log.close()
    from atm.watcher.reconcile import reconcile
    from atm.watcher.report import print_history

    print_history(run_id, reconcile(backend.read_log(run_id), backend.poll(run_id))[0])
    val = backend.poll(run_id).history.get("val_loss") or [(0, float("nan"))]
    print(f"\natm demo: done in {time.time() - started:.0f}s (job exit {code}); final val_loss {val[-1][1]:.3f}")
    print(f"Review it in the MLflow UI:  mlflow ui --backend-store-uri {uri}   (run {run_id}: tags atm.*, "
          "artifact atm/interventions.jsonl, charts atm/*)")
    return 0 if code == 0 else 1


def _wait_for_run(backend: object, job: subprocess.Popen, before: set[str]) -> str | None:
    from atm.adapters import RunNotFound

    while job.poll() is None:
        try:
            new = set(backend.running_runs(EXPERIMENT)) - before  # type: ignore[attr-defined]
        except RunNotFound:
            new = set()
        if new:
            return sorted(new)[0]
        time.sleep(0.5)
    return None
