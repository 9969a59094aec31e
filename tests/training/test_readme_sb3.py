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


def test_an_off_policy_model_is_offered_lr_alone_and_judged_by_its_return() -> None:
    """The README's off-policy paragraph: SAC with a learned entropy coefficient and TD3, under the example
    policy file, are offered lr and nothing else, and none of their train/* rows maps to a role."""
    from stable_baselines3 import SAC, TD3

    from atm.policies._validator import DecisionContext, available_choices
    from atm.training.sb3 import sb3_knobs

    text = " ".join(README.read_text().split())
    assert "An off-policy model (SAC, TD3, DQN) works with the same file and is judged by its return alone" in text
    policy = load_policy(Path(__file__).resolve().parents[2] / "examples" / "sb3_policy.yaml")
    for algo in (SAC, TD3):
        model = algo("MlpPolicy", "Pendulum-v1", buffer_size=100, seed=0, device="cpu")
        params = {name: float(get()) for name, (get, _) in sb3_knobs(model).items()}
        ctx = DecisionContext(step=20_000, params=params, eval_steps=tuple(range(2_000, 20_001, 2_000)))
        assert set(available_choices(policy, ctx)) == {"lr"}, algo.__name__
    sac_keys = ["rollout/ep_rew_mean", "rollout/ep_len_mean", "eval/mean_reward", "train/actor_loss",
                "train/critic_loss", "train/ent_coef", "train/ent_coef_loss", "train/learning_rate"]
    mapped = resolve_roles(load_policy("rl-ppo"), sac_keys)
    assert mapped["return"] == "eval/mean_reward"
    assert not {k for k in mapped.values() if k and k.startswith("train/")}, mapped
