"""The watcher's side of signed messages, on a real MLflow store: forgeries are reported and ignored,
never adopted, and never stop the watcher; the job's rejections and another key are shown plainly.

The job's side is played with the real MLflow channel (what the listener writes, signed with the
test key); the "attacker" is another ``MlflowClient`` writing tags as any colleague could.
"""

from __future__ import annotations

import json

import pytest

from atm.adapters.base import ack_key, update_key
from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.policies import load_policy
from atm.schema import Ack, Change, DecisionRecord, Diagnosis, Status, Update
from atm.signing import key_from_text, resolve_key, sign
from atm.testing import make_record
from atm.watcher import cli
from atm.watcher.daemon import Daemon
from atm.watcher.reconcile import own_records, reconcile, unpublished_acks

from _runs import log_evals
from _runs import overfitting_run as _overfitting_run

def overfitting_run(uri: str, upto: int = 20) -> str:
    return _overfitting_run(uri, upto, experiment="signed-watcher")


def forged(rid: str, seq: int, **changes: tuple[float, float]) -> str:
    return Update(run_id=rid, seq=seq, step=10, diagnosis=Diagnosis.OVERFITTING, source="rules",
                  changes={k: Change(old=o, new=n) for k, (o, n) in changes.items()}).model_dump_json()


