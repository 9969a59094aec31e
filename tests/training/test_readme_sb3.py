"""The README's Stable-Baselines3 logger snippet, run as printed: SB3's own metrics reach the MLflow run."""

from __future__ import annotations

import re
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient
from stable_baselines3 import PPO

from atm.policies import load_policy
from atm.watcher.snapshot import missing_role_note, resolve_roles

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readmes_sb3_logger_snippet_puts_sb3s_metrics_on_the_run(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (snippet,) = [b for b in blocks if "class MLflowOutput" in b]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        # An experiment of its own: an earlier test's active experiment (fluent state) is not in this store.
        with mlflow.start_run(experiment_id=MlflowClient(uri).create_experiment("readme-sb3")) as run:
            model = PPO("MlpPolicy", "CartPole-v1", n_steps=128, batch_size=64, n_epochs=1, seed=0, verbose=0)
            exec(snippet, {"mlflow": mlflow, "model": model})  # noqa: S102 - the README's own code
            model.learn(256)
    finally:
        mlflow.set_tracking_uri(before)
    keys = set(MlflowClient(uri).get_run(run.info.run_id).data.metrics)
    # train/approx_kl is a numpy float32: a filter on (int, float) alone drops it.
    assert {"rollout/ep_rew_mean", "train/approx_kl", "train/entropy_loss", "train/clip_fraction"} <= keys, keys
    rl = load_policy("rl-ppo")
    assert resolve_roles(rl, sorted(keys))["return"] == "rollout/ep_rew_mean"
    assert "no metrics of its own" not in missing_role_note(rl, sorted(keys))
