"""The listener's ``atm/*`` values land on the run's own step axis: a job that logs per
epoch had its lr markers at the optimizer-step count, far off its own charts."""

from __future__ import annotations

import time

import torch
import torch.nn as nn
from mlflow.tracking import MlflowClient

import atm
from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.schema import Change, DecisionRecord, Diagnosis, Status

STEPS_PER_EPOCH = 20


def _train_epochs(rid: str, mlflow_uri: str, **listen: object) -> tuple[list[int], int]:
    """A torch loop that logs val_loss once per epoch (step=epoch) and takes 20 optimizer steps an epoch;
    an lr update is published after epoch 3. Returns the steps of atm/lr's points and the last epoch."""
    client = MlflowClient(mlflow_uri)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    listener = atm.listen(opt, channel=MlflowChannel(rid, tracking_uri=mlflow_uri), poll_interval=0.05, **listen)
    epoch, published = 0, False
    deadline = time.monotonic() + 60
    try:
        while not listener.applied and time.monotonic() < deadline:
            epoch += 1
            for _ in range(STEPS_PER_EPOCH):
                opt.zero_grad()
                model(torch.randn(16, 4)).pow(2).mean().backward()
                opt.step()
            client.log_metric(rid, "val_loss", 1.0 / epoch, step=epoch)
            if epoch == 3 and not published:
                published = True
                MlflowBackend(mlflow_uri).publish(DecisionRecord(
                    run_id=rid, seq=1, step=3, status=Status.PENDING, source="rules", diagnosis=Diagnosis.PLATEAU,
                    changes={"lr": Change(old=1e-3, new=5e-4)}, reason="test"))
            time.sleep(0.1)
        assert listener.applied, "the update never reached the job"
        time.sleep(0.3)
    finally:
        listener.close()
    return [m.step for m in client.get_metric_history(rid, "atm/lr")], epoch


def test_atm_values_land_on_the_epoch_axis_the_job_logs_on(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("epochs")).info.run_id
    steps, last_epoch = _train_epochs(rid, mlflow_uri)
    # The change is charted at the epoch it was applied in (the optimizer had taken 20x as many steps).
    assert steps and max(steps) <= last_epoch, (steps, last_epoch)
    assert 3 <= max(steps)


def test_a_step_given_to_listen_wins(mlflow_uri: str) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("given")).info.run_id
    steps, _ = _train_epochs(rid, mlflow_uri, step=lambda: 1000)
    assert set(steps) == {1000}
