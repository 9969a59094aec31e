"""A run's atm messages (atm.adapters.base): malformed ones are reported, not dropped; only signed ones are taken."""

from __future__ import annotations

from atm.adapters.base import (
    LISTENER_KEY,
    MAX_SEQ,
    SEQ_KEY,
    MessageProblem,
    RunMessages,
    ack_key,
    names_run,
    parse_messages,
    update_key,
    verified,
)
from atm.schema import Ack, Approval, Change, Diagnosis, ListenerInfo, Update
from atm.signing import key_from_text, sign

KEY = key_from_text("k" * 32, "test")
OTHER = key_from_text("o" * 32, "other")


def _update(seq: int, run_id: str = "r") -> Update:
    return Update(run_id=run_id, seq=seq, step=1, diagnosis=Diagnosis.PLATEAU, source="rules",
                  changes={"lr": Change(old=1e-3, new=5e-4)})


def test_malformed_tags_are_reported_with_what_is_wrong() -> None:
    tags = {
        update_key(1): sign(_update(1), KEY).model_dump_json(),
        update_key(2): "{not json",
        update_key(3): sign(_update(4), KEY).model_dump_json(),     # another number's update
        "atm.update.7b": sign(_update(7), KEY).model_dump_json(),  # not an update name
        ack_key(1): Ack(run_id="r", seq=1, status="applied", applied_step=3).model_dump_json(),
        ack_key(2): '{"seq": 2}',
        LISTENER_KEY: "null",
        SEQ_KEY: "three",
        "mlflow.user": "someone",
    }
    msgs = parse_messages(tags)
    assert list(msgs.updates) == [1] and list(msgs.acks) == [1] and msgs.listener is None
    by_where = {p.where: p for p in msgs.problems}
    assert set(by_where) == {"tag atm.update.000002", "tag atm.update.000003", "tag atm.update.7b",
                             "tag atm.ack.000002", "tag atm.listener", "tag atm.seq"}
    assert "not a valid update" in by_where["tag atm.update.000002"].reason
    assert by_where["tag atm.update.000002"].seq == 2 and by_where["tag atm.update.000002"].kind == "update"
    assert "holds update #4, filed under #3" in by_where["tag atm.update.000003"].reason
    assert "atm.update.NNNNNN" in by_where["tag atm.update.7b"].reason
    assert "not a valid ack" in by_where["tag atm.ack.000002"].reason
    # Numbers a malformed update took are taken: the watcher continues past them.
    assert msgs.seq == 3
    assert str(by_where["tag atm.ack.000002"]).startswith("tag atm.ack.000002: not a valid ack")


def test_verified_keeps_only_what_the_key_signed_and_reports_the_rest() -> None:
    tags = {
        update_key(1): sign(_update(1), KEY).model_dump_json(),
        update_key(2): _update(2).model_dump_json(),
        update_key(3): sign(_update(3), OTHER).model_dump_json(),
        ack_key(1): sign(Ack(run_id="r", seq=1, status="applied", applied_step=3), KEY).model_dump_json(),
        ack_key(50): Ack(run_id="r", seq=50, status="applied", applied_step=3).model_dump_json(),
        LISTENER_KEY: ListenerInfo(run_id="r", knobs=["lr"], values={"lr": 1e-3}, apply_mode="auto", pid=1,
                                   started_at=0.0).model_dump_json(),
    }
    msgs = verified(parse_messages(tags), KEY)
    assert list(msgs.updates) == [1] and list(msgs.acks) == [1] and msgs.listener is not None
    assert msgs.seq == 3
    reasons = {(p.kind, p.seq): p.reason for p in msgs.problems}
    assert "update #2 is not signed" in reasons[("update", 2)]
    assert f"signed with key id {OTHER.key_id}, this watcher has key id {KEY.key_id}" in reasons[("update", 3)]
    assert "ack #50 is not signed" in reasons[("ack", 50)]
    nokey = verified(parse_messages(tags), None, key_problem="ATM_KEY: too short")
    assert nokey.updates == {} and "this watcher has no atm key (ATM_KEY: too short)" in nokey.problems[0].reason


