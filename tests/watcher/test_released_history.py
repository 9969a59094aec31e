"""The daemon keeps a bounded part of each run's history: the points it folded are let go, and a
series the job rewrites afterwards (a resume from a checkpoint) is read whole again."""

from __future__ import annotations

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from atm.adapters.mlflow_backend import MlflowBackend
from atm.policies import load_policy
from atm.watcher.daemon import HISTORY_KEEP, Daemon
from atm.watcher.snapshot import RunTelemetry

LM = load_policy("lm")


def log_steps(client: MlflowClient, rid: str, steps: range, level: float = 0.0) -> None:
    ms = []
    for s in steps:
        ms.append(Metric("train_loss", 3.0 / (1 + s / 50) + level, 0, s))
        if s % 10 == 0:
            ms.append(Metric("val_loss", 2.5 / (1 + s / 80) + level, 0, s))
    for i in range(0, len(ms), 1000):
        client.log_batch(rid, metrics=ms[i:i + 1000])


def whole_snapshot(uri: str, rid: str) -> str:
    """The run's snapshot from a backend and telemetry that read its whole history at once."""
    view = MlflowBackend(uri).poll(rid)
    telemetry = RunTelemetry(LM)
    telemetry.fold(view.history)
    return telemetry.snapshot(rid, {}, [], now=0.0).model_dump_json()


def test_a_long_run_is_held_in_a_bounded_tail_and_reads_as_the_whole(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("long")).info.run_id
    backend = MlflowBackend(mlflow_uri)
    daemon = Daemon(backend, LM, interval=0.1)
    for lo in range(0, 3000, 500):  # six polls, each with 500 new steps
        log_steps(client, rid, range(lo, lo + 500))
        daemon.tick(rid)
    held = backend._cache[rid].history
    assert len(held["train_loss"]) == 3000 and len(held["val_loss"]) == 300
    assert len(held["train_loss"].steps) <= 2 * HISTORY_KEEP and held["train_loss"].dropped >= 3000 - 2 * HISTORY_KEEP
    got = daemon._states[rid].telemetry.snapshot(rid, {}, [], now=0.0).model_dump_json()
    assert got == whole_snapshot(mlflow_uri, rid)


def resumed_run(uri: str, name: str, keep: int, monkeypatch) -> RunTelemetry:  # noqa: ANN001
    """A run whose job resumes from its step-1200 checkpoint after the daemon let go of its early
    points (with ``keep`` points kept), logging those steps again on another level."""
    import atm.watcher.daemon as daemon_module

    monkeypatch.setattr(daemon_module, "HISTORY_KEEP", keep)
    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment(name)).info.run_id
    backend = MlflowBackend(uri)
    daemon = Daemon(backend, LM, interval=0.1)
    for steps, level in ((range(0, 1500), 0.0), (range(1500, 2000), 0.0), (range(1200, 1900), 0.5),
                         (range(1900, 2100), 0.5)):
        log_steps(client, rid, steps, level)
        daemon.tick(rid)
        if steps.start == 1500:
            assert (backend._cache[rid].history["train_loss"].dropped > 0) == (keep < 1000)
    return daemon._states[rid].telemetry


def test_a_job_resumed_after_its_points_were_let_go_reads_as_if_none_were(mlflow_uri: str, monkeypatch) -> None:  # noqa: ANN001
    released = resumed_run(mlflow_uri, "resumed", HISTORY_KEEP, monkeypatch)
    kept = resumed_run(mlflow_uri, "resumed-all-kept", 10**9, monkeypatch)
    assert released.series()["train_loss"].latest == 3.0 / (1 + 2099 / 50) + 0.5
    got, want = released.snapshot("r", {}, [], now=0.0).model_dump(), kept.snapshot("r", {}, [], now=0.0).model_dump()
    assert {k: v for k, v in got.items() if v != want[k]} == {}


def test_telemetry_that_needs_points_let_go_is_rebuilt_from_a_new_read(mlflow_uri: str, caplog, monkeypatch) -> None:  # noqa: ANN001
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("anew")).info.run_id
    backend = MlflowBackend(mlflow_uri)
    daemon = Daemon(backend, LM, interval=0.1)
    log_steps(client, rid, range(0, 1500))
    daemon.tick(rid)
    log_steps(client, rid, range(1500, 2000))
    old = daemon._states[rid].telemetry
    # A fake of the rare case (a metric that must be folded again from its start after its early
    # points were let go): this telemetry's next fold finds them gone.
    monkeypatch.setattr(old, "fold", lambda history: list(history["train_loss"]))
    with caplog.at_level("INFO", logger="atm.watch"):
        daemon.tick(rid)
    assert "reading its metrics anew" in caplog.text
    telemetry = daemon._states[rid].telemetry
    assert telemetry is not old and telemetry.series()["train_loss"].last_step == 1999
    assert telemetry.snapshot(rid, {}, [], now=0.0).model_dump_json() == whole_snapshot(mlflow_uri, rid)
    assert backend._cache[rid].history["train_loss"].dropped > 0  # let go again after the new read
