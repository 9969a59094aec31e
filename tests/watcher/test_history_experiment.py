"""`atm history --experiment`: a sweep's decisions, every run of the experiment, read from a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atm.adapters.mlflow_backend import MlflowBackend
from atm.watcher.cli import main

from _runs import overfitting_run, publish_first_change


def test_history_of_an_experiment_shows_each_run_under_its_id_oldest_first(
    mlflow_uri: str, capsys: pytest.CaptureFixture[str],
) -> None:
    first = overfitting_run(mlflow_uri, experiment="sweep")
    second = overfitting_run(mlflow_uri, experiment="sweep")
    elsewhere = overfitting_run(mlflow_uri, experiment="another")
    backend = MlflowBackend(mlflow_uri)
    publish_first_change(backend, first, 200, lr=(2e-3, 1e-3))
    publish_first_change(backend, elsewhere, 200, lr=(2e-3, 5e-4))
    MlflowClient(mlflow_uri).set_terminated(first, "FINISHED")  # ended runs are part of the sweep too

    assert main(["history", "--backend", "mlflow", "--experiment", "sweep", "--tracking-uri", mlflow_uri]) == 0
    text = capsys.readouterr().out
    assert text.startswith("experiment 'sweep': 2 runs, oldest first")
    assert text.index(f"atm interventions — run {first}") < text.index(f"no interventions on run {second}")
    assert "lr 0.002→0.001" in text and elsewhere not in text and "0.0005" not in text

    assert main(["history", "--experiment", "sweep", "--tracking-uri", mlflow_uri, "--json"]) == 0  # found in MLflow
    items = json.loads(capsys.readouterr().out)
    assert [(i["run_id"], i["status"], [r["seq"] for r in i["interventions"]]) for i in items] == [
        (first, "FINISHED", [1]), (second, "RUNNING", [])]
    assert items[0]["interventions"][0]["changes"] == {"lr": {"old": 0.002, "new": 0.001}}
    assert items[0]["name"] == MlflowClient(mlflow_uri).get_run(first).info.run_name


def test_history_of_an_experiment_says_what_is_wrong(
    mlflow_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    rid = overfitting_run(mlflow_uri, experiment="sweep")
    assert main(["history", "--experiment", "sweep", "--run", rid, "--tracking-uri", mlflow_uri]) == 2
    assert "give --run or --experiment, not both" in capsys.readouterr().err
    assert main(["history", "--tracking-uri", mlflow_uri]) == 2
    assert "give exactly one --run (or --experiment NAME)" in capsys.readouterr().err

    assert main(["history", "--backend", "mlflow", "--experiment", "swep", "--tracking-uri", mlflow_uri]) == 1
    assert f"atm history: no MLflow experiment named 'swep' at {mlflow_uri}" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # no ./wandb here
    assert main(["history", "--experiment", "swep", "--tracking-uri", mlflow_uri]) == 1
    err = capsys.readouterr().err
    assert "experiment 'swep' was not found, and --backend was not given. Looked in:" in err
    assert "mlflow: no MLflow experiment named 'swep'" in err and "wandb: no W&B run of project 'swep'" in err

    # Reading commands refuse a store that does not exist rather than create an empty one.
    missing = tmp_path / "typo.db"
    assert main(["history", "--backend", "mlflow", "--experiment", "sweep", "--tracking-uri", f"sqlite:///{missing}"]) == 1
    assert "atm history: no MLflow store at" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no MLflow store at"):
        main(["explain", "--backend", "mlflow", "--experiment", "sweep", "--tracking-uri", f"sqlite:///{missing}"])
    assert not missing.exists()