def test_signed_messages_copied_from_another_run_of_the_key_are_not_this_runs() -> None:
    # Every run of one key signs alike: a copy of another run's update or ack checks, but names that run.
    tags = {
        update_key(1): sign(_update(1), KEY).model_dump_json(),
        update_key(2): sign(_update(2, run_id="other-run"), KEY).model_dump_json(),
        ack_key(1): sign(Ack(run_id="other-run", seq=1, status="applied", applied_step=3), KEY).model_dump_json(),
    }
    msgs = verified(parse_messages(tags), KEY, run_id="r")
    assert list(msgs.updates) == [1] and msgs.acks == {}
    reasons = {(p.kind, p.seq): p.reason for p in msgs.problems}
    assert "update #2 is for run other-run, not this one: a copy from another run" in reasons[("update", 2)]
    assert "ack #1 is for run other-run, not this one" in reasons[("ack", 1)]
    assert msgs.seq == 2  # its number is still taken: the watcher numbers past it
    # W&B: the watcher names an online run entity/project/id, the job its bare id; either names the run.
    assert names_run("abc123", "team/proj/abc123") and names_run("team/proj/abc123", "abc123")
    assert not names_run("abc1234", "team/proj/abc123") and not names_run("xabc123", "abc123")
    # W&B offline: a run folder (a resumed run has one per process, differing in time), its .wandb file or
    # its bare id: each spelling a watcher was started with names the run.
    folder = "wandb/offline-run-20261207_101500-abc123"
    for other in ("abc123", "/home/u/wandb/offline-run-20261207_120000-abc123", f"{folder}/run-abc123.wandb"):
        assert names_run(folder, other) and names_run(other, folder)
    assert not names_run(folder, "abc124") and not names_run(folder, "wandb/offline-run-20261207_101500-abc124")
    assert not names_run("run-abc123.wandb", "abc124")


def test_a_signed_approval_names_its_run_as_updates_and_acks_do() -> None:
    # One rule for every message: an approval naming the run by another accepted spelling counts, and one
    # naming another run (a copy) does not, whichever spelling the watcher was started with.
    folder = "wandb/offline-run-20261207_101500-abc123"
    local = ["abc123", folder, f"{folder}/run-abc123.wandb", "/home/u/wandb/offline-run-20261207_120000-abc123"]
    others = ["abc124", "wandb/offline-run-20261207_101500-abc124", "team/proj/abc1234"]
    cases = [(watched, local) for watched in local] + [("team/proj/abc123", ["abc123", "team/proj/abc123"])]
    for watched, spellings in cases:
        given = [sign(Approval(run_id=rid, seq=seq, decision="approve", by="alice@box"), KEY)
                 for seq, rid in enumerate(spellings + others, start=1)]
        msgs = verified(RunMessages(approvals=given), KEY, run_id=watched)
        assert [a.seq for a in msgs.approvals] == list(range(1, len(spellings) + 1)), watched
        refused = {p.seq: p.reason for p in msgs.problems if p.kind == "approval"}
        assert sorted(refused) == list(range(len(spellings) + 1, len(given) + 1)), watched
        assert f"approval #{len(spellings) + 1} is for run abc124, not this one: a copy from another run" in \
            refused[len(spellings) + 1]


def test_a_number_past_max_seq_is_not_taken() -> None:
    # The watcher's next number past it would not fit a tag's name: nothing could be published.
    huge = int("9" * 239)
    tags = {update_key(2): sign(_update(2), KEY).model_dump_json(),
            f"atm.update.{huge}": _update(huge).model_dump_json(), SEQ_KEY: "9" * 300}
    msgs = verified(parse_messages(tags), KEY, run_id="r")
    assert msgs.seq == 2
    assert any(p.where == "tag atm.seq" and "past the numbers atm uses" in p.reason for p in msgs.problems)
    assert parse_messages({SEQ_KEY: str(MAX_SEQ)}).seq == MAX_SEQ


def test_a_problem_reads_as_one_line() -> None:
    assert str(MessageProblem("tag atm.update.000002", "not a valid update; ignored", "update", 2)) == \
        "tag atm.update.000002: not a valid update; ignored"
    assert str(MessageProblem("", "update #2 is not signed", "update", 2)) == "update #2 is not signed"
