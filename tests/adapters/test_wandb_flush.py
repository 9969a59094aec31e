"""Stale decisions with W&B offline: wandb writes an offline run's transaction log to
disk every 15 s by default, and takes its settings when the run starts (``run.settings`` is a frozen
copy; the service got them with the run), so nothing inside the job can shorten that for a live run.
The job's listener says so when it attaches, and the watcher measures the lag and says it once."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from atm.adapters.wandb_backend import WandbBackend
from atm.adapters._wandb._backend import hidden_for

from tests.adapters.test_wandb_offline import job_log, start_job, wait_for

FIX = "WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1 in the job's environment"


def test_the_time_a_point_was_held_back_is_measured_from_the_read_that_missed_it() -> None:
    assert hidden_for(None, [1.0, 2.0]) == 0.0  # a first read: nothing to compare with
    assert hidden_for(100.0, []) == 0.0
    assert hidden_for(100.0, [101.0, 102.0]) == 0.0  # logged after the last read: on time
    assert hidden_for(100.0, [86.0, 99.0]) == 14.0  # logged 14 s before a read that did not see it


@pytest.mark.parametrize("interval", [None, 1.0], ids=["wandb default", "flush every second"])
def test_the_listener_tells_an_offline_job_its_flush_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, interval: float | None
) -> None:
    import wandb

    import atm

    monkeypatch.delenv("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", raising=False)
    settings = wandb.Settings(x_transaction_log_flush_interval=interval) if interval else None
    run = wandb.init(mode="offline", dir=str(tmp_path), project="atm-flush", settings=settings)
    hp = {"lr": 0.01}
    try:
        with caplog.at_level(logging.WARNING, logger="atm"):
            listener = atm.listen(knobs={"lr": (lambda: hp["lr"], lambda v: hp.__setitem__("lr", v))})
            listener.close()
    finally:
        run.finish()
    said = [r.getMessage() for r in caplog.records if "writes its metrics to disk every" in r.getMessage()]
    if interval is None:
        assert len(said) == 1 and "every 15 s" in said[0] and FIX in said[0]
    else:
        assert said == []


@pytest.mark.slow
@pytest.mark.parametrize("flush", [False, True], ids=["wandb default", "flush every second"])
def test_the_watcher_measures_the_lag_of_an_offline_run_and_says_it_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, flush: bool
) -> None:
    job = start_job(tmp_path, "--steps", "900", "--sleep", "0.05", flush=flush)
    backend = WandbBackend(tmp_path / "wandb")
    try:
        rid = wait_for(lambda: next(iter(backend.running_runs("atm-tests")), None), job, what="the run")
        with caplog.at_level(logging.WARNING, logger="atm.wandb"):
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and backend.poll(rid).status == "RUNNING" and not any(
                    "reach the disk" in r.getMessage() for r in caplog.records):
                time.sleep(0.5)
    finally:
        job.kill()
        job.wait(10)
    said = [r.getMessage() for r in caplog.records if "reach the disk up to" in r.getMessage()]
    if flush:
        assert said == [], job_log(tmp_path)
    else:
        assert len(said) == 1 and FIX in said[0], (said, job_log(tmp_path))
