"""MLflow specifics: the step-window fast path (sqlite and a real `mlflow server`), step-less metrics, limits."""

from __future__ import annotations

import pytest

from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.schema import Change, DecisionRecord, Diagnosis, Status


class CountingBackend(MlflowBackend):
    """The real backend, counting how often it falls back to downloading a whole metric history."""

    full_reads = 0

    def _full_history(self, run_id, key):
        self.full_reads += 1
        return super()._full_history(run_id, key)


def _incremental_reads_use_step_windows(uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment("win")).info.run_id
    for s in range(50):
        client.log_metric(rid, "train_loss", 1.0 / (s + 1), step=s)
    backend = CountingBackend(uri)
    assert len(backend.poll(rid).history["train_loss"]) == 50
    for s in range(50, 60):
        client.log_metric(rid, "train_loss", 1.0 / (s + 1), step=s)
    view = backend.poll(rid)
    assert [s for s, _ in view.history["train_loss"]] == list(range(60))
    assert backend.full_reads == 0, "new points must come from the step-window query, not a full re-read"


def test_sqlite_store_reads_only_new_step_windows(mlflow_uri: str) -> None:
    _incremental_reads_use_step_windows(mlflow_uri)


@pytest.mark.server
def test_mlflow_server_reads_only_new_step_windows(mlflow_server: str) -> None:
    _incremental_reads_use_step_windows(mlflow_server)


def _first_read_of_a_long_metric_is_paged(uri: str) -> None:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment("paged")).info.run_id
    # 6,000 points a step apart and 600 an evaluation (every 10 steps): more than one step-window
    # read returns (2,500) before the store downsamples.
    for lo in range(0, 6000, 1000):
        client.log_batch(rid, metrics=[Metric("train_loss", 1.0 / (s + 1), 0, s) for s in range(lo, lo + 1000)]
                         + [Metric("val_loss", 2.0 / (s + 1), 0, s) for s in range(lo, lo + 1000, 10)])
    backend = CountingBackend(uri)
    view = backend.poll(rid)
    assert [s for s, _ in view.history["train_loss"]] == list(range(6000))
    assert [s for s, _ in view.history["val_loss"]] == list(range(0, 6000, 10))
    assert backend.full_reads == 0, "a long first read goes in step-window pages, not the whole-history call"


def test_sqlite_store_reads_a_long_metric_in_pages(mlflow_uri: str) -> None:
    _first_read_of_a_long_metric_is_paged(mlflow_uri)


@pytest.mark.server
def test_mlflow_server_reads_a_long_metric_in_pages(mlflow_server: str) -> None:
    _first_read_of_a_long_metric_is_paged(mlflow_server)


@pytest.mark.server
def test_mlflow_server_update_roundtrip(mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    rid = client.create_run(client.create_experiment("roundtrip")).info.run_id
    backend = MlflowBackend(mlflow_server)
    rec = DecisionRecord(run_id=rid, seq=1, step=10, status=Status.PENDING, source="rules",
                         diagnosis=Diagnosis.PLATEAU, changes={"lr": Change(old=1e-3, new=5e-4)})
    backend.reserve_seq(rid, 1)
    backend.publish(rec)
    backend.write_log(rid, [rec])
    assert [u.seq for u in MlflowChannel(rid, mlflow_server).fetch(0)] == [1]
    assert [r.seq for r in MlflowBackend(mlflow_server).read_log(rid)] == [1]


def test_stepless_metrics_are_numbered_by_arrival(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("stepless")).info.run_id
    backend = MlflowBackend(mlflow_uri)
    for v in (3.0, 2.0):
        client.log_metric(rid, "loss", v)
    backend.poll(rid)
    client.log_metric(rid, "loss", 1.0)
    pts = backend.poll(rid).history["loss"]
    assert [v for _, v in pts] == [3.0, 2.0, 1.0]
    assert [s for s, _ in pts] == [0, 1, 2]


def _stepless_metric_is_read_from_its_last_point_on(uri: str) -> None:
    # Every poll read a step-less metric whole (the step-window query cannot tell its new points):
    # a run logging without step= for days cost its whole history per poll.
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from atm.adapters.base import release_history

    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment("stepless-tail")).info.run_id
    backend = CountingBackend(uri)
    client.log_batch(rid, metrics=[Metric("loss", 1.0 / (i + 1), 1000 + i, 0) for i in range(3000)])
    backend.poll(rid)
    client.log_batch(rid, metrics=[Metric("loss", 0.5, 5000, 0)])
    release_history(backend.poll(rid).history, 256)  # seen to be step-less: read whole, once
    backend.full_reads = 0
    client.log_batch(rid, metrics=[Metric("loss", v, 5001 + i, 0) for i, v in enumerate((0.25, float("nan")))])
    pts = backend.poll(rid).history["loss"]
    assert backend.full_reads == 0, "the new points must come from an offset read, not the whole history"
    assert len(pts) == 3003 and pts[3000] == (3000, 0.5) and pts[3001] == (3001, 0.25) and pts[-1][0] == 3002
    # A point logged with an earlier time than the last one read shifts the store's order: read whole.
    client.log_batch(rid, metrics=[Metric("loss", 0.125, 1500, 0), Metric("loss", 0.0625, 6000, 0)])
    pts = backend.poll(rid).history["loss"]
    assert backend.full_reads == 1
    assert len(pts) == 3005 and pts[501] == (501, 0.125) and pts[3002] == (3002, 0.25) and pts[-1] == (3004, 0.0625)


