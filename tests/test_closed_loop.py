"""End to end on MLflow: a real torch job with the two-line listener, the daemon in another process.

The job (tests/jobs/overfit_job.py) overfits for real; the daemon watches it through a real
sqlite tracking store. The job writes a trace of what its optimizer actually used at every
step, so the tests check the effect inside the job, not only the records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atm.policies import load_policy

JOB = Path(__file__).parent / "jobs" / "overfit_job.py"


def start_job(tmp: Path, uri: str, steps: int = 360, sleep: float = 0.05) -> tuple[subprocess.Popen, str]:
    rid_file = tmp / "run_id"
    proc = subprocess.Popen(
        [sys.executable, str(JOB), "--tracking-uri", uri, "--steps", str(steps), "--step-sleep", str(sleep),
         "--trace", str(tmp / "trace.json"), "--run-id-file", str(rid_file)],
        stdout=open(tmp / "job.log", "w"), stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while not rid_file.exists() or not rid_file.read_text():
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"job did not start: {(tmp / 'job.log').read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, rid_file.read_text()


def start_daemon(tmp: Path, uri: str, run_id: str, name: str = "daemon") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "atm.watcher.cli", "watch", "--backend", "mlflow", "--run", run_id,
         "--tracking-uri", uri, "--policy", "lm", "--proposer", "rules", "--interval", "0.5"],
        stdout=open(tmp / f"{name}.log", "a"), stderr=subprocess.STDOUT,
    )


def atm_history(uri: str, run_id: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, "-m", "atm.watcher.cli", "history", "--backend", "mlflow", "--run", run_id,
         "--tracking-uri", uri, "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(out.stdout)


def value_changes(trace: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, new value) at every step where the optimizer's value of ``key`` changed."""
    out, prev = [], trace[0][key]
    for row in trace[1:]:
        if row[key] != prev:
            out.append((row["step"], row[key]))
            prev = row[key]
    return out


def wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def check_applied_exactly_once(tmp: Path, uri: str, run_id: str) -> list[dict]:
    data = json.loads((tmp / "trace.json").read_text())
    hist = atm_history(uri, run_id)
    applied = [h for h in hist if h["status"] == "applied"]
    assert applied, f"no intervention applied; history: {hist}\n{(tmp / 'daemon.log').read_text()[-3000:]}"
    # Every seq appears once in the history, once in what the job applied, and in order.
    seqs = [h["seq"] for h in hist]
    assert len(seqs) == len(set(seqs))
    assert data["applied_seqs"] == sorted(data["applied_seqs"])
    assert data["applied_seqs"] == [h["seq"] for h in hist if h["status"] in ("applied", "failed")]
    # No decision was taken twice on the same evaluation.
    decided = [h["step"] for h in hist if h["status"] in ("applied", "pending")]
    assert len(decided) == len(set(decided))
    policy = load_policy("lm")
    trace = data["trace"]
    for h in applied:
        assert h["applied_step"] > h["step"], "an update lands after the step it was decided on"
        for param, ch in h["changes"].items():
            rule = policy.params[param]
            assert rule.min <= ch["new"] <= rule.max
            # The job's optimizer really carried the new value from the applied step on.
            row = trace[h["applied_step"] - 1]
            assert row["step"] == h["applied_step"]
            if param in row:
                assert row[param] == pytest.approx(ch["new"], rel=1e-6)
            # ... which is what its acknowledgement reported, and the history shows.
            assert h["applied_values"][param] == pytest.approx(ch["new"], rel=1e-6)
    # Each change in the job's trace corresponds to exactly one applied update.
    for param in ("lr", "dropout", "weight_decay"):
        changes_in_job = value_changes(trace, param)
        changes_recorded = [(h["applied_step"], h["changes"][param]["new"]) for h in applied if param in h["changes"]]
        assert [(s, pytest.approx(v)) for s, v in changes_in_job] == changes_recorded
    return hist


