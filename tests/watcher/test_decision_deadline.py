"""The decision deadline on a real MLflow store: a proposer that has not answered once the run moved past
``limits.stale_after`` is not waited for, the rules decide on the run as it is now, and the late answer is dropped.

The slow proposer is a fake, named as such; the job's side is played with the real MLflow channel.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
from _runs import log_evals, overfitting_run

from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.policies import Policy, Window, load_policy
from atm.schema import Ack, Diagnosis, Proposal, Status
from atm.testing import wait_for
from atm.watcher.daemon import Daemon
from atm.watcher.proposer import ProposalResult


class SlowFakeProposer:
    """Fake proposer that answers only once released, as a model slower than the run would."""

    name = "slow-fake"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def propose(self, snapshot, policy, ctx, offer):
        self.calls += 1
        self.release.wait(10)
        return ProposalResult(Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"dropout": 0.1}), self.name)


@pytest.fixture
def slow() -> SlowFakeProposer:
    proposer = SlowFakeProposer()
    yield proposer
    proposer.release.set()  # no call left waiting past the test


def without_deadline(policy: Policy) -> Policy:
    return policy.model_copy(update={"limits": policy.limits.model_copy(update={"stale_after": Window()})})


def test_the_rules_decide_once_the_run_moved_past_stale_after_and_the_late_answer_is_dropped(
        mlflow_uri: str, slow: SlowFakeProposer, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = overfitting_run(mlflow_uri)
    backend = MlflowBackend(mlflow_uri)
    daemon = Daemon(backend, load_policy("lm"), slow, interval=0.1)  # lm: stale_after is 4 evaluations
    channel = MlflowChannel(rid, mlflow_uri)
    caplog.set_level(logging.DEBUG, logger="atm.watch")
    try:
        st = daemon.tick(rid)
        assert st.inflight is not None and st.inflight.snapshot.step == 200
        log_evals(client, rid, 21, 23)  # three evaluations: still in time
        st = daemon.tick(rid)
        assert st.inflight is not None and st.records == []
        log_evals(client, rid, 24, 24)  # the fourth: the answer could no longer come in time
        st = daemon.tick(rid)
        assert st.inflight is None
        [rec] = st.records
        assert rec.source == "fallback" and rec.status == Status.PENDING, (rec.status, rec.reason)
        assert rec.step == 240 and rec.audit["first_asked_at_step"] == 200  # decided on the run as it is now
        assert rec.audit["fallback_from"] == "slow-fake"
        assert "no answer before the run moved past limits.stale_after (4 evaluations" in rec.audit["error"]
        assert [u.seq for u in channel.fetch(0)] == [1]
        assert [r.seq for r in backend.read_log(rid)] == [1]
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "had not answered" in r.getMessage()]
        assert len(warned) == 1 and "slow-fake" in warned[0] and "faster model" in warned[0] and "limits.stale_after" in warned[0]

        # The late answer comes: it is dropped, and neither a second record nor a second update follows.
        slow.release.set()
        # Its done-callback runs on the proposer's thread once the answer is in.
        wait_for(lambda: any("past its deadline" in r.getMessage() and "dropped" in r.getMessage()
                             for r in caplog.records))
        for _ in range(2):
            st = daemon.tick(rid)
        assert [r.seq for r in st.records] == [1] and st.records[0].source == "fallback"
        assert [u.seq for u in channel.fetch(0)] == [1]
        assert [r.seq for r in backend.read_log(rid)] == [1]

        # The next decision, once the change's cooldown is over, is the proposer's own again.
        # (At an evaluation every 10 s, a pace its one timed answer keeps up with.)
        channel.ack(Ack(run_id=rid, seq=1, status="applied", applied_step=245, values=rec.proposal.changes))
        log_evals(client, rid, 25, 27, every_s=10)
        st = daemon.tick(rid, wait=True)
        assert [r.source for r in st.records] == ["fallback", "slow-fake"]
    finally:
        daemon.stop()


def test_a_call_that_never_started_is_cancelled_when_its_deadline_passes(mlflow_uri: str, slow: SlowFakeProposer) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = overfitting_run(mlflow_uri)
    # One proposal worker: the late call holds it, so the next decision's call waits for it.
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), slow, interval=0.1, proposal_workers=1)
    try:
        st = daemon.tick(rid)
        assert st.inflight is not None
        late = st.inflight.future
        log_evals(client, rid, 21, 24)
        st = daemon.tick(rid)
        assert [r.source for r in st.records] == ["fallback"]
        changes = st.records[0].proposal.changes
        MlflowChannel(rid, mlflow_uri).ack(Ack(run_id=rid, seq=1, status="applied", applied_step=245, values=changes))
        log_evals(client, rid, 25, 27)  # past the change's cooldown
        st = daemon.tick(rid)
        assert st.inflight is not None and st.inflight.snapshot.step == 270
        queued = st.inflight.future
        log_evals(client, rid, 28, 31)
        st = daemon.tick(rid)
        assert queued.cancelled() and [r.source for r in st.records] == ["fallback", "fallback"]
        slow.release.set()
        late.result(5)
        st = daemon.tick(rid)
        assert slow.calls == 1 and len(st.records) == 2
    finally:
        daemon.stop()


def test_with_no_stale_after_the_daemon_waits_for_the_slow_answer(mlflow_uri: str, slow: SlowFakeProposer) -> None:
    from mlflow.tracking import MlflowClient

    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), without_deadline(load_policy("lm")), slow, interval=0.1)
    try:
        st = daemon.tick(rid)
        assert st.inflight is not None
        log_evals(MlflowClient(mlflow_uri), rid, 21, 30)  # ten evaluations: far past the lm preset's four
        st = daemon.tick(rid)
        assert st.inflight is not None and st.records == []
        slow.release.set()
        st.inflight.future.result(5)
        st = daemon.tick(rid)
        [rec] = st.records
        assert rec.source == "slow-fake" and rec.step == 200 and rec.status == Status.PENDING, (rec.status, rec.reason)
    finally:
        daemon.stop()


def test_a_proposer_slower_than_the_runs_pace_is_not_asked_and_the_rules_decide_at_once(
        mlflow_uri: str, slow: SlowFakeProposer, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), slow, interval=0.1)
    channel = MlflowChannel(rid, mlflow_uri)
    try:
        st = daemon.tick(rid)
        first = st.inflight
        assert first is not None
        time.sleep(0.5)
        slow.release.set()  # its one timed answer took 0.5 s or more
        first.future.result(5)
        st = daemon.tick(rid)
        assert [r.source for r in st.records] == ["slow-fake"]
        slow.release.clear()
        channel.ack(Ack(run_id=rid, seq=1, status="applied", applied_step=205,
                        values=st.records[0].proposal.changes))
        # Evaluations stamped 0.1 s apart: the run passes the lm preset's stale_after (four) in 0.4 s.
        log_evals(client, rid, 21, 26, every_s=0.1)
        with caplog.at_level("WARNING", logger="atm.watch"):
            st = daemon.tick(rid)
        assert st.inflight is None and slow.calls == 1  # not asked
        second = st.records[1]
        assert second.source == "fallback" and second.step == 260 and second.audit["fallback_from"] == "slow-fake"
        assert second.audit["error"].startswith("not asked: its answers take ") and "in 0.4 s" in second.audit["error"]
        warned = [r.getMessage() for r in caplog.records if "is not asked while the run is this fast" in r.getMessage()]
        assert len(warned) == 1 and "limits.stale_after" in warned[0]
    finally:
        daemon.stop()
