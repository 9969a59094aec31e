"""What every benchmark arm shares: run a training process, manage it with a daemon, tabulate.

Every arm is a separate training process (``atm-train ...``) logging to a local MLflow store, as
a user's job would; managed arms get the daemon (``atm.watcher.daemon.Daemon``) watching the run
through the MLflow backend, exactly as ``atm-watch`` does. Nothing is shortcut: the manager only
sees what the job logs and only acts through the run's tags.

This module is orchestration, like a user's experiment script; the runners for each workload live
beside it (``atm.bench.tinystories``, ``atm.bench.manipulation``) and register in ``atm.bench.cli``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atm.schema import DecisionRecord, Diagnosis, Status



def available_proposers(requested: str | None) -> list[str]:
    """The managed arms to run: the request, or rules plus the LLM when its stack is installed."""

    if requested:
        names = [p.strip() for p in requested.split(",") if p.strip()]
        bad = [p for p in names if p not in ("rules", "llm")]
        if bad:
            raise SystemExit(f"atm bench: unknown proposers {bad}; choose from rules, llm")
        return names
    from atm.watcher.proposers import embedded_llm_installed

    return ["rules", "llm"] if embedded_llm_installed() else ["rules"]


def drop_unbuildable(bench: str, arms: list[str], policy: str, *, requested: bool) -> dict[str, str]:
    """Remove from ``arms`` the managed arms whose proposer cannot be built here, before any training
    starts, and say why; exit instead when the user asked for those arms by name.

    Returns the arms left out, with the reason.
    """
    from atm.policies import load_policy
    from atm.watcher.proposers import make_proposer

    skipped = {}
    for arm in arms:
        if arm.startswith("managed-"):
            try:
                proposer = make_proposer(arm.removeprefix("managed-"), load_policy(policy))
                # Proposers build their client on first use: make it now, so a missing model file or
                # package shows here (it checks they are there; it loads no model, calls no server).
                getattr(proposer, "client", None)
            except Exception as exc:  # an LLM stack half installed, a model file missing ...
                skipped[arm] = f"its proposer could not be built: {type(exc).__name__}: {exc}"
    if skipped and requested:
        raise SystemExit(f"atm bench {bench}: " + "; ".join(f"{a}: {why}" for a, why in skipped.items()))
    for arm, why in skipped.items():
        print(f"atm bench {bench}: skipping {arm} ({why})", flush=True)
        arms.remove(arm)
    return skipped


@dataclass
class ArmRun:
    """One training process, optionally managed."""

    arm: str
    seed: int
    cmd: list[str]
    log: Path
    run_id: str | None = None
    records: list[DecisionRecord] = field(default_factory=list)
    exit_code: int | None = None
    wall_s: float = 0.0


def run_arm(
    run: ArmRun,
    tracking_uri: str,
    policy_spec: str | None = None,
    proposer_kind: str | None = None,
    interval: float = 2.0,
    on_line: Callable[[str], None] | None = None,
) -> ArmRun:
    """Run one training process to the end; with ``policy_spec``, manage it with a daemon meanwhile."""
    from atm.adapters.mlflow_backend import MlflowBackend

    started = time.time()
    run.log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(run.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=job_env())
    found = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        with open(run.log, "w") as fh:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                m = re.match(r"run id (\w+)", line.strip())
                if m and not found.is_set():
                    run.run_id = m.group(1)
                    found.set()
                if on_line:
                    on_line(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    daemon = None
    watcher = None
    backend = MlflowBackend(tracking_uri)
    if policy_spec is not None:
        from atm.policies import load_policy
        from atm.watcher.proposers import make_proposer
        from atm.watcher.daemon import Daemon

        policy = load_policy(policy_spec)
        while not found.wait(0.5):
            if proc.poll() is not None:
                break
        if run.run_id:
            daemon = Daemon(backend, policy, make_proposer(proposer_kind or "rules", policy), interval=interval)
            watcher = threading.Thread(target=daemon.watch, args=([run.run_id],), daemon=True)
            with daemon_log(run.log.with_suffix(".daemon.log")):
                watcher.start()
                run.exit_code = proc.wait()
                reader.join(10)
                watcher.join(120)  # it exits once it has seen the run finish and settled the last acks
                daemon.stop()
    if watcher is None:
        run.exit_code = proc.wait()
        reader.join(10)
    run.records = run_records(tracking_uri, run.run_id)
    run.wall_s = time.time() - started
    if run.exit_code != 0:
        tail = run.log.read_text()[-2000:] if run.log.exists() else ""
        raise RuntimeError(f"{run.arm} seed {run.seed} failed (exit {run.exit_code}); log {run.log}:\n{tail}")
    return run


@contextlib.contextmanager
def daemon_log(path: Path) -> Iterator[None]:
    """The managing daemon's own log (its decisions, no-change answers included, at INFO) in ``path``,
    beside the job's; the console keeps only warnings, as before. Arms run one at a time."""
    handler = logging.FileHandler(path, mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.setLevel(logging.INFO)
    atm_log = logging.getLogger("atm")
    level = atm_log.level
    quieted = [h for h in logging.getLogger().handlers if h.level == logging.NOTSET]
    for h in quieted:
        h.setLevel(logging.WARNING)
    atm_log.addHandler(handler)
    atm_log.setLevel(logging.INFO)
    try:
        yield
    finally:
        atm_log.removeHandler(handler)
        atm_log.setLevel(level)
        for h in quieted:
            h.setLevel(logging.NOTSET)
        handler.close()


def job_env() -> dict[str, str]:
    """The environment for a training process: ours, minus any MLflow run or experiment we are inside
    (MLflow exports them for child processes; a job must start its own run in its own store)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def applied(records: Sequence[DecisionRecord]) -> list[DecisionRecord]:
    return [r for r in records if r.status == Status.APPLIED]


def stacked_remedies(records: Sequence[DecisionRecord], eval_steps: Sequence[int], evals: int = 3) -> tuple[int, int]:
    """(stacked, remedies): of the applied remedies that followed an earlier one for the same diagnosis,
    how many were decided before ``evals`` evaluations had come in after the earlier one took effect,
    that is before its effect could be known. Reverts and divergence (where speed wins) are not
    counted. Pure; ``eval_steps`` sorted."""
    import bisect

    stacked = followers = 0
    done = applied(records)
    for i, rec in enumerate(done):
        if rec.reverts is not None or rec.diagnosis == Diagnosis.DIVERGENCE or not rec.changes:
            continue
        prev = next((p for p in reversed(done[:i]) if p.diagnosis == rec.diagnosis and p.changes), None)
        if prev is None:
            continue
        followers += 1
        start = (prev.effective_step - 1) if prev.effective_step is not None else rec.step
        seen = bisect.bisect_right(eval_steps, rec.step) - bisect.bisect_right(eval_steps, start)
        stacked += seen < evals
    return stacked, followers


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / len(xs)) ** 0.5


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def init_store(tracking_uri: str, experiment: str) -> None:
    """Create the store's tables once, before several training processes open the sqlite file at once."""
    from atm.adapters import RunNotFound
    from atm.adapters.mlflow_backend import MlflowBackend

    try:
        MlflowBackend(tracking_uri).running_runs(experiment)
    except RunNotFound:
        pass


def finished_run(done_path: Path, settings: Any) -> dict[str, Any] | None:
    """What an earlier invocation recorded for this run (``--resume``), if it ran with the same ``settings``."""
    if not done_path.exists():
        return None
    done = json.loads(done_path.read_text())
    return done if done.get("settings") == settings else None


def record_finished(done_path: Path, settings: Any, **payload: Any) -> None:
    """Record a finished run for ``--resume``: the settings it ran with, and what a later invocation reuses."""
    done_path.write_text(json.dumps({"settings": settings, **payload}))


def run_records(tracking_uri: str, run_id: str | None) -> list[DecisionRecord]:
    """A run's decision records as they stand: the daemon's log merged with the acks on the run."""
    from atm.adapters.mlflow_backend import MlflowBackend
    from atm.watcher.reconcile import reconcile

    if not run_id:
        return []
    backend = MlflowBackend(tracking_uri)
    return reconcile(backend.read_log(run_id), backend.poll(run_id))[0]


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "atm.training.workloads.cli", *args]


def seed_count(args: argparse.Namespace) -> int:
    """Seeds per arm: as given, else one for a --quick smoke run, else the benchmark's default."""
    if getattr(args, "seeds", None) is not None:
        return int(args.seeds)
    return 1 if getattr(args, "quick", False) else int(getattr(args, "default_seeds", 3))


def default_out(name: str) -> Path:
    return Path("results") / name


def common_args(p: argparse.ArgumentParser, seeds: int) -> None:
    # None until resolved by seed_count(): --quick alone means one seed, --quick --seeds 3 means three.
    p.add_argument("--seeds", type=int, default=None, help=f"seeds per arm (default {seeds}; 1 with --quick)")
    p.set_defaults(default_seeds=seeds)
    p.add_argument("--proposers", default=None, help="managed arms: rules,llm (default: rules, plus llm if installed)")
    p.add_argument("--quick", action="store_true", help="a smoke run: small budget, one seed unless --seeds is given")
    p.add_argument("--out", type=Path, default=None, help="results folder (default ./results/WORKLOAD)")
    p.add_argument("--interval", type=float, default=2.0, help="daemon poll interval for managed arms (s)")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs already finished in --out with the same settings (after an interruption)")
