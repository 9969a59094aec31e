"""The daemon's decision logic on a real MLflow store: dry runs, staleness, fallback, pending updates.

The job's side is played with the real MLflow channel (what the listener uses); proposers that
misbehave on purpose are fakes, named as such.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.policies import load_policy
from atm.schema import Ack, Diagnosis, ListenerInfo, Proposal, Status, fmt
from atm.adapters.base import KeySelector, Timeline
from atm.testing import wait_for
from atm.watcher.daemon import Daemon, RunState
from atm.watcher.reconcile import step_after
from atm.watcher.proposer import ProposerError, ProposalResult

from _runs import log_evals, overfitting_run

def test_decides_publishes_and_settles_on_ack(mlflow_uri: str) -> None:
    rid = overfitting_run(mlflow_uri)
    backend = MlflowBackend(mlflow_uri)
    daemon = Daemon(backend, load_policy("lm"), interval=0.1)
    st = daemon.tick(rid, wait=True)
    assert [r.status for r in st.records] == [Status.PENDING]
    rec = st.records[0]
    assert rec.diagnosis == Diagnosis.OVERFITTING and rec.source == "rules"
    channel = MlflowChannel(rid, mlflow_uri)
    assert [u.seq for u in channel.fetch(0)] == [1]
    # While the update waits for the job, no further decision is taken.
    daemon.tick(rid, wait=True)
    assert len(st.records) == 1
    channel.ack(Ack(run_id=rid, seq=1, status="applied", applied_step=205, values={"dropout": 0.1}))
    st = daemon.tick(rid, wait=True)
    assert st.records[0].status == Status.APPLIED and st.records[0].applied_step == 205
    assert [r.seq for r in backend.read_log(rid)] == [1]
    daemon.stop()


def test_a_run_whose_watch_ended_keeps_no_decisions_in_the_daemon(mlflow_uri: str) -> None:
    # A daemon watching an experiment for months sees thousands of runs end; it kept each one's
    # decisions (snapshots and all) for as long as it lived.
    from mlflow.tracking import MlflowClient

    rid = overfitting_run(mlflow_uri)
    first = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    assert len(first.tick(rid, wait=True).records) == 1
    first.stop()
    MlflowClient(mlflow_uri).set_terminated(rid, "FINISHED")
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    daemon.watch([rid])  # recovers the decision from the run's log, sees it ended, and returns
    assert daemon.status[rid].state == "finished" and daemon.status[rid].last.startswith("#1")
    assert daemon._states[rid].records == [] and daemon._states[rid].telemetry is None


def test_dry_run_records_but_publishes_nothing(mlflow_uri: str) -> None:
    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1, dry_run=True)
    st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert [r.status for r in st.records] == [Status.DRY_RUN]
    assert st.records[0].changes
    assert MlflowChannel(rid, mlflow_uri).fetch(0) == []
    assert daemon.status[rid].decisions == 1
    # A live daemon on the same run afterwards reads the dry run's record but does not count it as its own.
    live = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    st = live.tick(rid, wait=True)
    live.stop()
    assert [r.status for r in st.records] == [Status.DRY_RUN]
    assert live.status[rid].decisions == 0


class FailingProposer:
    """Fake LLM proposer that always fails, as a dead endpoint would."""

    name = "llm"

    def propose(self, snapshot, policy, ctx, offer):  # noqa: ANN001
        raise ProposerError("connection refused (fake)", audit={"attempts": 3})


def test_a_failing_proposer_falls_back_to_rules_and_says_so(mlflow_uri: str) -> None:
    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), FailingProposer(), interval=0.1)
    st = daemon.tick(rid, wait=True)
    daemon.stop()
    rec = st.records[0]
    assert rec.source == "fallback" and rec.status == Status.PENDING
    assert rec.audit["fallback_from"] == "llm" and "connection refused" in rec.audit["error"]
    assert rec.audit["failed_attempt"] == {"attempts": 3}


class SlowProposer:
    """Fake proposer that answers only after the run has moved on (as a slow LLM would)."""

    name = "slow"

    def __init__(self) -> None:
        self.release = threading.Event()

    def propose(self, snapshot, policy, ctx, offer):  # noqa: ANN001
        self.release.wait(10)
        return ProposalResult(Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"dropout": 0.1}), self.name)


def decide_slowly(uri: str, meanwhile: Callable[[str], None], slow: SlowProposer | None = None) -> tuple[str, RunState]:
    """One decision on an overfitting run by a slow proposer, with ``meanwhile(run_id)`` done while it thinks."""
    rid = overfitting_run(uri)
    slow = slow or SlowProposer()
    daemon = Daemon(MlflowBackend(uri), load_policy("lm"), slow, interval=0.1)
    st = daemon.tick(rid)
    assert st.inflight is not None
    meanwhile(rid)
    slow.release.set()
    st.inflight.future.result(5)
    st = daemon.tick(rid)
    daemon.stop()
    return rid, st


class SlowFailingProposer(SlowProposer):
    """Fake LLM proposer that fails only after the run has moved on (a hanging server that times out)."""

    name = "llm"

    def propose(self, snapshot, policy, ctx, offer):  # noqa: ANN001
        self.release.wait(10)
        raise ProposerError("did not answer within 60 s (fake)")


def test_the_rules_fallback_after_a_slow_failure_decides_on_the_run_as_it_is_now(mlflow_uri: str) -> None:
    # Seen in a trial: with a 15 s LLM timeout, every rules fallback answered the snapshot from before
    # the call and was recorded stale, so a hanging server meant no management at all.
    from mlflow.tracking import MlflowClient

    # four more evaluations while it hangs, still overfitting
    rid, st = decide_slowly(mlflow_uri, lambda rid: log_evals(MlflowClient(mlflow_uri), rid, 21, 24), SlowFailingProposer())
    rec = st.records[0]
    assert rec.source == "fallback" and rec.status == Status.PENDING, (rec.status, rec.reason)
    assert rec.step == 240 and rec.audit["first_asked_at_step"] == 200 and "did not answer" in rec.audit["error"]


def test_a_late_answer_is_discarded_as_stale_when_the_run_moved_past_it(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    def recovers(rid: str) -> None:
        # four more evaluations while it thinks (the lm preset allows fewer), val loss at new bests
        client = MlflowClient(mlflow_uri)
        for i in range(21, 25):
            client.log_metric(rid, "train_loss", 3.0 / i, step=i * 10)
            client.log_metric(rid, "val_loss", 1.0 - 0.05 * (i - 20), step=i * 10)

    rid, st = decide_slowly(mlflow_uri, recovers)
    stale = st.records[0]
    assert stale.status == Status.STALE and stale.step == 200
    assert "stale" in stale.reason and not stale.changes
    # The stale answer was never published.
    assert 1 not in [u.seq for u in MlflowChannel(rid, mlflow_uri).fetch(0)]


def test_a_late_answer_to_a_problem_the_run_still_has_is_applied(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    # four more evaluations while it thinks, still overfitting
    rid, st = decide_slowly(mlflow_uri, lambda rid: log_evals(MlflowClient(mlflow_uri), rid, 21, 24))
    late = st.records[0]
    assert late.status == Status.PENDING and late.step == 200
    assert "still shows overfitting" in late.reason and late.changes["dropout"].new == 0.1
    assert [u.seq for u in MlflowChannel(rid, mlflow_uri).fetch(0)] == [1]


def test_the_daemon_says_when_answers_keep_arriving_too_late(mlflow_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    rid = overfitting_run(mlflow_uri)
    client = MlflowClient(mlflow_uri)
    slow = SlowProposer()
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), slow, interval=0.1)
    i = 20
    start_ms = int(time.time() * 1000)
    for _ in range(3):
        st = daemon.tick(rid)
        assert st.inflight is not None
        # the run recovers by four evaluations each time (new bests), so the answer no longer applies;
        # an evaluation every 10 s (the job's clock): a pace at which the proposer is still asked
        for _ in range(4):
            i += 1
            client.log_metric(rid, "train_loss", 3.0 / i, timestamp=start_ms + i * 10_000, step=i * 10)
            client.log_metric(rid, "val_loss", 1.0 - 0.01 * i, timestamp=start_ms + i * 10_000, step=i * 10)
        slow.release.set()
        st.inflight.future.result(5)
        slow.release.clear()
        with caplog.at_level("WARNING", logger="atm.watch"):
            st = daemon.tick(rid)
    daemon.stop()
    assert [r.status for r in st.records] == [Status.STALE] * 3
    warned = [r.getMessage() for r in caplog.records if "too late" in r.getMessage()]
    assert len(warned) == 1 and "limits.stale_after" in warned[0] and "--proposer rules" in warned[0]


class HalvingProposer(SlowProposer):
    """Fake proposer that halves the lr it was shown, answering only when released."""

    def propose(self, snapshot, policy, ctx, offer):  # noqa: ANN001
        self.release.wait(10)
        return ProposalResult(Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"lr": snapshot.params["lr"] / 2}), self.name)


def test_a_move_decided_on_a_value_the_job_has_since_moved_is_checked_and_sent_on_the_value_in_force(mlflow_uri: str) -> None:
    # The job's scheduler decays the lr from 2e-3 to 1.6e-3 while the proposer halves 2e-3: "1e-3" is
    # no allowed move from 1.6e-3 (it was refused so), and the record would show a value never in force.
    rid = overfitting_run(mlflow_uri)
    slow = HalvingProposer()
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), slow, interval=0.1)
    st = daemon.tick(rid)
    assert st.inflight is not None
    MlflowChannel(rid, mlflow_uri).announce(ListenerInfo(
        run_id=rid, knobs=["lr", "dropout", "weight_decay"], values={"lr": 1.6e-3, "dropout": 0.0, "weight_decay": 0.0},
        actions=["stop"], apply_mode="auto", pid=1, started_at=0.0))
    slow.release.set()
    st.inflight.future.result(5)
    st = daemon.tick(rid)
    daemon.stop()
    rec = st.records[0]
    assert rec.status == Status.PENDING, rec.reason
    assert (rec.changes["lr"].old, rec.changes["lr"].new) == pytest.approx((1.6e-3, 8e-4))


class OutOfPolicyProposer:
    """Fake proposer that ignores the offer (as a misbehaving model might)."""

    name = "rogue"

    def propose(self, snapshot, policy, ctx, offer):  # noqa: ANN001
        return ProposalResult(Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"lr": 10.0, "momentum": 0.5}), self.name)


def test_out_of_policy_answers_are_rejected_with_reasons(mlflow_uri: str) -> None:
    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), OutOfPolicyProposer(), interval=0.1)
    st = daemon.tick(rid, wait=True)
    daemon.stop()
    rec = st.records[0]
    assert rec.status == Status.REJECTED and not rec.changes
    assert "outside" in rec.dropped["lr"] and "not a parameter" in rec.dropped["momentum"]
    assert MlflowChannel(rid, mlflow_uri).fetch(0) == []


def test_no_listener_means_no_decision(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("bare")).info.run_id
    log_evals(client, rid, 1, 20)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert st.records == [] and daemon.status[rid].state == "no listener"


def test_unknown_thresholds_fail_at_start() -> None:
    policy = load_policy("lm").model_copy(update={"thresholds": {"overfit_rize": 0.1}})
    with pytest.raises(ValueError, match="unknown thresholds"):
        Daemon(MlflowBackend("sqlite:///:memory:"), policy)


def test_an_update_the_run_ended_before_applying_expires_and_a_late_ack_still_settles_it() -> None:
    from atm.adapters.base import RunView
    from atm.schema import Change, DecisionRecord
    from atm.watcher.reconcile import reconcile

    rec = DecisionRecord(run_id="r", seq=1, step=10, status=Status.PENDING, source="rules",
                         diagnosis=Diagnosis.OVERFITTING, changes={"lr": Change(old=1e-3, new=5e-4)})
    ended = RunView(run_id="r", name="", status="FINISHED", history={}, last_metric_time=0.0, moved=False)
    merged, changed = reconcile([rec], ended)
    assert changed and merged[0].status == Status.STALE and merged[0].reason.startswith("expired")
    assert reconcile(merged, ended) == (merged, False)  # settled once, not rewritten at every poll
    ended.acks = {1: Ack(run_id="r", seq=1, status="applied", applied_step=11)}
    merged, changed = reconcile(merged, ended)
    assert changed and merged[0].status == Status.APPLIED and merged[0].applied_step == 11
    assert reconcile(merged, ended)[1] is False


def test_a_decision_that_arrives_after_the_run_ended_is_not_left_pending(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    # the job finishes while the proposer thinks
    rid, st = decide_slowly(mlflow_uri, lambda rid: MlflowClient(mlflow_uri).set_terminated(rid))
    assert st.done
    (rec,) = st.records
    assert rec.status == Status.STALE and rec.reason.startswith("expired") and not rec.changes
    assert MlflowChannel(rid, mlflow_uri).fetch(0) == []  # nothing published that no job would read


def test_explain_shows_what_the_daemon_would_send(mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    from atm.watcher.cli import main as atm_main
    from atm.watcher.decide import decision_inputs
    from atm.watcher.llm import LLMProposer

    rid = overfitting_run(mlflow_uri)  # the job registered only the stop action
    assert atm_main(["explain", "--backend", "mlflow", "--run", rid, "--tracking-uri", mlflow_uri]) == 0
    out = capsys.readouterr().out
    backend = MlflowBackend(mlflow_uri)
    snapshot, _, offer = decision_inputs(load_policy("lm"), backend.poll(rid), backend.read_log(rid))
    sent = LLMProposer().messages(snapshot, load_policy("lm"), offer)
    assert all(m["content"] in out for m in sent)
    # Rollback is within the policy here, but the job cannot roll back: it is not offered.
    assert "  actions: stop" in out.splitlines() and "rollback" not in out


@pytest.mark.parametrize(
    "when, expected",
    [(0.5, 10), (1.0, 10), (1.5, 20), (3.0, 30), (3.5, None)],
)
def test_step_after_places_a_wall_time_on_the_step_axis(when: float, expected: int | None) -> None:
    timeline = [(1.0, 10), (2.0, 20), (2.0, 21), (3.0, 30)]
    assert step_after(timeline, when) == expected


def test_step_after_ignores_points_below_the_decision_step() -> None:
    # A final summary metric logged without step= lands at step 0 after the change.
    timeline = [(1.0, 10), (2.0, 20), (3.0, 0), (4.0, 30)]
    assert step_after(timeline, 2.5, floor=20) == 30


def test_timeline_keeps_the_newest_points_in_time_order() -> None:
    tl = Timeline(keep=3)
    tl.add([(2.0, 20), (1.0, 10)])
    tl.add([(3.0, 30)])
    tl.add([(2.5, 25)])  # read late (another key, a later poll)
    assert tl.points == [(2.0, 20), (2.5, 25), (3.0, 30)]


def test_an_experiment_that_does_not_exist_yet_is_waited_for(mlflow_uri: str) -> None:
    # The usual order: start the daemon, then the job, whose first run creates the experiment.
    from mlflow.tracking import MlflowClient

    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.05)
    watcher = threading.Thread(target=daemon.watch, kwargs={"experiment": "later"}, daemon=True)
    watcher.start()
    try:
        wait_for(lambda: watcher.is_alive() and daemon.status == {}, timeout=2)
        client = MlflowClient(mlflow_uri)
        rid = client.create_run(client.create_experiment("later")).info.run_id
        wait_for(lambda: rid in daemon.status, timeout=30)  # generous: a loaded CI machine
        assert watcher.is_alive()
    finally:
        daemon.stop()
        watcher.join(timeout=10)


def test_a_run_that_does_not_exist_yet_is_waited_for_with_wait(tmp_path) -> None:
    from atm.adapters.wandb_backend import WandbBackend
    from atm.adapters._wandb._txlog import FILE_HEADER

    daemon = Daemon(WandbBackend(tmp_path / "wandb"), load_policy("lm"), interval=0.05, wait_for_run=30)
    watcher = threading.Thread(target=daemon.watch, args=(["myrun0001"],), daemon=True)
    watcher.start()
    try:
        wait_for(lambda: daemon.status.get("myrun0001") is not None and daemon.status["myrun0001"].state == "waiting")
        run_dir = tmp_path / "wandb" / "offline-run-20260101_120000-myrun0001"
        (run_dir / "files").mkdir(parents=True)
        (run_dir / "run-myrun0001.wandb").write_bytes(FILE_HEADER)
        wait_for(lambda: daemon.status["myrun0001"].state == "no listener", timeout=10)
    finally:
        daemon.stop()
        watcher.join(timeout=10)
    # Without --wait, a run that is not there is an error at once.
    quick = Daemon(WandbBackend(tmp_path / "other"), load_policy("lm"), interval=0.05)
    quick.watch(["nope"])
    assert quick.status["nope"].state == "not found"


def test_stop_is_not_offered_again_to_a_job_that_went_on(mlflow_uri: str) -> None:
    from atm.schema import Action
    from atm.testing import make_record
    from atm.watcher.decide import decision_inputs

    rid = overfitting_run(mlflow_uri, upto=20)
    view = MlflowBackend(mlflow_uri).poll(rid)
    policy = load_policy("lm")
    assert Action.STOP in decision_inputs(policy, view, [])[2].actions
    stopped = [make_record(1, 100, action=Action.STOP, run_id=rid)]
    assert Action.STOP not in decision_inputs(policy, view, stopped)[2].actions


def test_a_value_outside_the_policy_bounds_is_reported(mlflow_uri: str, caplog) -> None:
    rid = overfitting_run(mlflow_uri)
    MlflowChannel(rid, mlflow_uri).announce(ListenerInfo(
        run_id=rid, knobs=["lr"], values={"lr": 5.0}, actions=["stop"], apply_mode="auto", pid=1, started_at=0.0))
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    with caplog.at_level("WARNING", logger="atm.watch"):
        daemon.tick(rid, wait=True)
    daemon.stop()
    assert "lr is 5, outside the policy's [1e-06, 1]" in caplog.text


def test_an_lr_of_0_at_the_start_of_a_warm_up_is_not_reported_as_outside_the_bounds() -> None:
    from atm.adapters.base import RunView
    from atm.watcher.poll import listener_notes

    def notes(values: dict[str, float]) -> list[str]:
        info = ListenerInfo(run_id="r", knobs=list(values), values=values, actions=[], apply_mode="auto", pid=1,
                            started_at=0.0)
        view = RunView(run_id="r", name="r", status="RUNNING", history={}, last_metric_time=0.0, moved=False, listener=info)
        return listener_notes(load_policy("lm"), view)

    assert notes({"lr": 0.0, "dropout": 0.1}) == []  # a warm-up schedule's first step
    assert any("lr is 5" in n for n in notes({"lr": 5.0}))
    assert any("dropout is 0.9" in n for n in notes({"dropout": 0.9}))


def test_knobs_the_policy_does_not_control_are_named_with_the_likely_typo() -> None:
    from atm.watcher.poll import unmanaged_knobs_note

    lm = load_policy("lm")
    typo = lm.model_copy(update={"params": {("droput" if k == "dropout" else k): v for k, v in lm.params.items()}})
    note = unmanaged_knobs_note(typo, ["lr", "weight_decay", "dropout", "momentum"])
    assert "dropout (the policy has 'droput': a typo?)" in note and "momentum" not in note
    assert unmanaged_knobs_note(lm, ["lr", "weight_decay", "dropout", "beta1", "beta2"]) == ""
    assert "label_smoothing are not parameters" in unmanaged_knobs_note(lm, ["lr", "label_smoothing"])


def test_a_second_daemon_on_the_same_run_is_found_out_and_steps_back(mlflow_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    rid = overfitting_run(mlflow_uri)
    first = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    second = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    assert [r.status for r in first.tick(rid, wait=True).records] == [Status.PENDING]
    # Started later, the second takes the first's decision for its own (as after a restart) ...
    assert [r.seq for r in second.tick(rid, wait=True).records] == [1]
    MlflowChannel(rid, mlflow_uri).ack(Ack(run_id=rid, seq=1, status="applied", applied_step=205, values={"dropout": 0.1}))
    log_evals(MlflowClient(mlflow_uri), rid, 21, 26)
    assert [r.seq for r in first.tick(rid, wait=True).records] == [1, 2]
    # ... but an update it never made, appearing while it watches, gives the other one away.
    with caplog.at_level("ERROR", logger="atm.watch"):
        st = second.tick(rid, wait=True)
    first.stop()
    second.stop()
    assert st.done and second.status[rid].state == "another daemon"
    assert any("another atm-watch is managing this run (update #2" in r.getMessage() for r in caplog.records)
    # It wrote nothing: the first daemon's update #2 stands.
    assert MlflowBackend(mlflow_uri).poll(rid).updates[2].created_at == first._states[rid].records[1].decided_at


def test_an_update_overwritten_by_another_daemon_is_told_apart() -> None:
    from atm.testing import make_record
    from atm.watcher.reconcile import foreign_update

    mine = make_record(1, 100, status=Status.PENDING, changes={"lr": (1e-3, 5e-4)})
    same = mine.to_update()
    other = same.model_copy(update={"created_at": mine.decided_at + 1.0})
    assert foreign_update([mine], {1: same}, seen_before=True) is None
    assert foreign_update([mine], {1: other}, seen_before=True) == other
    assert foreign_update([], {1: same}, seen_before=False) is None  # after a restart: its own
    assert foreign_update([], {1: same}, seen_before=True) == same


class FlakyBackend:
    """Fake outage in front of the real MLflow backend: the first ``down`` polls fail as a dead server's would."""

    def __init__(self, real: MlflowBackend, down: int):
        self.real, self.down = real, down
        self.name = real.name

    def poll(self, run_id: str, select: KeySelector | None = None):  # noqa: ANN201
        from atm.adapters.base import BackendUnavailable

        if self.down > 0:
            self.down -= 1
            raise BackendUnavailable("connection refused (fake)")
        return self.real.poll(run_id, select)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.real, name)


