"""Notifications where users look: the note at the top of an MLflow run for a stop,
rollback, revert or rejected update, and a W&B alert raised by the job's own listener (offline: in the
transaction log that `wandb sync` uploads, and in files/atm/alerts.jsonl)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atm.adapters.mlflow_backend import MlflowBackend
from atm.adapters.notes import MLFLOW_NOTE_TAG, NOTE_MARK, notable, run_note, update_alert
from atm.schema import Action, Status
from atm.testing import make_record


def test_only_what_a_person_should_hear_about_makes_a_note() -> None:
    assert notable(make_record(1, 10, status=Status.PENDING, action=Action.STOP)) == "stop"
    assert notable(make_record(1, 10, action=Action.ROLLBACK, changes={"lr": (1e-3, 5e-4)})) == "rollback"
    assert notable(make_record(1, 10, changes={"lr": (1e-3, 5e-4)}).model_copy(update={"reverts": 3})) == "revert"
    assert notable(make_record(1, 10, status=Status.REJECTED, changes={"lr": (1e-3, 5e-2)})) == "rejected"
    assert notable(make_record(1, 10, changes={"lr": (1e-3, 5e-4)})) == ""  # an ordinary remedy: the tags say it
    assert notable(make_record(1, 10, status=Status.DRY_RUN, action=Action.STOP)) == ""
    assert notable(make_record(1, 10, status=Status.STALE, action=Action.STOP)) == ""


def test_a_stop_alert_says_the_problem_it_ends_not_converged() -> None:
    from atm.schema import Change, Diagnosis, Update

    stop = Update(run_id="r", seq=4, step=1000, diagnosis=Diagnosis.CONVERGED, action=Action.STOP, source="rules",
                  rationale="overfitting is back after 3 remedies: stop, keeping the best checkpoint")
    title, text, level = update_alert(stop)  # type: ignore[misc]
    assert title == "atm: stop (#4)" and "converged" not in text and "overfitting is back" in text
    back = Update(run_id="r", seq=5, step=1200, diagnosis=Diagnosis.DIVERGENCE, action=Action.ROLLBACK,
                  source="rules", changes={"lr": Change(old=1e-3, new=5e-4)})
    assert "(divergence): rollback to the best checkpoint, with lr 0.001 -> 0.0005" in update_alert(back)[1]  # type: ignore[index]


def test_the_mlflow_run_note_says_the_latest_stop_and_keeps_the_users_own_text(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("notes")).info.run_id
    client.set_tag(rid, MLFLOW_NOTE_TAG, "Baseline with the new tokenizer.")
    backend = MlflowBackend(mlflow_uri)

    backend.publish(make_record(1, 100, status=Status.PENDING, changes={"lr": (1e-3, 5e-4)}, run_id=rid))
    assert client.get_run(rid).data.tags[MLFLOW_NOTE_TAG] == "Baseline with the new tokenizer."  # nothing notable

    rollback = make_record(2, 200, status=Status.PENDING, action=Action.ROLLBACK, changes={"dropout": (0.0, 0.1)},
                           run_id=rid).model_copy(update={"rationale": "val_loss rose 3 evaluations in a row"})
    backend.publish(rollback)
    note = client.get_run(rid).data.tags[MLFLOW_NOTE_TAG]
    assert note.startswith("Baseline with the new tokenizer.\n\n" + NOTE_MARK)
    assert "decision #2 at step 200: asked the job to **roll back** to its best checkpoint: dropout 0 → 0.1" in note
    assert "> val_loss rose 3 evaluations in a row" in note

    stop = make_record(3, 300, status=Status.APPLIED, action=Action.STOP, run_id=rid)
    backend.publish(stop)
    backend.publish(rollback.model_copy(update={"status": Status.APPLIED}))  # republished later (its effect's tag)
    note = client.get_run(rid).data.tags[MLFLOW_NOTE_TAG]
    assert note.count(NOTE_MARK) == 1 and note.startswith("Baseline with the new tokenizer.")
    assert "decision #3 at step 300: asked the job to **stop** (overfitting) — applied." in note
    assert "roll back" not in note


def test_a_rejected_update_is_noted_with_the_reason(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("rejected")).info.run_id
    refused = make_record(1, 50, status=Status.REJECTED, changes={"lr": (1e-3, 1e-2)}, run_id=rid).model_copy(
        update={"reason": "update #1 is signed with key id 3fa2, this job has key id 91c0: give both the same ATM_KEY"})
    MlflowBackend(mlflow_uri).publish(refused)
    note = client.get_run(rid).data.tags[MLFLOW_NOTE_TAG]
    assert note.startswith(NOTE_MARK) and "**rejected** an update: lr 0.001 → 0.01 — rejected." in note
    assert "give both the same ATM_KEY" in note
    assert run_note(refused, note) == note  # written once: the same record again changes nothing


def test_the_listener_raises_wandb_alerts_for_a_rollback_and_a_refused_update(tmp_path: Path) -> None:
    import wandb

    import atm
    from atm.adapters._wandb._local import RunLayout, write_atomic
    from atm.adapters._wandb._txlog import LogTail
    from atm.adapters.wandb_backend import WandbBackend
    from atm.schema import Diagnosis, Update

    run = wandb.init(mode="offline", dir=str(tmp_path), project="atm-alerts")
    hp = {"lr": 0.01}
    restored: list[int] = []
    listener = atm.listen(knobs={"lr": (lambda: hp["lr"], lambda v: hp.__setitem__("lr", v))},
                          actions={"rollback": lambda: restored.append(1)}, poll_interval=0.1)
    try:
        run_dir = Path(run.settings.sync_dir)
        backend = WandbBackend(tmp_path / "wandb")
        rid = str(run_dir)
        backend.publish(make_record(1, 5, status=Status.PENDING, action=Action.ROLLBACK, changes={"lr": (0.01, 0.005)},
                                    diagnosis=Diagnosis.OVERFITTING, run_id=run.id))
        # An update nobody signed, as a hand-written file would be: the job refuses it.
        forged = Update(run_id=run.id, seq=2, step=6, changes={}, action=Action.STOP, diagnosis=Diagnosis.CONVERGED,
                        source="rules")
        write_atomic(RunLayout(run_dir).inbox / "update-000002.json", forged.model_dump_json())
        deadline = time.monotonic() + 30
        while len(backend.poll(rid).acks) < 2 and time.monotonic() < deadline:
            run.log({"train_loss": 1.0})
            time.sleep(0.2)
        acks = backend.poll(rid).acks
        assert acks[1].status == "applied" and restored == [1] and hp["lr"] == pytest.approx(0.005)
        assert acks[2].status == "rejected" and not listener.stop_requested
        time.sleep(0.5)  # the alerts follow the acks on the listener's thread
    finally:
        listener.close()
        wandb.finish()
    saved = [json.loads(line) for line in (run_dir / "files" / "atm" / "alerts.jsonl").read_text().splitlines()]
    saved.sort(key=lambda a: a["title"])  # the refusal may come first: both were read in one cycle
    assert [(a["title"], a["level"]) for a in saved] == [("atm: rollback to the best checkpoint (#1)", "WARN"),
                                                       ("atm: update #2 refused", "ERROR")]
    assert "lr 0.01 -> 0.005" in saved[0]["text"] and "not signed" in saved[1]["text"]
    (path,) = run_dir.glob("run-*.wandb")
    tail, in_log = LogTail(path), []
    deadline = time.monotonic() + 60  # wandb's service writes the log's last blocks after finish() returns
    while len(in_log) < 2 and time.monotonic() < deadline:
        in_log += [r.alert for r in tail.read() if r.WhichOneof("record_type") == "alert"]
        time.sleep(0.5)
    assert sorted(a.title for a in in_log) == [a["title"] for a in saved]  # what `wandb sync` sends to W&B
