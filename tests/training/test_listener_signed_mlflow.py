"""Forged tags on a real MLflow run, against a real torch job with the listener attached.

The job trains in this process (a small nn.Linear with AdamW, real optimizer steps); another
``MlflowClient`` writes tags as any colleague, notebook or script with access to the tracking
server could; the watcher's side is the real :class:`MlflowBackend`. Once on a sqlite store, and the
whole forgery set once more against a real ``mlflow server`` on loopback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn

import atm
from atm.adapters.base import ack_key, parse_messages, update_key
from atm.adapters.mlflow_backend import MlflowBackend
from atm.schema import Ack, Change, DecisionRecord, Diagnosis, Status, Update
from atm.signing import key_from_text, resolve_key, sign


class Job:
    """A real training loop: every ``step()`` is one AdamW step of a small linear model, logged to the run."""

    def __init__(self, run_id: str, **listen: object):
        torch.manual_seed(0)
        self.model = nn.Linear(4, 1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        self.lrs: list[float] = []
        self.listener = atm.listen(self.opt, run_id=run_id, backend="mlflow", poll_interval=0.05, **listen)

    def step(self) -> None:
        self.opt.zero_grad()
        self.model(torch.randn(16, 4)).pow(2).mean().backward()
        self.opt.step()
        self.lrs.append(self.opt.param_groups[0]["lr"])

    def train_until(self, cond: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
        deadline = time.time() + timeout
        while not cond():
            if time.time() > deadline:
                raise AssertionError(f"timed out: {what or cond}")
            self.step()
            time.sleep(0.01)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


def _unsigned(rid: str, seq: int, **changes: tuple[float, float]) -> Update:
    return Update(run_id=rid, seq=seq, step=10, diagnosis=Diagnosis.OVERFITTING, source="rules",
                  changes={k: Change(old=o, new=n) for k, (o, n) in changes.items()})


def _record(rid: str, seq: int, **changes: tuple[float, float]) -> DecisionRecord:
    return DecisionRecord(run_id=rid, seq=seq, step=10 * seq, status=Status.PENDING, source="rules",
                          diagnosis=Diagnosis.PLATEAU,
                          changes={k: Change(old=o, new=n, max_factor=2.0, min=0.0) for k, (o, n) in changes.items()})


def _acks(client, rid: str) -> dict[int, Ack]:
    return parse_messages(client.get_run(rid).data.tags).acks


def _forgeries_are_refused_and_the_watcher_still_steers(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    attacker = MlflowClient(uri)
    rid = attacker.create_run(attacker.create_experiment("forgery")).info.run_id
    job = Job(rid)
    try:
        job.train_until(lambda: "atm.listener" in attacker.get_run(rid).data.tags, what="the listener's announcement")
        other = key_from_text("a-colleagues-own-atm-key", "other")
        attacker.set_tag(rid, update_key(1), _unsigned(rid, 1, lr=(1e-3, 10.0)).model_dump_json())
        attacker.set_tag(rid, update_key(2), _unsigned(rid, 2, lr=(1e-3, -1.0)).model_dump_json())
        attacker.set_tag(rid, update_key(3), _unsigned(rid, 3, lr=(1e-9, 1e-3)).model_dump_json())
        attacker.set_tag(rid, update_key(4), '{"run_id": "' + rid + '", "seq": 4, "changes": {"lr": ')
        attacker.set_tag(rid, update_key(5), sign(_unsigned(rid, 5, lr=(1e-3, 2e-3)), other).model_dump_json())
        attacker.set_tag(rid, ack_key(50), Ack(run_id=rid, seq=50, status="applied", applied_step=1).model_dump_json())
        job.train_until(lambda: set(_acks(attacker, rid)) >= {1, 2, 3, 4, 5}, what="rejections of #1-#5")
        for _ in range(20):
            job.step()
        assert job.lr == 1e-3 and max(job.lrs) == 1e-3 and min(job.lrs) == 1e-3
        acks = _acks(attacker, rid)
        assert all(acks[s].status == "rejected" for s in range(1, 6))
        assert "update #1 is not signed" in acks[1].error
        assert "tag atm.update.000004: not a valid update" in acks[4].error
        assert f"signed with key id {other.key_id}, this job has key id {resolve_key().key_id}" in acks[5].error

        # The watcher's side sees only its own updates, and reports the rest.
        watcher = MlflowBackend(uri)
        view = watcher.poll(rid)
        assert view.updates == {} and 50 not in view.acks and view.last_seq >= 5
        reported = " | ".join(str(p) for p in view.problems)
        for needle in ("update #1 is not signed", "tag atm.update.000004: not a valid update",
                       f"update #5 is signed with key id {other.key_id}", "ack #50 is not signed"):
            assert needle in reported

        # ... and still steers the job.
        watcher.reserve_seq(rid, 6)
        watcher.publish(_record(rid, 6, lr=(1e-3, 5e-4)))
        job.train_until(lambda: 6 in _acks(attacker, rid), what="the watcher's update #6")
        assert job.lr == pytest.approx(5e-4) and _acks(attacker, rid)[6].status == "applied"
        assert [u.seq for u in job.listener.applied] == [6]
        assert list(watcher.poll(rid).updates) == [6]
    finally:
        job.listener.close()

    # A job resumed on the same run: the forged far ack does not make it skip the watcher's next update,
    # and #6 is not applied a second time.
    resumed = Job(rid)
    try:
        watcher.reserve_seq(rid, 7)
        watcher.publish(_record(rid, 7, weight_decay=(0.01, 0.02)))
        resumed.train_until(lambda: _acks(attacker, rid).get(7) is not None, what="update #7 after the restart")
        assert [u.seq for u in resumed.listener.applied] == [7]
        assert resumed.opt.param_groups[0]["weight_decay"] == pytest.approx(0.02) and resumed.lr == 1e-3
    finally:
        resumed.listener.close()


def test_forged_tags_are_refused_on_a_sqlite_store(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forgeries_are_refused_and_the_watcher_still_steers(mlflow_uri, monkeypatch)


@pytest.mark.server
def test_forged_tags_are_refused_through_an_mlflow_server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _forgeries_are_refused_and_the_watcher_still_steers(mlflow_server, monkeypatch)


def test_a_job_with_another_key_rejects_the_watchers_updates_and_trains_on(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("wrong-key")).info.run_id
    job_key = "the-job-was-given-another-key"
    with caplog.at_level("WARNING", logger="atm.listener"):
        job = Job(rid, key=job_key)
        try:
            watcher = MlflowBackend(mlflow_uri)
            watcher.reserve_seq(rid, 1)
            watcher.publish(_record(rid, 1, lr=(1e-3, 5e-4)))
            job.train_until(lambda: 1 in _acks(client, rid), what="the rejection")
            steps = len(job.lrs)
            for _ in range(10):
                job.step()
            assert len(job.lrs) == steps + 10 and job.lr == 1e-3
            ack = _acks(client, rid)[1]
            assert ack.status == "rejected"
            assert (f"update #1 is signed with key id {resolve_key().key_id}, this job has key id "
                    f"{key_from_text(job_key, 'x').key_id} (from atm.listen(key=...)): give both sides the same ATM_KEY") in ack.error
            assert caplog.text.count("update #1 is signed with key id") == 1
            # The job's acks are signed with its own key, so the watcher does not take them either.
            assert 1 not in watcher.poll(rid).acks
        finally:
            job.listener.close()


def test_the_update_tag_written_by_the_backend_is_signed_and_carries_its_limits(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("signed-tag")).info.run_id
    MlflowBackend(mlflow_uri).publish(_record(rid, 1, lr=(1e-3, 5e-4)))
    body = json.loads(client.get_run(rid).data.tags[update_key(1)])
    assert body["key_id"] == resolve_key().key_id and len(body["signature"]) == 64
    assert body["changes"]["lr"] == {"old": 1e-3, "new": 5e-4, "max_factor": 2.0, "min": 0.0}


def test_a_restarted_job_checks_each_of_its_earlier_acks_once(mlflow_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A job restarted on a run with a long history reads its earlier acks at start: one signature check each.
    from collections import Counter

    from mlflow.tracking import MlflowClient

    import atm.training.listener as listener_module
    from atm.adapters.mlflow_backend import MlflowChannel

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("restart")).info.run_id
    backend = MlflowBackend(mlflow_uri)
    for seq in (1, 2, 3):
        backend.reserve_seq(rid, seq)
        backend.publish(_record(rid, seq, lr=(1e-3, 5e-4)))
    earlier = MlflowChannel(rid, mlflow_uri)  # the job's process before the restart
    earlier.ack(Ack(run_id=rid, seq=1, status="applied", applied_step=10))
    earlier.ack(Ack(run_id=rid, seq=2, status="applied", applied_step=20))
    # A rejection above the last applied change: the restart reads the updates too, to judge it.
    earlier.ack(Ack(run_id=rid, seq=3, status="rejected", applied_step=30, error="lr below the job's floor"))

    checked: Counter[int] = Counter()
    real_verify = listener_module.verify

    def spy_verify(message: object, *args: object, **kwargs: object) -> object:
        if isinstance(message, Ack):
            checked[message.seq] += 1
        return real_verify(message, *args, **kwargs)

    monkeypatch.setattr(listener_module, "verify", spy_verify)
    job = Job(rid)
    try:
        # Past start-up and the background thread's first cycles (the announcement is made in the first).
        job.train_until(lambda: "atm.listener" in client.get_run(rid).data.tags, what="the listener's announcement")
        job.train_until(lambda: len(job.lrs) >= 20)
        assert job.listener._last_applied == 3 and job.listener.applied == []  # resumed after #3: nothing again
    finally:
        job.listener.close()
    assert checked == {1: 1, 2: 1, 3: 1}