def test_an_outage_is_reported_once_and_its_end_too(mlflow_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(FlakyBackend(MlflowBackend(mlflow_uri), down=4), load_policy("lm"), interval=0.01)
    watcher = threading.Thread(target=daemon.watch, args=([rid],), daemon=True)
    with caplog.at_level("WARNING", logger="atm.watch"):
        watcher.start()
        try:
            wait_for(lambda: any("answers again" in r.getMessage() for r in caplog.records), timeout=30)
        finally:
            daemon.stop()
            watcher.join(timeout=10)
    said = [r.getMessage() for r in caplog.records]
    assert sum("tracker unreachable" in m for m in said) == 1
    assert any("answers again (after 4 failed polls)" in m for m in said)


def test_the_history_shows_what_the_job_reported_in_force(mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    # The job's restore undid the lr cut that came with a rollback: the ack says so, and so must the history.
    import json

    from atm.watcher.cli import main as atm_main
    from atm.watcher.report import change_cell as _change_cell

    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    lr = daemon.tick(rid, wait=True).records[0].changes["lr"]
    MlflowChannel(rid, mlflow_uri).ack(Ack(run_id=rid, seq=1, status="applied", applied_step=205, values={"lr": lr.old}))
    st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert st.records[0].applied_values == {"lr": lr.old}
    atm_main(["history", "--backend", "mlflow", "--run", rid, "--tracking-uri", mlflow_uri, "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert row["applied_values"] == {"lr": lr.old}
    # The table's cell (rich folds it across lines, so it is checked here as built).
    assert _change_cell("lr", row["changes"]["lr"], row["applied_values"]) == f"lr {fmt(lr.old)}→{fmt(lr.new)} (in force: {fmt(lr.old)})"
    assert _change_cell("lr", row["changes"]["lr"], {"lr": lr.new}) == f"lr {fmt(lr.old)}→{fmt(lr.new)}"


def test_a_job_that_logs_nothing_of_its_own_is_told_so(mlflow_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    # Seen in a new user's SB3 script: the listener attached, SB3 logged to stdout only, and the run
    # held atm/* alone; the daemon watched it in silence.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("silent")).info.run_id
    client.log_metric(rid, "atm/lr", 3e-4, step=0)
    MlflowChannel(rid, mlflow_uri).announce(ListenerInfo(
        run_id=rid, knobs=["lr"], values={"lr": 3e-4}, actions=["stop"], apply_mode="auto", pid=1, started_at=1000.0))
    now = [1030.0]
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("rl-ppo"), interval=0.1, clock=lambda: now[0])
    with caplog.at_level("WARNING", logger="atm.watch"):
        daemon.tick(rid, wait=True)
        assert not [r for r in caplog.records if "no metrics of its own" in r.getMessage()]  # 30 s: too early
        now[0] = 1000.0 + 121
        daemon.tick(rid, wait=True)
        daemon.tick(rid, wait=True)
    daemon.stop()
    said = [r.getMessage() for r in caplog.records if "no metrics of its own" in r.getMessage()]
    assert len(said) == 1 and "Stable-Baselines3" in said[0], said


def test_stopping_does_not_wait_for_a_decision_in_flight(mlflow_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    # Seen in a trial: SIGTERM waited 87 s for a call to a hanging LLM server to time out.
    import subprocess
    import sys
    import textwrap

    rid = overfitting_run(mlflow_uri)
    script = textwrap.dedent(f"""
        import threading, time
        from atm.adapters.mlflow_backend import MlflowBackend
        from atm.policies import load_policy
        from atm.watcher.daemon import Daemon

        class Hanging:
            name = "llm"
            def propose(self, *a):
                threading.Event().wait(600)  # a server that never answers

        daemon = Daemon(MlflowBackend({mlflow_uri!r}), load_policy("lm"), Hanging(), interval=0.1)
        st = daemon.tick({rid!r})
        assert st.inflight is not None
        daemon.stop()
        print("stopped", flush=True)
    """)
    # Without the fix the process waits out the 600 s call and subprocess.run raises TimeoutExpired.
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "stopped" in done.stdout and "decision in flight (asked at step 200)" in done.stderr


class StopProposer:
    """Fake proposer that always asks the job to stop."""

    name = "stopper"

    def propose(self, snapshot, policy, ctx, offer):  # noqa: ANN001
        from atm.schema import Action

        return ProposalResult(Proposal(diagnosis=Diagnosis.CONVERGED, action=Action.STOP), self.name)


def test_a_job_that_trains_on_after_an_acknowledged_stop_is_told_once(mlflow_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), StopProposer(), interval=0.1)
    st = daemon.tick(rid, wait=True)
    assert [r.status for r in st.records] == [Status.PENDING]
    MlflowChannel(rid, mlflow_uri).ack(Ack(run_id=rid, seq=1, status="applied", applied_step=205, values={}))
    with caplog.at_level("WARNING", logger="atm.watch"):
        for upto in (24, 28):  # the job goes on logging evaluations
            log_evals(MlflowClient(mlflow_uri), rid, upto - 3, upto)
            st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert [r.status for r in st.records] == [Status.APPLIED]
    told = [r.getMessage() for r in caplog.records if "does not act on stop" in r.getMessage()]
    assert len(told) == 1 and "listener.stop_requested" in told[0]


def test_a_decision_on_a_point_past_the_jobs_steps_takes_effect_where_the_job_is() -> None:
    # Seen on a live run: another client logged val_loss at step 1003 of a job at epoch 4; the daemon
    # decided on it, the backend then left the point out, and the job applied the change at epoch 4.
    # Floored at 1003, the change never took effect, and its cooldown held every later decision.
    from atm.adapters.base import PointSeries, RunView
    from atm.schema import Change, DecisionRecord
    from atm.watcher.reconcile import reconcile

    rec = DecisionRecord(run_id="r", seq=1, step=1003, status=Status.PENDING, source="rules",
                         diagnosis=Diagnosis.OVERFITTING, changes={"lr": Change(old=1e-3, new=5e-4)})
    view = RunView(run_id="r", name="", status="RUNNING", last_metric_time=0.0, moved=True,
                   history={"val_loss": PointSeries((s, 1.0) for s in range(1, 7)), "atm/lr": PointSeries([(1003, 5e-4)])},
                   timeline=[(float(s), s) for s in range(1, 4)] + [(3.5, 1003)] + [(float(s), s) for s in range(4, 7)],
                   acks={1: Ack(run_id="r", seq=1, status="applied", applied_step=4, applied_at=3.8)})
    (merged,), changed = reconcile([rec], view)
    assert changed and merged.status == Status.APPLIED and merged.effective_step == 4
    assert merged.counts_from(6) == 3  # evaluations 4, 5, 6 count towards its cooldowns


def test_the_status_line_names_the_problem_a_stop_ends_not_converged() -> None:
    # Seen: the status line said "converged" beside the decision "overfitting -> stop".
    from atm.watcher.daemon import shown_diagnosis
    from atm.watcher.rules import OVERFIT_STOP_PREFIX, PLATEAU_STOP_PREFIX

    ran_out = f"{OVERFIT_STOP_PREFIX}, best val_loss 0.19 at step 12: keep the best checkpoint. 3 remedies did not help"
    assert shown_diagnosis(Diagnosis.CONVERGED, ran_out) == "overfitting"
    assert shown_diagnosis(Diagnosis.CONVERGED, f"{PLATEAU_STOP_PREFIX} after 2 lr cuts") == "plateau"
    # A task solved is converged; other diagnoses are shown as they are.
    assert shown_diagnosis(Diagnosis.CONVERGED, "eval/mean_reward 500 (last 3 evaluations 500) reached 475") == "converged"
    assert shown_diagnosis(Diagnosis.DIVERGENCE, "gradient norm spiked") == "divergence"


def test_a_weight_decay_that_is_an_l2_penalty_is_offered_at_its_scale_and_the_user_is_told() -> None:
    # Seen in benchmarks/sick_jobs.py: torch.optim.Adam, weight decay 0 -> 0.05 (the lm preset's value for
    # AdamW) took val loss from 0.08 to 0.94 in three epochs.
    from atm.adapters.base import RunView
    from atm.policies import l2_choices
    from atm.testing import make_history
    from atm.watcher.decide import decision_inputs
    from atm.watcher.poll import listener_notes

    lm = load_policy("lm")
    history = make_history({"train_loss": [1.0 / (i + 1) for i in range(12)], "val_loss": [1.0 / (i + 1) for i in range(12)]})

    def offer(values: dict[str, float], l2: list[str]) -> tuple[dict[str, list[float]], list[str]]:
        info = ListenerInfo(run_id="r", knobs=list(values), values=values, actions=[], apply_mode="auto", pid=1,
                            started_at=0.0, l2_knobs=l2)
        view = RunView(run_id="r", name="r", status="RUNNING", history=history, last_metric_time=0.0, moved=False,
                       listener=info)
        return decision_inputs(lm, view, [])[2].choices, listener_notes(lm, view)

    decoupled, quiet = offer({"lr": 1e-3, "weight_decay": 0.0}, [])
    assert decoupled["weight_decay"] == [0.01, 0.05, 0.1] and quiet == []
    coupled, notes = offer({"lr": 1e-3, "weight_decay": 0.0}, ["weight_decay"])
    assert "weight_decay" not in coupled and coupled["lr"] == decoupled["lr"]
    assert any("weight_decay is an L2 penalty" in n and "torch.optim.AdamW" in n for n in notes), notes
    # From a value: moves up to twice it, none to the preset's decoupled values.
    sgd, _ = offer({"lr": 0.1, "weight_decay": 5e-4}, ["weight_decay"])
    assert sgd["weight_decay"] and max(sgd["weight_decay"]) <= 1e-3 and min(sgd["weight_decay"]) < 5e-4
    # The pure part, with a policy that offers L2-scale values from 0.
    assert l2_choices({"weight_decay": [1e-4, 1e-3, 0.01]}, {"weight_decay": 0.0}, ["weight_decay"]) == {"weight_decay": [1e-4, 1e-3]}


def test_the_listeners_word_that_a_schedule_moves_the_lr_reaches_the_snapshot() -> None:
    from atm.adapters.base import RunView
    from atm.testing import make_history
    from atm.watcher.decide import decision_inputs

    lm = load_policy("lm")
    history = make_history({"train_loss": [1.0 / (i + 1) for i in range(12)], "val_loss": [1.0 / (i + 1) for i in range(12)]})

    def signals(scheduled: list[str]) -> dict:
        info = ListenerInfo(run_id="r", knobs=["lr"], values={"lr": 0.1}, actions=[], apply_mode="auto", pid=1,
                            started_at=0.0, scheduled_knobs=scheduled)
        view = RunView(run_id="r", name="r", status="RUNNING", history=history, last_metric_time=0.0, moved=False,
                       listener=info)
        return decision_inputs(lm, view, [])[0].signals

    assert signals(["lr"]).get("lr_scheduled") is True
    assert "lr_scheduled" not in signals([])
