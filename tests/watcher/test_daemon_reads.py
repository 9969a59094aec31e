"""The daemon reads only the metrics its policy maps, on a real MLflow store: a run that also logs twenty
keys no role reads is decided on as the same run without them, those keys cost no read, and the
warning about a missing evaluation metric still names them.

The step-window reads are counted by a spy on ``MlflowBackend._window_rows`` (the real read runs)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.policies import load_policy
from atm.schema import Ack, DecisionRecord, Status
from atm.watcher.daemon import Daemon

from _runs import log_evals, overfitting_run

NOISE = ("epoch", "gpu/utilization", "step_time", "throughput/tokens_per_s", "memory/allocated_gb",
         *(f"weights/layer_{i:02d}/norm" for i in range(15)))


@pytest.fixture
def window_reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Step-window reads by metric key."""
    reads: Counter[str] = Counter()
    real = MlflowBackend._window_rows

    def spy(self: MlflowBackend, run_id: str, key: str, start: int, end: int) -> list[tuple[int, float, int]] | None:
        reads[key] += 1
        return real(self, run_id, key, start, end)

    monkeypatch.setattr(MlflowBackend, "_window_rows", spy)
    return reads


def _log_noise(client: MlflowClient, rid: str, steps: range) -> None:
    for step in steps:
        client.log_batch(rid, metrics=[Metric(k, 0.5 + i + step / 1000, 1_700_000_000_000 + step, step)
                                       for i, k in enumerate(NOISE)])


def _decided(records: list[DecisionRecord]) -> list[dict[str, Any]]:
    """What a decision is, without what names the run or the moment it was made."""
    out = []
    for r in records:
        d = r.model_dump(include={"seq", "step", "status", "source", "diagnosis", "changes", "action", "rationale",
                                  "reason", "dropped", "effect", "effective_step"})
        d["snapshot"] = r.snapshot.model_dump(exclude={"run_id", "run_name", "taken_at"}) if r.snapshot else None
        out.append(d)
    return out


def test_a_run_with_many_unmapped_keys_is_decided_on_as_without_them(mlflow_uri: str, window_reads: Counter[str]) -> None:
    assert len(NOISE) == 20
    client = MlflowClient(mlflow_uri)
    plain = overfitting_run(mlflow_uri, experiment="plain")
    noisy = overfitting_run(mlflow_uri, experiment="noisy")
    _log_noise(client, noisy, range(10, 201, 10))
    daemons = {rid: Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1) for rid in (plain, noisy)}

    def tick() -> dict[str, list[dict[str, Any]]]:
        return {rid: _decided(d.tick(rid, wait=True).records) for rid, d in daemons.items()}

    got = tick()
    assert [r["status"] for r in got[noisy]] == [Status.PENDING]
    assert got[noisy] == got[plain]
    assert set(window_reads) == {"train_loss", "val_loss"}, "the keys no role reads cost no read"

    # The job applies it and trains on; both runs are judged and decided on alike.
    for rid in (plain, noisy):
        MlflowChannel(rid, mlflow_uri).ack(Ack(run_id=rid, seq=1, status="applied", applied_step=205,
                                               values={"dropout": 0.1}))
        log_evals(client, rid, 21, 32)
    _log_noise(client, noisy, range(210, 321, 10))
    for _ in range(2):
        got = tick()
        assert got[noisy] == got[plain]
    assert got[noisy][0]["status"] == Status.APPLIED
    assert set(window_reads) == {"train_loss", "val_loss"}
    assert daemons[noisy].status[noisy].step == daemons[plain].status[plain].step == 320
    for d in daemons.values():
        d.stop()


def test_the_missing_evaluation_metric_is_said_with_every_key_the_run_logs(
    mlflow_uri: str, window_reads: Counter[str], caplog: pytest.LogCaptureFixture
) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("no-eval")).info.run_id
    for step in range(25):  # past MISSING_METRIC_AFTER: its evaluations are not coming
        client.log_metric(rid, "train_loss", 2.0 - step / 100, step=step)
    _log_noise(client, rid, range(25))
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    with caplog.at_level("WARNING", logger="atm.watch"):
        daemon.tick(rid, wait=True)
    daemon.stop()
    said = [r.getMessage() for r in caplog.records if "no metric for val_loss" in r.getMessage()]
    assert len(said) == 1
    shown = ", ".join(sorted([*NOISE, "train_loss"])[:12])
    assert f"the run logs: {shown} and 9 more." in said[0]
    assert daemon.status[rid].note.startswith("unmapped: val_loss")
    assert set(window_reads) == {"train_loss"}


def test_a_run_none_of_whose_keys_maps_gets_one_read_and_is_told_about(
    mlflow_uri: str, window_reads: Counter[str], caplog: pytest.LogCaptureFixture
) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("nothing-maps")).info.run_id
    _log_noise(client, rid, range(1, 26))  # no listener either: only its points tell it is past its start
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    with caplog.at_level("WARNING", logger="atm.watch"):
        daemon.tick(rid, wait=True)
    daemon.stop()
    # One key stands for the run's progress: its step on the status line, and when to say what it lacks.
    assert set(window_reads) == {min(NOISE)}
    assert daemon.status[rid].step == 25
    said = [r.getMessage() for r in caplog.records if "no metric for val_loss" in r.getMessage()]
    assert len(said) == 1 and "the run logs: epoch, gpu/utilization, memory/allocated_gb" in said[0]