def test_sqlite_store_reads_a_stepless_metric_from_its_last_point_on(mlflow_uri: str) -> None:
    _stepless_metric_is_read_from_its_last_point_on(mlflow_uri)


@pytest.mark.server
def test_mlflow_server_reads_a_stepless_metric_from_its_last_point_on(mlflow_server: str) -> None:
    _stepless_metric_is_read_from_its_last_point_on(mlflow_server)


def test_a_job_resumed_from_a_checkpoint_keeps_its_step_axis(mlflow_uri: str) -> None:
    # Seen in a trial: killed at step 140 and resumed from its step-100 checkpoint into the same run,
    # the job logged steps 101-140 again; read as row numbers from then on, the run's steps were lost
    # and the daemon waited for evaluations past step 140 that never came (by its numbering).
    import time as _time

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("resumed")).info.run_id
    backend = MlflowBackend(mlflow_uri)
    for step in range(10, 150, 10):
        client.log_metric(rid, "val_loss", 1.0, step=step)
    backend.poll(rid)
    _time.sleep(0.01)
    for step in range(110, 170, 10):  # the resumed job: 110..140 again, then on
        client.log_metric(rid, "val_loss", 0.5, step=step)
        backend.poll(rid)
    pts = backend.poll(rid).history["val_loss"]
    assert [s for s, _ in pts] == list(range(10, 170, 10))
    assert dict(pts)[100] == 1.0 and dict(pts)[120] == 0.5 and dict(pts)[160] == 0.5  # the newest point per step


def test_an_infinite_value_is_read_back_as_infinite(mlflow_uri: str) -> None:
    # MLflow's sqlite store keeps inf as the largest float: read as finite, a blown-up loss broke
    # the daemon's statistics (OverflowError) instead of being seen as divergence.
    import math

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("inf")).info.run_id
    for step, v in ((1, 1.0), (2, math.inf), (3, -math.inf)):
        client.log_metric(rid, "train_loss", v, step=step)
    assert MlflowBackend(mlflow_uri).poll(rid).history["train_loss"] == [(1, 1.0), (2, math.inf), (3, -math.inf)]


def test_oversized_update_is_refused_not_truncated(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("big")).info.run_id
    changes = {f"loss_weight.term_{i:03d}": Change(old=1.0, new=2.0) for i in range(200)}
    rec = DecisionRecord(run_id=rid, seq=1, step=1, status=Status.PENDING, source="rules",
                         diagnosis=Diagnosis.LOSS_IMBALANCE, changes=changes)
    with pytest.raises(ValueError, match="tags hold"):
        MlflowBackend(mlflow_uri).publish(rec)


