"""`atm history` shows where each change was decided and where it took effect on the run's own step axis,
so the delay of the manual pattern is measured: `apply_pending()` at the top of the
loop applies a decision before the update after the evaluation it answers; after logging, one later."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient

import atm
from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.watcher.cli import main
from _runs import publish_first_change  # the sibling module; pytest puts this folder on sys.path

DECIDED_AT = 3


def _custom_loop(mlflow_uri: str, apply_at_top: bool) -> str:
    """A custom loop with its recipe as a knob and apply="manual", logging with step=update; the watcher's
    decision on update 3's evaluation is published as soon as that evaluation is logged."""
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment(f"manual-{apply_at_top}")).info.run_id
    recipe = {"lr": 1e-3}
    listener = atm.listen(knobs=atm.attrs(recipe, lr="lr"), apply="manual",
                          channel=MlflowChannel(rid, tracking_uri=mlflow_uri), poll_interval=0.05)
    backend = MlflowBackend(mlflow_uri)
    try:
        for update in range(1, 7):
            if apply_at_top:
                listener.apply_pending(step=update)   # top of the loop: before the rollout the decision is about
            time.sleep(0.05)                          # the rollout and the training, on recipe["lr"]
            client.log_metric(rid, "val_loss", 1.0 / update, step=update)
            if not apply_at_top:
                listener.apply_pending(step=update)   # after logging: the change reaches the next update only
            if update == DECIDED_AT:
                publish_first_change(backend, rid, DECIDED_AT, lr=(1e-3, 2e-3))
            time.sleep(0.4)  # the listener's thread fetches the update meanwhile
    finally:
        listener.close()
    return rid


@pytest.mark.parametrize(("apply_at_top", "applied_at"), [(True, DECIDED_AT + 1), (False, DECIDED_AT + 2)],
                         ids=["apply_pending at the top", "apply_pending after logging"])
def test_history_shows_where_a_change_was_decided_and_where_it_took_effect(
    mlflow_uri: str, capsys: pytest.CaptureFixture[str], apply_at_top: bool, applied_at: int
) -> None:
    rid = _custom_loop(mlflow_uri, apply_at_top)
    assert main(["history", "--backend", "mlflow", "--run", rid, "--tracking-uri", mlflow_uri, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "applied" and row["step"] == DECIDED_AT and row["effective_step"] == applied_at
    assert main(["history", "--backend", "mlflow", "--run", rid, "--tracking-uri", mlflow_uri]) == 0
    table = capsys.readouterr().out
    assert "decided at" in table and "applied at" in table
