"""The contract every tracker backend keeps (atm.adapters.base), run against real trackers.

Each backend gets a harness that plays the training job's side with the tracker's own client;
the tests then speak only the Backend / Channel contract. MLflow runs against a real sqlite
store; other backends join by adding a harness to HARNESSES.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pytest

from atm.adapters.base import BackendUnavailable, RunNotFound
from atm.schema import Ack, Change, DecisionRecord, Diagnosis, ListenerInfo, Status
from atm.watcher.reconcile import reconcile


class Harness(Protocol):
    def new_run(self) -> str: ...
    def log(self, run_id: str, key: str, value: float, step: int) -> None: ...
    def finish(self, run_id: str) -> None: ...
    def backend(self) -> Any: ...
    def channel(self, run_id: str) -> Any: ...
    missing_run_id: str
    #: The experiment (MLflow) or project (W&B) ``new_run`` makes runs in.
    experiment: str


class MlflowHarness:
    missing_run_id = "0" * 32
    experiment = "contract"

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.exp = self.client.create_experiment(self.experiment)

    def new_run(self) -> str:
        return self.client.create_run(self.exp).info.run_id

    def log(self, run_id: str, key: str, value: float, step: int) -> None:
        self.client.log_metric(run_id, key, value, step=step)

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")

    def backend(self) -> Any:
        from atm.adapters.mlflow_backend import MlflowBackend

        return MlflowBackend(self.uri)

    def channel(self, run_id: str) -> Any:
        from atm.adapters.mlflow_backend import MlflowChannel

        return MlflowChannel(run_id, self.uri)


HARNESSES: dict[str, Callable[[Any], Harness]] = {
    "mlflow": lambda request: MlflowHarness(request.getfixturevalue("mlflow_uri")),
}


@pytest.fixture(params=sorted(HARNESSES))
def harness(request: pytest.FixtureRequest) -> Harness:
    return HARNESSES[request.param](request)


def record(run_id: str, seq: int, step: int = 30, status: Status = Status.PENDING) -> DecisionRecord:
    return DecisionRecord(
        run_id=run_id, seq=seq, step=step, status=status, source="rules", diagnosis=Diagnosis.OVERFITTING,
        changes={"lr": Change(old=1e-3, new=5e-4)}, rationale="val loss rising",
    )


def test_reads_incrementally(harness: Harness) -> None:
    rid = harness.new_run()
    for s in range(1, 6):
        harness.log(rid, "val_loss", 2.0 - s * 0.1, s * 10)
    backend = harness.backend()
    view = backend.poll(rid)
    assert view.moved and view.status == "RUNNING"
    assert [s for s, _ in view.history["val_loss"]] == [10, 20, 30, 40, 50]
    assert backend.poll(rid).moved is False
    for s in range(6, 9):
        harness.log(rid, "val_loss", 2.0 - s * 0.1, s * 10)
    view = backend.poll(rid)
    assert view.moved
    pts = view.history["val_loss"]
    assert [s for s, _ in pts] == [10, 20, 30, 40, 50, 60, 70, 80]
    assert pts[-1][1] == pytest.approx(1.2)


def test_a_poll_reads_the_keys_picked_and_lists_every_key(harness: Harness) -> None:
    rid = harness.new_run()
    for s in range(1, 4):
        for i, key in enumerate(("val_loss", "lr", "epoch")):
            harness.log(rid, key, 2.0 - s * 0.1 + i, s * 10 + i)  # one key a step: a W&B row is written once whole
    backend = harness.backend()
    view = backend.poll(rid, select=lambda keys: {"val_loss"})
    assert sorted(view.keys) == ["epoch", "lr", "val_loss"], "every key, read or not"
    assert [s for s, _ in view.history["val_loss"]] == [10, 20, 30]
    assert view.last_metric_time > 0
    # A key picked later is read from its start (a backend that reads every key at once has it already).
    view = backend.poll(rid, select=lambda keys: {"val_loss", "lr"})
    assert [s for s, _ in view.history["lr"]] == [11, 21, 31]


def test_a_forgotten_run_is_read_anew(harness: Harness) -> None:
    # The daemon forgets a run whose watch ended; what the backend kept for it goes, and nothing breaks.
    rid = harness.new_run()
    for s in range(1, 4):
        harness.log(rid, "val_loss", 2.0 - s * 0.1, s * 10)
    backend = harness.backend()
    backend.poll(rid)
    backend.forget(rid)
    view = backend.poll(rid)
    assert view.moved and [s for s, _ in view.history["val_loss"]] == [10, 20, 30]
    backend.forget(harness.missing_run_id)  # never read: nothing to drop


def test_publish_fetch_ack_roundtrip(harness: Harness) -> None:
    rid = harness.new_run()
    backend, channel = harness.backend(), harness.channel(rid)
    assert channel.fetch(0) == []
    backend.reserve_seq(rid, 1)
    rec = record(rid, 1)
    backend.publish(rec)
    backend.publish(rec)  # idempotent by seq
    got = channel.fetch(0)
    assert [u.seq for u in got] == [1]
    assert got[0].changes["lr"].new == pytest.approx(5e-4)
    assert channel.fetch(1) == []
    channel.ack(Ack(run_id=rid, seq=1, status="applied", applied_step=37, values={"lr": 5e-4}))
    view = backend.poll(rid)
    assert view.acks[1].applied_step == 37
    merged, changed = reconcile([rec], view)
    assert changed and merged[0].status == Status.APPLIED and merged[0].applied_step == 37
    # The job set it back itself: the ack is sent again over the first, and the record follows it.
    channel.ack(Ack(run_id=rid, seq=1, status="undone", applied_step=37, values={"lr": 1e-3}, error="a scheduler"))
    view = backend.poll(rid)
    assert view.acks[1].status == "undone"
    merged, changed = reconcile(merged, view)
    assert changed and merged[0].status == Status.UNDONE and "a scheduler" in merged[0].reason


def test_a_poll_checks_only_the_messages_new_since_the_last(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    # A run holds an update and an ack for every decision ever made; every poll parsed and checked
    # the signatures of all of them again.
    import atm.signing

    rid = harness.new_run()
    backend, channel = harness.backend(), harness.channel(rid)
    for seq in range(1, 5):
        backend.reserve_seq(rid, seq)
        backend.publish(record(rid, seq))
        channel.ack(Ack(run_id=rid, seq=seq, status="applied", applied_step=30 + seq, values={"lr": 5e-4}))
    backend.poll(rid)
    checks = []
    signature_of = atm.signing.signature_of
    monkeypatch.setattr(atm.signing, "signature_of", lambda m, k: checks.append(m) or signature_of(m, k))
    view = backend.poll(rid)
    assert sorted(view.acks) == [1, 2, 3, 4] and sorted(view.updates) == [1, 2, 3, 4] and not view.problems
    assert checks == [], "nothing new on the run: nothing to check again"
    channel.ack(Ack(run_id=rid, seq=2, status="undone", applied_step=32, values={"lr": 1e-3}, error="a scheduler"))
    checks.clear()  # the channel signs in this process too
    view = backend.poll(rid)
    assert view.acks[2].status == "undone" and len(checks) == 1, "only the ack sent again is checked"


def test_a_change_is_placed_on_the_runs_own_step_axis(harness: Harness) -> None:
    # The listener stamps its own count (9999: optimizer steps, say); the run's metrics use another
    # axis. Where the change took effect is read from when the job logged its points.
    rid = harness.new_run()
    for s in (10, 20):
        harness.log(rid, "val_loss", 1.0, s)
    backend, channel = harness.backend(), harness.channel(rid)
    backend.reserve_seq(rid, 1)
    rec = record(rid, 1, step=20)
    backend.publish(rec)
    channel.ack(Ack(run_id=rid, seq=1, status="applied", applied_step=9999, values={"lr": 5e-4}))
    merged, _ = reconcile([rec], backend.poll(rid))
    assert merged[0].status == Status.APPLIED and merged[0].effective_step is None  # nothing logged since
    harness.log(rid, "train_loss", 0.8, 25)
    harness.log(rid, "val_loss", 0.9, 30)
    merged, changed = reconcile(merged, backend.poll(rid))
    assert changed and merged[0].effective_step == 25 and merged[0].applied_step == 9999


def test_the_listeners_values_at_the_jobs_step_do_not_hide_the_jobs_points(harness: Harness) -> None:
    # The listener logs its atm/* values at the job's current step, the step of the job's next metrics:
    # those metrics are still the first the job logged after the change.
    rid = harness.new_run()
    harness.log(rid, "val_loss", 1.0, 190)
    backend, channel = harness.backend(), harness.channel(rid)
    backend.reserve_seq(rid, 1)
    rec = record(rid, 1, step=190)
    backend.publish(rec)
    channel.ack(Ack(run_id=rid, seq=1, status="applied", applied_step=197, values={"lr": 5e-4}))
    channel.log_values({"lr": 5e-4}, 200)
    for s in (200, 210):
        harness.log(rid, "val_loss", 0.9, s)
    merged, _ = reconcile([rec], backend.poll(rid))
    assert merged[0].status == Status.APPLIED and merged[0].effective_step == 200


def test_listener_info_and_applied_value_metrics(harness: Harness) -> None:
    rid = harness.new_run()
    channel = harness.channel(rid)
    channel.announce(ListenerInfo(run_id=rid, knobs=["lr"], values={"lr": 1e-3}, apply_mode="auto", pid=1, started_at=0.0))
    channel.log_values({"lr": 5e-4}, 37)
    view = harness.backend().poll(rid)
    assert view.listener is not None and view.listener.values == {"lr": pytest.approx(1e-3)}
    assert view.history["atm/lr"] == [(37, pytest.approx(5e-4))]


def test_log_roundtrip_and_restart_recovers_state(harness: Harness) -> None:
    rid = harness.new_run()
    backend = harness.backend()
    assert backend.read_log(rid) == []
    backend.reserve_seq(rid, 1)
    backend.publish(record(rid, 1))
    backend.write_log(rid, [record(rid, 1)])
    backend.reserve_seq(rid, 2)
    backend.publish(record(rid, 2, step=60))  # published, then the daemon died before writing its log
    fresh = harness.backend()  # a restarted daemon
    view = fresh.poll(rid)
    assert view.last_seq == 2
    merged, changed = reconcile(fresh.read_log(rid), view)
    assert changed and [r.seq for r in merged] == [1, 2]
    assert all(r.status == Status.PENDING for r in merged)


def test_finished_and_missing_runs(harness: Harness) -> None:
    rid = harness.new_run()
    harness.log(rid, "val_loss", 1.0, 1)
    harness.finish(rid)
    assert harness.backend().poll(rid).status == "FINISHED"
    with pytest.raises(RunNotFound):
        harness.backend().poll(harness.missing_run_id)


def test_every_run_of_an_experiment_is_listed_oldest_first(harness: Harness) -> None:
    import time

    first = harness.new_run()
    harness.log(first, "val_loss", 1.0, 1)
    harness.finish(first)
    time.sleep(1.1)  # W&B names a run's folder to the second
    second = harness.new_run()
    harness.log(second, "val_loss", 1.0, 1)
    backend = harness.backend()
    assert backend.experiment_runs(harness.experiment) == [first, second]  # ended or running
    assert backend.running_runs(harness.experiment) == [second]
    with pytest.raises(RunNotFound):
        backend.experiment_runs("no-such-experiment")


def test_unreachable_tracker_is_backend_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from atm.adapters.mlflow_backend import MlflowBackend

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    backend = MlflowBackend("http://127.0.0.1:9")  # the discard port: nothing listens there
    with pytest.raises(BackendUnavailable):
        backend.poll("0" * 32)
