"""``atm.log_metrics``: a trainer's mixed rows reach the active tracker as numbers only.

Shaped after the custom PPO trainer whose rows mixed floats, numpy and torch scalars, strings
(``"phase": "rollout"``), bools (``"early_stop": True``) and a NaN loss: ``mlflow.log_metrics``
refused the whole row for one string. Real MLflow (a sqlite store) and real wandb (offline).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import atm
import atm.training.api as api
from atm.training.api import numeric_items

ROW = {
    "update": 3,
    "charts/episodic_return": np.float32(12.5),
    "losses/approx_kl": torch.tensor(0.01),
    "losses/value_loss": np.array([0.25]),
    "losses/policy_loss": float("nan"),
    "charts/sps": np.int64(900),
    "phase": "rollout",
    "early_stop": True,
    "flag_np": np.bool_(False),
    "note": None,
    "per_env": [1.0, 2.0],
}


@pytest.fixture(autouse=True)
def _fresh_notes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "_dropped_keys", set())
    monkeypatch.setattr(api, "_warned_no_tracker", False)


def test_numbers_are_kept_with_nan_and_the_rest_is_named_by_type() -> None:
    values, dropped = numeric_items(ROW)
    assert set(values) == {"update", "charts/episodic_return", "losses/approx_kl", "losses/value_loss",
                           "losses/policy_loss", "charts/sps"}
    assert values["losses/approx_kl"] == pytest.approx(0.01) and values["losses/value_loss"] == 0.25
    assert math.isnan(values["losses/policy_loss"])  # NaN is divergence: the manager must see it
    assert all(type(v) is float for v in values.values())
    assert dropped == {"phase": "str", "early_stop": "bool", "flag_np": type(np.bool_(False)).__name__, "note": "NoneType", "per_env": "list"}


def test_mlflow_gets_the_numbers_at_the_step_and_each_dropped_key_is_named_once(mlflow_uri: str) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_uri)
    try:
        with mlflow.start_run(experiment_id=MlflowClient(mlflow_uri).create_experiment("log-metrics")) as run:
            with pytest.warns(UserWarning) as seen:
                logged = atm.log_metrics(ROW, step=3)
            (note,) = [str(w.message) for w in seen]
            assert "'phase' (str)" in note and "'early_stop' (bool)" in note and "'note' (NoneType)" in note
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the same keys again: no second note
                atm.log_metrics({**ROW, "update": 4}, step=4)
    finally:
        mlflow.set_tracking_uri(before)
    assert set(logged) == set(numeric_items(ROW)[0])
    client = MlflowClient(mlflow_uri)
    metrics = client.get_run(run.info.run_id).data.metrics
    assert "phase" not in metrics and "early_stop" not in metrics
    assert metrics["charts/episodic_return"] == 12.5
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "update")] == [(3, 3.0), (4, 4.0)]
    assert math.isnan(metrics["losses/policy_loss"])


def test_wandb_gets_the_numbers(tmp_path: Path) -> None:
    import wandb

    run = wandb.init(mode="offline", dir=str(tmp_path), project="atm-log-metrics")
    try:
        with pytest.warns(UserWarning, match="'phase' \\(str\\)"):
            atm.log_metrics(ROW, step=3)
        atm.log_metrics({"update": 4}, step=4)  # W&B commits a row with step= when the next step begins
        assert run.summary["charts/episodic_return"] == 12.5 and run.summary["update"] == 3
        assert "phase" not in run.summary.keys()
    finally:
        run.finish()


def test_no_active_run_is_said_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    with pytest.warns(UserWarning, match="no active run"):
        assert atm.log_metrics({"loss": 1.0}, step=1) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atm.log_metrics({"loss": 1.0}, step=2)