def history(uri: str, rid: str, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["history", "--backend", "mlflow", "--run", rid, "--tracking-uri", uri, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_forged_next_update_neither_stops_the_watcher_nor_is_adopted_after_a_restart(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    attacker = MlflowClient(mlflow_uri)
    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    assert [r.status for r in daemon.tick(rid, wait=True).records] == [Status.PENDING]
    MlflowChannel(rid, mlflow_uri).ack(Ack(run_id=rid, seq=1, status="applied", applied_step=205,
                                           values={"dropout": 0.1}))
    # At the watcher's next number, written as another client of the tracker could (lr 1e-3 -> 10).
    attacker.set_tag(rid, update_key(2), forged(rid, 2, lr=(1e-3, 10.0)))
    log_evals(attacker, rid, 21, 30)
    with caplog.at_level("WARNING", logger="atm.watch"):
        st = daemon.tick(rid, wait=True)
        daemon.tick(rid, wait=True)
    daemon.stop()
    # It goes on managing the run, past the forged number, and says so once.
    assert not st.done and daemon.status[rid].state != "another daemon" and not daemon.status[rid].gave_up
    assert [r.seq for r in st.records] == [1, 3] and st.records[1].status == Status.PENDING
    said = [r.getMessage() for r in caplog.records if "update #2 is not signed" in r.getMessage()]
    assert len(said) == 1 and rid in said[0]
    assert daemon.status[rid].problems == 1
    # Its own #3 is on the run, signed; the forged #2 was never taken for an update of the watcher's.
    assert list(MlflowBackend(mlflow_uri).poll(rid).updates) == [1, 3]

    # A watcher restarted later does not adopt the forgery.
    again = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    st = again.tick(rid, wait=True)
    again.stop()
    assert [r.seq for r in st.records] == [1, 3] and not st.done
    rows = history(mlflow_uri, rid, capsys)
    assert [(r["seq"], r["status"]) for r in rows] == [(1, "applied"), (3, "pending")]
    assert "#2" not in json.dumps(rows)


def test_forged_and_stray_acks_are_reported_once_and_settle_nothing(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient

    attacker = MlflowClient(mlflow_uri)
    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    daemon.tick(rid, wait=True)
    # A forged "applied" for the pending #1, a forged far ack, and a signed ack for a number never published.
    attacker.set_tag(rid, ack_key(1), Ack(run_id=rid, seq=1, status="applied", applied_step=1).model_dump_json())
    attacker.set_tag(rid, ack_key(50), Ack(run_id=rid, seq=50, status="applied", applied_step=1).model_dump_json())
    MlflowChannel(rid, mlflow_uri).ack(Ack(run_id=rid, seq=40, status="applied", applied_step=1))
    with caplog.at_level("WARNING", logger="atm.watch"):
        for _ in range(3):
            st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert [(r.seq, r.status) for r in st.records] == [(1, Status.PENDING)]
    text = caplog.text
    assert text.count("ack #1 is not signed") == 1 and text.count("ack #50 is not signed") == 1
    assert text.count("ack #40 answers no update this watcher published; ignored") == 1
    assert daemon.status[rid].problems == 3
    # A new decision's number is past every number the run's updates hold, not past a stray ack's.
    assert st.seq == 1


def test_a_signed_update_copied_from_another_run_does_not_make_the_watcher_step_back(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient

    # Every run one watcher manages is signed with the same key: what it wrote on one run checks on any.
    attacker = MlflowClient(mlflow_uri)
    other, rid = overfitting_run(mlflow_uri), overfitting_run(mlflow_uri, upto=5)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    assert [r.seq for r in daemon.tick(other, wait=True).records] == [1]
    assert daemon.tick(rid, wait=True).records == []  # in warm-up: nothing decided yet
    attacker.set_tag(rid, update_key(1), attacker.get_run(other).data.tags[update_key(1)])
    with caplog.at_level("WARNING", logger="atm.watch"):
        st = daemon.tick(rid, wait=True)
        log_evals(attacker, rid, 6, 20)
        st = daemon.tick(rid, wait=True)
    daemon.stop()
    # It is no other watcher's: the watcher says what it is and goes on managing the run, past its number.
    assert not st.done and daemon.status[rid].state != "another daemon" and not daemon.status[rid].gave_up
    assert caplog.text.count(f"update #1 is for run {other}, not this one: a copy from another run") == 1
    assert [(r.seq, r.status) for r in st.records] == [(2, Status.PENDING)]


def test_a_signed_ack_copied_from_another_run_settles_nothing(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    attacker = MlflowClient(mlflow_uri)
    other, rid = overfitting_run(mlflow_uri), overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    daemon.tick(other, wait=True)
    daemon.tick(rid, wait=True)
    MlflowChannel(other, mlflow_uri).ack(Ack(run_id=other, seq=1, status="rejected", applied_step=None,
                                             error="lr would be -1"))
    attacker.set_tag(rid, ack_key(1), attacker.get_run(other).data.tags[ack_key(1)])
    st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert [(r.seq, r.status) for r in st.records] == [(1, Status.PENDING)]
    assert daemon.status[rid].problems == 1


def test_a_number_no_tag_name_holds_does_not_stop_the_watcher_publishing(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    rid = overfitting_run(mlflow_uri)
    MlflowClient(mlflow_uri).set_tag(rid, "atm.seq", "9" * 300)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert [(r.seq, r.status) for r in st.records] == [(1, Status.PENDING)]
    assert list(MlflowBackend(mlflow_uri).poll(rid).updates) == [1]


def test_malformed_tags_are_reported_once_each(mlflow_uri: str, caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    attacker = MlflowClient(mlflow_uri)
    rid = overfitting_run(mlflow_uri)
    attacker.set_tag(rid, "atm.update.abc", "{}")
    attacker.set_tag(rid, update_key(9), '{"run_id": "x", "seq": 9, "changes": ')
    attacker.set_tag(rid, "atm.approve", "yes please")
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    lines: list[str] = []
    daemon.on_change = lambda s: lines.append(f"{s.problems}")
    with caplog.at_level("WARNING", logger="atm.watch"):
        for _ in range(3):
            st = daemon.tick(rid, wait=True)
    daemon.stop()
    text = caplog.text
    assert text.count("tag atm.update.abc: is not an atm update name") == 1
    assert text.count("tag atm.update.000009: not a valid update") == 1
    assert text.count("tag atm.approve: should be the number of the decision to approve") == 1
    assert daemon.status[rid].problems == 3
    # Its own first decision goes past the malformed update's number.
    assert [r.seq for r in st.records] == [10]


def test_a_rejection_by_the_job_is_recorded_as_rejected_with_its_reason() -> None:
    from atm.adapters.base import RunView

    rec = make_record(1, 100, status=Status.PENDING, changes={"lr": (1e-3, 5e-4)})
    ack = Ack(run_id="run-test", seq=1, status="rejected", applied_step=7, error="lr would be -1: lr may not be negative")
    view = RunView("run-test", "", "RUNNING", {}, 0.0, False, acks={1: ack}, updates={1: rec.to_update()})
    (got,), changed = reconcile([rec], view)
    assert changed and got.status == Status.REJECTED and got.applied_step is None
    assert got.reason.endswith("the job refused it: lr would be -1: lr may not be negative")


def test_only_records_signed_with_the_key_are_the_watchers_own() -> None:
    key = resolve_key()
    other = key_from_text("a-colleagues-own-atm-key", "other")
    mine = sign(make_record(1, 100, status=Status.APPLIED), key)
    theirs = sign(make_record(2, 200, status=Status.PENDING), other)
    unsigned = make_record(3, 300, status=Status.PENDING)
    tampered = mine.model_copy(update={"seq": 4})
    kept, refused = own_records([mine, theirs, unsigned, tampered], key)
    assert kept == [mine]
    assert [r.split(" ", 3)[2] for r in refused] == ["#2", "#3", "#4"]
    assert "signed with key id" in refused[0] and "is not signed" in refused[1] and "does not match" in refused[2]


def test_acks_for_numbers_never_published_are_found() -> None:
    from atm.adapters.base import RunView

    recs = [make_record(1, 100, status=Status.APPLIED), make_record(2, 200, status=Status.REJECTED)]
    acks = {s: Ack(run_id="r", seq=s, status="applied", applied_step=1) for s in (1, 2, 3)}
    view = RunView("r", "", "RUNNING", {}, 0.0, False, acks=acks, updates={})
    assert unpublished_acks(recs, view) == [2, 3]


def test_a_restarted_watcher_refuses_a_decision_log_another_client_wrote(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    from atm.adapters.base import LOG_ARTIFACT, records_to_jsonl

    rid = overfitting_run(mlflow_uri)
    # A log that would lock the watcher out: a "pending" decision it would wait on for good.
    fake = DecisionRecord(run_id=rid, seq=1, step=10, status=Status.PENDING, source="rules",
                          diagnosis=Diagnosis.PLATEAU, changes={"lr": Change(old=2e-3, new=1.0)})
    MlflowClient(mlflow_uri).log_text(rid, records_to_jsonl([fake]), LOG_ARTIFACT)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    with caplog.at_level("WARNING", logger="atm.watch"):
        st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert "1 record(s) of the decision log are not this watcher's (decision record #1 is not signed" in caplog.text
    # It decides as on a fresh run (no update tag holds #1) and rewrites the log with its own record.
    assert [(r.seq, r.status) for r in st.records] == [(1, Status.PENDING)]
    assert st.records[0].changes != fake.changes
    assert [(r["seq"], r["changes"]) for r in history(mlflow_uri, rid, capsys)] == [
        (1, {k: {"old": c.old, "new": c.new} for k, c in st.records[0].changes.items()})]


def test_an_ack_signed_with_another_key_says_the_job_holds_another_key(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    rid = overfitting_run(mlflow_uri)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    daemon.tick(rid, wait=True)
    job_key = key_from_text("the-job-was-given-another-key", "ATM_KEY")
    MlflowChannel(rid, mlflow_uri, key=job_key).ack(Ack(
        run_id=rid, seq=1, status="rejected", applied_step=3,
        error=f"update #1 is signed with key id {resolve_key().key_id}, this job has key id {job_key.key_id}"))
    with caplog.at_level("WARNING", logger="atm.watch"):
        for _ in range(2):
            st = daemon.tick(rid, wait=True)
    daemon.stop()
    s = daemon.status[rid]
    assert s.state == "key mismatch" and "give the job and the watcher the same ATM_KEY" in s.error
    assert f"({resolve_key().key_id} from ATM_KEY)" in s.error
    assert caplog.text.count("the job acknowledged update #1 with another atm key") == 1
    assert st.records[0].status == Status.PENDING  # an ack it cannot check settles nothing


def test_fields_a_later_release_added_do_not_change_what_an_earlier_one_signed() -> None:
    from atm.signing import canonical_json, verify

    rec = make_record(1, 100, status=Status.APPLIED, changes={"lr": (1e-3, 5e-4)})
    body = json.loads(canonical_json(rec))
    # Fields added since signing began (the effect, the approval ...) at their defaults are not covered,
    # so a log written before they existed still checks as the watcher's own.
    assert not {"effect", "reverts", "problem", "approval"} & set(body)
    text = sign(rec, resolve_key()).model_dump_json()
    older = {k: v for k, v in json.loads(text).items() if k not in ("effect", "reverts", "problem", "approval")}
    assert verify(DecisionRecord.model_validate(older), resolve_key())
    assert not verify(DecisionRecord.model_validate({**older, "approval": "approved by mallory"}), resolve_key())


def test_another_key_is_told_on_the_first_read_of_an_update_the_log_missed(mlflow_uri: str) -> None:
    rid = overfitting_run(mlflow_uri)
    backend = MlflowBackend(mlflow_uri)
    backend.reserve_seq(rid, 1)
    backend.publish(make_record(1, 200, status=Status.PENDING, changes={"lr": (2e-3, 1e-3)}, run_id=rid))
    job_key = key_from_text("the-job-was-given-another-key", "ATM_KEY")
    MlflowChannel(rid, mlflow_uri, key=job_key).ack(Ack(run_id=rid, seq=1, status="rejected", applied_step=3,
                                                        error="update #1 is signed with another key"))
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    daemon.tick(rid, wait=True)
    daemon.stop()
    assert daemon.status[rid].state == "key mismatch"


def test_a_restarted_watcher_refuses_a_signed_decision_log_copied_from_another_run(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient

    from atm.adapters.base import LOG_ARTIFACT, records_to_jsonl
    from atm.schema import Action

    # Every run of one key signs alike: another run's stop, copied onto this one, would otherwise pass for
    # this run's and silence the watcher here for good ("stopped: ... nothing more is changed").
    attacker = MlflowClient(mlflow_uri)
    other, rid = overfitting_run(mlflow_uri), overfitting_run(mlflow_uri)
    stop = sign(make_record(1, 10, action=Action.STOP, run_id=other, status=Status.APPLIED), resolve_key())
    attacker.log_text(rid, records_to_jsonl([stop]), LOG_ARTIFACT)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    with caplog.at_level("WARNING", logger="atm.watch"):
        st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert f"decision record #1 is for run {other}, not this one: a copy from another run" in caplog.text
    assert [(r.seq, r.run_id, r.status) for r in st.records] == [(1, rid, Status.PENDING)]
    assert own_records([stop], resolve_key(), run_id=other) == ([stop], [])
