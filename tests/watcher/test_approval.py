"""Decisions held for a person's approval (``limits.approval: required``, ``atm-watch --approve``).

The rules of :mod:`atm.watcher.approval` as pure functions, then the daemon on a real MLflow store
(sqlite, and a real ``mlflow server``) answered as a person would: a run tag added in the UI, or
``atm approve`` / ``atm reject`` from a terminal. The job's side is the real MLflow channel.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from atm.adapters.base import APPROVAL_PREFIX, update_key
from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.policies import DecisionContext, Policy, Window, load_policy
from atm.schema import Ack, Approval, Status
from atm.signing import key_from_text, sign
from atm.testing import make_record
from atm.watcher import cli
from atm.watcher.approval import answers, early, sighting
from atm.watcher.daemon import Daemon

from _runs import log_evals
from _runs import overfitting_run as _overfitting_run

def overfitting_run(uri: str, upto: int = 20) -> str:
    return _overfitting_run(uri, upto, experiment="approval")


# --------------------------------------------------------------------------- the rules, pure


def held(seq: int = 1, step: int = 100, decided_at: float = 10.0):
    return make_record(seq, step, status=Status.AWAITING_APPROVAL, changes={"lr": (1e-3, 5e-4)}).model_copy(
        update={"decided_at": decided_at})


def ctx(step: int, evals: list[int]) -> DecisionContext:
    return DecisionContext(step=step, params={}, eval_steps=evals)


def ui(decision: str, seq: int = 1) -> Approval:
    return Approval(seq=seq, decision=decision, by=f"tag atm.{decision} (tracker UI, unsigned)", created_at=0.0)


def signed(decision: str, seq: int = 1, key=None) -> Approval:
    from atm.signing import resolve_key

    return sign(Approval(run_id="run-test", seq=seq, decision=decision, by="alice@box"), key or resolve_key())


WINDOW = Window(evals=3)


def test_a_ui_tag_seen_after_the_decision_approves_it_while_it_is_fresh() -> None:
    a = ui("approve")
    got = answers([held()], [a], seen_at={sighting(a): 11.0}, ctx=ctx(120, [100, 110, 120]), window=WINDOW)
    assert [(x.seq, x.status) for x in got] == [(1, Status.PENDING)]
    assert got[0].approval == "approved by tag atm.approve (tracker UI, unsigned)"


def test_a_ui_tag_written_before_the_decision_approves_nothing() -> None:
    a = ui("approve")
    seen = {sighting(a): 9.0}
    assert answers([held()], [a], seen_at=seen, ctx=ctx(110, [100, 110]), window=WINDOW) == []
    assert early([held()], [a], seen) == [a]


def test_a_signed_answer_counts_whenever_it_came_and_a_rejection_wins() -> None:
    a, r = signed("approve"), ui("reject")
    got = answers([held()], [a], seen_at={sighting(a): 1.0}, ctx=ctx(110, [100, 110]), window=WINDOW)
    assert got[0].status == Status.PENDING and got[0].approval == "approved by alice@box (atm approve, signed)"
    got = answers([held()], [a, r], seen_at={sighting(r): 12.0}, ctx=ctx(110, [100, 110]), window=WINDOW)
    assert got[0].status == Status.REJECTED


def test_a_decision_expires_past_the_window_or_when_the_run_ends() -> None:
    late = ctx(140, [100, 110, 120, 130, 140])
    got = answers([held()], [], seen_at={}, ctx=late, window=WINDOW)
    assert got[0].status == Status.EXPIRED and "no answer while the run trained 3 evaluations past step 100" in got[0].approval
    a = signed("approve")
    assert answers([held()], [a], seen_at={}, ctx=late, window=WINDOW)[0].status == Status.EXPIRED
    assert answers([held()], [], seen_at={}, ctx=ctx(110, [110]), window=WINDOW) == []
    got = answers([held()], [a], seen_at={}, ctx=ctx(110, [110]), window=WINDOW, ended="FINISHED")
    assert got[0].status == Status.EXPIRED and "the run ended (FINISHED)" in got[0].approval
    # Other decisions and other numbers are left alone.
    assert answers([held().model_copy(update={"status": Status.PENDING})], [a], seen_at={}, ctx=late, window=WINDOW) == []
    assert answers([held(seq=2)], [a], seen_at={}, ctx=ctx(110, [110]), window=WINDOW) == []


def test_the_policy_reads_approval_and_its_window(tmp_path: Path) -> None:
    path = tmp_path / "approved.yaml"
    path.write_text("name: lm-approved\nextends: lm\nlimits:\n  approval: required\n  approval_window: {evals: 4}\n")
    pol = load_policy(str(path))
    assert pol.limits.approval == "required" and pol.limits.approval_window == Window(evals=4)
    assert pol.limits.max_changes == load_policy("lm").limits.max_changes
    assert load_policy("lm").limits.approval == "none"
    with pytest.raises(Exception, match="approval"):
        Policy.model_validate({"name": "x", "limits": {"approval": "maybe"}})


# --------------------------------------------------------------------------- the daemon on a real store


def approval_policy() -> Policy:
    lm = load_policy("lm")
    return lm.model_copy(update={"limits": lm.limits.model_copy(update={"approval": "required",
                                                                         "approval_window": Window(evals=5)})})


def _clock():
    # Real time (the idle rule compares it with the metrics' timestamps), strictly increasing.
    ticks = itertools.count()
    return lambda: time.time() + next(ticks) * 1e-3


def _tags(uri: str, rid: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri).get_run(rid).data.tags


def _history(uri: str, rid: str, capsys: pytest.CaptureFixture[str]) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["history", "--backend", "mlflow", "--run", rid, "--tracking-uri", uri, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _answer(verb: str, uri: str, rid: str, seq: int, *extra: str) -> int:
    return cli.main([verb, "--backend", "mlflow", "--run", rid, "--tracking-uri", uri, str(seq), *extra])


def _approval_by_tag_and_by_command(uri: str, caplog: pytest.LogCaptureFixture,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)

    # 1. A tag in the UI. One written before the decision existed approves nothing; added again, it does.
    rid = overfitting_run(uri)
    client.set_tag(rid, "atm.approve", "1")
    daemon = Daemon(MlflowBackend(uri), approval_policy(), interval=0.1, clock=_clock())
    with caplog.at_level("INFO", logger="atm.watch"):
        st = daemon.tick(rid, wait=True)
        assert [(r.seq, r.status) for r in st.records] == [(1, Status.AWAITING_APPROVAL)]
        assert update_key(1) not in _tags(uri, rid)  # held: nothing reached the job
        assert daemon.status[rid].pending == "#1 awaiting approval"
        assert "decision #1 awaits approval: add the run tag atm.approve = 1" in caplog.text
        daemon.tick(rid, wait=True)
        assert st.records[0].status == Status.AWAITING_APPROVAL
        assert caplog.text.count("was on the run before decision #1 was made: not taken") == 1
        client.delete_tag(rid, "atm.approve")
        daemon.tick(rid, wait=True)
        client.set_tag(rid, "atm.approve", "1")
        st = daemon.tick(rid, wait=True)
    assert st.records[0].status == Status.PENDING
    assert st.records[0].approval == "approved by tag atm.approve (tracker UI, unsigned)"
    assert list(MlflowBackend(uri).poll(rid).updates) == [1]  # published, signed
    MlflowChannel(rid, uri).ack(Ack(run_id=rid, seq=1, status="applied", applied_step=205, values={"dropout": 0.1}))
    st = daemon.tick(rid, wait=True)
    assert st.records[0].status == Status.APPLIED
    row = _history(uri, rid, capsys)[0]
    assert (row["status"], row["approval"]) == ("applied", "approved by tag atm.approve (tracker UI, unsigned)")

    # 2. `atm reject` from a terminal, signed; `atm approve` of a decision that does not wait is refused.
    rid = overfitting_run(uri)
    daemon.tick(rid, wait=True)
    capsys.readouterr()
    assert _answer("approve", uri, rid, 7) == 1
    assert "decision #7 of run" in capsys.readouterr().err
    assert _answer("reject", uri, rid, 1, "--note", "not before the next eval") == 0
    assert "rejected; the watcher drops it" in capsys.readouterr().out
    st = daemon.tick(rid, wait=True)
    assert st.records[0].status == Status.REJECTED and update_key(1) not in _tags(uri, rid)
    assert st.records[0].approval.startswith("rejected by ") and "(atm reject, signed): not before the next eval" \
        in st.records[0].approval
    assert [(r["seq"], r["status"]) for r in _history(uri, rid, capsys)][:1] == [(1, "rejected")]

    # 3. `atm approve`, and a signed approval made with another key, which is reported and not taken.
    rid = overfitting_run(uri)
    daemon.tick(rid, wait=True)
    other = key_from_text("a-colleagues-own-atm-key", "other")
    client.set_tag(rid, f"{APPROVAL_PREFIX}000001", sign(Approval(run_id=rid, seq=1, decision="approve"), other)
                   .model_dump_json())
    with caplog.at_level("WARNING", logger="atm.watch"):
        st = daemon.tick(rid, wait=True)
    assert st.records[0].status == Status.AWAITING_APPROVAL
    assert f"approval #1 is signed with key id {other.key_id}" in caplog.text
    assert _answer("approve", uri, rid, 1) == 0
    st = daemon.tick(rid, wait=True)
    assert st.records[0].status == Status.PENDING and "(atm approve, signed)" in st.records[0].approval
    assert list(MlflowBackend(uri).poll(rid).updates) == [1]

    # 4. No answer while the run trains past limits.approval_window: expired; a late tag changes nothing.
    rid = overfitting_run(uri)
    daemon.tick(rid, wait=True)
    log_evals(client, rid, 21, 26)
    st = daemon.tick(rid, wait=True)
    assert st.records[0].status == Status.EXPIRED
    assert "expired: no answer while the run trained 5 evaluations past step 200" in st.records[0].approval
    client.set_tag(rid, "atm.approve", "1")
    daemon.tick(rid, wait=True)
    assert st.records[0].status == Status.EXPIRED and update_key(1) not in _tags(uri, rid)
    assert _history(uri, rid, capsys)[0]["status"] == "expired"

    # 5. A rejection by a UI tag.
    rid = overfitting_run(uri)
    daemon.tick(rid, wait=True)
    client.set_tag(rid, "atm.reject", "1")
    st = daemon.tick(rid, wait=True)
    daemon.stop()
    assert st.records[0].status == Status.REJECTED
    assert st.records[0].approval == "rejected by tag atm.reject (tracker UI, unsigned)"


def test_approval_by_tag_and_by_command_on_a_sqlite_store(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    _approval_by_tag_and_by_command(mlflow_uri, caplog, capsys)


@pytest.mark.server
@pytest.mark.slow
def test_approval_by_tag_and_by_command_through_an_mlflow_server(
    mlflow_server: str, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str],
) -> None:
    _approval_by_tag_and_by_command(mlflow_server, caplog, capsys)


def test_a_restarted_watcher_keeps_a_held_decision_and_takes_an_approval_given_meanwhile(mlflow_uri: str) -> None:
    from mlflow.tracking import MlflowClient

    rid = overfitting_run(mlflow_uri)
    first = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1, approve=True, clock=_clock())
    assert [r.status for r in first.tick(rid, wait=True).records] == [Status.AWAITING_APPROVAL]
    first.stop()
    MlflowClient(mlflow_uri).set_tag(rid, "atm.approve", "1")  # while no watcher runs
    again = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1, approve=True, clock=_clock())
    st = again.tick(rid, wait=True)
    again.stop()
    assert [(r.seq, r.status) for r in st.records] == [(1, Status.PENDING)]
    assert list(MlflowBackend(mlflow_uri).poll(rid).updates) == [1]