@pytest.mark.slow
def test_overfitting_job_is_managed_end_to_end(tmp_path: Path, mlflow_uri: str) -> None:
    job, run_id = start_job(tmp_path, mlflow_uri)
    daemon = start_daemon(tmp_path, mlflow_uri, run_id)
    try:
        assert wait_exit(job, 240) == 0, (tmp_path / "job.log").read_text()[-3000:]
        # The daemon exits by itself once the run it watches has finished.
        assert wait_exit(daemon, 60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        for p in (job, daemon):
            if p.poll() is None:
                p.kill()
    hist = check_applied_exactly_once(tmp_path, mlflow_uri, run_id)
    assert hist[0]["diagnosis"] == "overfitting"
    assert hist[0]["source"] == "rules" and hist[0]["rationale"]

    # Reviewable in MLflow without atm: tags, the decision log artifact, atm/* metrics at the applied step.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    run = client.get_run(run_id)
    assert "atm.update.000001" in run.data.tags and "atm.ack.000001" in run.data.tags
    assert run.data.tags["atm.latest"].startswith(f"#{hist[-1]['seq']} ")
    assert "atm/interventions.jsonl" in {f.path for f in client.list_artifacts(run_id, "atm")}
    first = hist[0]
    param = next(iter(first["changes"]))
    logged = {m.step: m.value for m in client.get_metric_history(run_id, f"atm/{param}")}
    # On the run's own step axis: at the job's last logged step when the change was applied.
    assert any(v == pytest.approx(first["changes"][param]["new"])
               for s, v in logged.items() if first["step"] <= s <= first["applied_step"]), logged

    # No stacking: a second remedy for the same problem came only once the first had had the
    # policy's settle evaluations; every change ends strictly inside the bounds, not at them.
    policy = load_policy("lm")
    evals = sorted(m.step for m in client.get_metric_history(run_id, "val_loss"))
    applied = [h for h in hist if h["status"] == "applied"]
    for a, b in zip(applied, applied[1:]):
        if a["diagnosis"] == b["diagnosis"] and b["diagnosis"] != "divergence" and b["reverts"] is None:
            seen = [s for s in evals if a["effective_step"] <= s <= b["step"]]
            assert len(seen) >= policy.limits.settle.evals, (a, b)
    last = {p: h["changes"][p]["new"] for h in applied for p in h["changes"]}
    for p in ("lr", "weight_decay"):
        if p in last:
            assert policy.params[p].min < last[p] < policy.params[p].max, (p, last[p])
    assert all(h["effect"] in (None, "helped", "neutral", "hurt", "unknown") for h in hist)


@pytest.mark.slow
def test_daemon_killed_mid_run_neither_repeats_nor_loses_updates(tmp_path: Path, mlflow_uri: str) -> None:
    job, run_id = start_job(tmp_path, mlflow_uri, steps=420)
    daemon = start_daemon(tmp_path, mlflow_uri, run_id)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    try:
        deadline = time.time() + 180
        while "atm.update.000001" not in client.get_run(run_id).data.tags:
            assert time.time() < deadline and job.poll() is None, "no first update before the job ended"
            time.sleep(0.2)
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.wait(10)
        time.sleep(2.0)  # the job trains on unmanaged for a while
        daemon = start_daemon(tmp_path, mlflow_uri, run_id)
        assert wait_exit(job, 240) == 0, (tmp_path / "job.log").read_text()[-3000:]
        assert wait_exit(daemon, 60) == 0
    finally:
        for p in (job, daemon):
            if p.poll() is None:
                p.kill()
    hist = check_applied_exactly_once(tmp_path, mlflow_uri, run_id)
    # Every update published on the run is in the history, applied, once.
    tags = client.get_run(run_id).data.tags
    published = sorted(int(k.rsplit(".", 1)[1]) for k in tags if k.startswith("atm.update."))
    applied = [h["seq"] for h in hist if h["status"] == "applied"]
    # An update published in the job's last moments may find no further step to apply at: it is
    # recorded as expired (stale), never silently pending.
    expired = [h["seq"] for h in hist if h["status"] == "stale" and h["reason"].startswith("expired")]
    assert published == sorted(applied + expired)
    assert len(expired) <= 1 and all(s > max(applied) for s in expired)
    assert all(h["status"] != "pending" for h in hist)


def test_sigterm_stops_the_daemon_cleanly(tmp_path: Path, mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("sigterm")).info.run_id
    client.log_metric(rid, "val_loss", 1.0, step=1)
    daemon = start_daemon(tmp_path, mlflow_uri, rid)
    try:
        deadline = time.time() + 60
        while "watching" not in (tmp_path / "daemon.log").read_text():
            assert time.time() < deadline and daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            time.sleep(0.2)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