def test_running_runs_of_an_experiment(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("many")
    live = [client.create_run(exp).info.run_id for _ in range(3)]
    done = client.create_run(exp).info.run_id
    client.set_terminated(done, "FINISHED")
    assert sorted(MlflowBackend(mlflow_uri).running_runs("many")) == sorted(live)
    monkeypatch.setattr("atm.adapters.mlflow_backend.LIST_PAGE", 2)  # more running runs than one search returns
    assert sorted(MlflowBackend(mlflow_uri).running_runs("many")) == sorted(live)
    from atm.adapters.base import RunNotFound

    with pytest.raises(RunNotFound, match="no MLflow experiment"):
        MlflowBackend(mlflow_uri).running_runs("nope")


def test_every_run_of_an_experiment_oldest_first(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    from atm.adapters.base import RunNotFound

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment("sweep")
    # Created out of the order they started in; ended ones and a running one alike.
    started = {3000: "FINISHED", 1000: "FAILED", 2000: None, 4000: "KILLED"}
    ids = {t: client.create_run(exp, start_time=t).info.run_id for t in started}
    for t, status in started.items():
        if status:
            client.set_terminated(ids[t], status)
    client.create_run(client.create_experiment("another"))
    oldest_first = [ids[t] for t in sorted(started)]
    assert MlflowBackend(mlflow_uri).experiment_runs("sweep") == oldest_first
    monkeypatch.setattr("atm.adapters.mlflow_backend.LIST_PAGE", 3)  # more runs than one search returns
    assert MlflowBackend(mlflow_uri).experiment_runs("sweep") == oldest_first
    assert MlflowBackend(mlflow_uri).running_runs("sweep") == [ids[2000]]
    with pytest.raises(RunNotFound, match="no MLflow experiment named 'nope'"):
        MlflowBackend(mlflow_uri).experiment_runs("nope")


def test_a_mistyped_store_path_is_refused_not_created(tmp_path) -> None:
    from atm.adapters.mlflow_backend import MlflowBackend

    path = tmp_path / "typo" / "mlflow.db"
    with pytest.raises(ValueError, match=r"no MLflow store at .*typo/mlflow.db.*--tracking-uri"):
        MlflowBackend(f"sqlite:///{path}", existing=True)
    assert not path.parent.exists()


def test_stray_rows_are_those_past_the_newest_point_and_logged_before_it() -> None:
    from atm.adapters.mlflow_backend import stray_rows

    job = [(1, 0.9, 100), (2, 0.8, 200), (3, 0.7, 400)]
    assert stray_rows(job) == []
    assert stray_rows([*job, (1000, 9.9, 300)]) == [(1000, 9.9, 300)]  # the job went on below it
    assert stray_rows([*job, (1000, 9.9, 500)]) == []  # the newest point: not known to be stray yet
    assert stray_rows([]) == []


def _job_and_a_second_writer(uri: str) -> tuple[str, object]:
    """A job logging train and val loss per epoch; another client logs val_loss at step 1004 after
    epoch 4; the job goes on to epoch 8. Returns the run id and the client."""
    import time as _time

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rid = client.create_run(client.create_experiment("second-writer")).info.run_id
    for epoch in range(1, 5):
        client.log_metric(rid, "train_loss", 1.0 / epoch, step=epoch)
        client.log_metric(rid, "val_loss", 1.0 / epoch, step=epoch)
    _time.sleep(0.01)
    client.log_metric(rid, "val_loss", 9.99, step=1004)  # the second client
    return rid, client


def test_a_point_logged_ahead_of_the_job_neither_steers_nor_silences_the_reader(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Seen on a live run: a second client logged val_loss at step 1004 of a job at epoch 4. The daemon
    # decided on 9.99 as the latest evaluation, then read none of the job's evaluations (5, 6, ...):
    # MLflow's latest point of val_loss stayed at step 1004, so nothing looked new.
    import time as _time

    rid, client = _job_and_a_second_writer(mlflow_uri)
    backend = MlflowBackend(mlflow_uri)
    assert backend.poll(rid).history["val_loss"][-1] == (1004, 9.99)  # nothing below it yet: read as it is
    for epoch in range(5, 9):
        _time.sleep(0.01)
        client.log_metric(rid, "train_loss", 1.0 / epoch, step=epoch)
        client.log_metric(rid, "val_loss", 1.0 / epoch, step=epoch)
        with caplog.at_level("WARNING", logger="atm.mlflow"):
            view = backend.poll(rid)
        assert [s for s, _ in view.history["val_loss"]] == list(range(1, epoch + 1))
    assert [s for s, _ in view.history["train_loss"]] == list(range(1, 9))
    said = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(said) == 1 and "val_loss = 9.99 at step 1004" in said[0]
    # A reader started afresh (a restarted atm-watch) leaves it out from its first read.
    fresh = MlflowBackend(mlflow_uri).poll(rid)
    assert [s for s, _ in fresh.history["val_loss"]] == list(range(1, 9))
    # The job reaching and passing that step is the run again.
    for epoch in (1004, 1005):
        client.log_metric(rid, "val_loss", 0.01, step=epoch)
    assert backend.poll(rid).history["val_loss"][-2:] == [(1004, 0.01), (1005, 0.01)]


def test_evaluations_on_another_step_axis_than_the_training_loss_are_read_once(mlflow_uri: str) -> None:
    # val_loss at the global step, train_loss at the epoch: train's later points are below val's
    # latest, which is not a point ahead of the job; no extra read, nothing left out.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("two-axes")).info.run_id
    backend = CountingBackend(mlflow_uri)
    windows = []
    real = backend._window
    backend._window = lambda *a: windows.append(a[2:]) or real(*a)  # type: ignore[method-assign]
    for epoch in range(1, 6):
        client.log_metric(rid, "val_loss", 1.0 / epoch, step=epoch * 100)
        backend.poll(rid)
        client.log_metric(rid, "train_loss", 1.0 / epoch, step=epoch)
        view = backend.poll(rid)
    assert [s for s, _ in view.history["val_loss"]] == [100, 200, 300, 400, 500]
    assert [s for s, _ in view.history["train_loss"]] == [1, 2, 3, 4, 5]
    # One read per new point, and one below val's first point (train's step 1 is under val's 100 then).
    assert len(windows) == 11 and backend.full_reads == 0
