"""A change the job applied and then set back itself is recorded ``undone``, with the cause and fix, in
the history, the run's note and the daemon's log; the parameter is not moved again on that run.

Shaped after an MLP script that took atm with ``atm.listen(optimizer)`` and a warm-up ``LambdaLR`` it
did not pass: the history said "applied" while the scheduler had undone the lr change at its next step.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

import atm
from atm.adapters.base import RunView
from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.adapters.notes import MLFLOW_NOTE_TAG, notable
from atm.policies import available_choices, check, load_policy
from atm.schema import Ack, Diagnosis, Proposal, Status
from atm.testing import make_context, make_record
from atm.watcher.cli import main
from atm.watcher.daemon import Daemon
from atm.watcher.reconcile import reconcile
from _runs import publish_first_change  # the sibling module; pytest puts this folder on sys.path

NOTE = "the lr change 0.001 -> 0.0005 was undone (the lr is 0.001 again). Pass it, atm.listen(optimizer, scheduler=sched)"


def view(acks: dict[int, Ack]) -> RunView:
    return RunView(run_id="r", name="", status="RUNNING", history={}, last_metric_time=0.0, moved=False, acks=acks)


def test_an_undone_ack_turns_an_applied_record_undone_once() -> None:
    rec = make_record(1, 10, changes={"lr": (1e-3, 5e-4)}, applied_step=11, run_id="r")
    merged, changed = reconcile([rec], view({1: Ack(run_id="r", seq=1, status="applied", applied_step=11)}))
    assert not changed and merged[0].status == Status.APPLIED
    undone = view({1: Ack(run_id="r", seq=1, status="undone", applied_step=11, values={"lr": 1e-3}, error=NOTE)})
    merged, changed = reconcile(merged, undone)
    assert changed and merged[0].status == Status.UNDONE
    assert merged[0].reason == f"the job undid it: {NOTE}" and merged[0].applied_values == {"lr": 1e-3}
    assert reconcile(merged, undone) == (merged, False)


def test_an_undone_ack_read_before_the_applied_one_settles_a_pending_record() -> None:
    rec = make_record(1, 10, status=Status.PENDING, changes={"lr": (1e-3, 5e-4)}, run_id="r")
    merged, changed = reconcile([rec], view({1: Ack(run_id="r", seq=1, status="undone", applied_step=12, error=NOTE)}))
    assert changed and merged[0].status == Status.UNDONE and merged[0].applied_step == 12


def test_a_parameter_the_job_undid_is_not_moved_again_and_others_still_are() -> None:
    policy = load_policy("lm")
    undone = make_record(1, 100, status=Status.UNDONE, changes={"lr": (1e-3, 5e-4)})
    later = 100 + 10 * 50  # far past every cooldown
    ctx = make_context(later, {"lr": 1e-3, "weight_decay": 0.01, "dropout": 0.1}, history=[undone], eval_every=10)
    offer = available_choices(policy, ctx)
    assert "lr" not in offer and offer  # the others are still offered
    verdict = check(Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"lr": 5e-4}, rationale="cut"), policy, ctx)
    assert not verdict.accepted and "the job undid the last change of lr (#1)" in verdict.dropped["lr"]
    assert notable(undone) == "undone"


def test_a_scheduler_the_job_did_not_pass_undoes_a_change_and_the_history_says_so(
    mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("undone")).info.run_id
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))
    listener = atm.listen(opt, channel=MlflowChannel(rid, tracking_uri=mlflow_uri), poll_interval=0.05)
    backend = MlflowBackend(mlflow_uri)
    try:
        for step in range(1, 13):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            warmup.step()
            client.log_metric(rid, "val_loss", 1.0 / step, step=step)
            client.log_metric(rid, "train_loss", 1.0 / step, step=step)
            if step == 4:  # the watcher's decision, published as the daemon publishes one
                lr = opt.param_groups[0]["lr"]
                publish_first_change(backend, rid, step, lr=(lr, lr / 2))
            time.sleep(0.2)  # the listener's thread fetches the update meanwhile
    finally:
        listener.close()

    daemon = Daemon(backend, load_policy("lm"), interval=0.1)
    try:
        daemon.tick(rid, wait=True)
    finally:
        daemon.stop()
    assert main(["history", "--backend", "mlflow", "--run", rid, "--tracking-uri", mlflow_uri, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "undone", row
    assert "the job undid it" in row["reason"] and "scheduler=sched" in row["reason"]
    note = client.get_run(rid).data.tags[MLFLOW_NOTE_TAG]
    assert "the job undid" in note and "LambdaLR" in note
