"""SB3 knobs: a value changed between rollouts is the value SB3 uses in the next update."""

from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from atm.training import sb3
from atm.training.workloads.manipulation.env import PlanarArmReachEnv

N_ENVS, N_STEPS, BATCH = 2, 64, 64
ROLLOUT = N_ENVS * N_STEPS
MINIBATCHES = ROLLOUT // BATCH
# With every reward weight at 0 only the action and proximity costs remain: rewards lie in [-0.07, 0].
FLOOR = -(0.01 * 2 + 0.05)


def make_model(venv=None, **overrides: Any) -> PPO:
    venv = venv or DummyVecEnv([PlanarArmReachEnv for _ in range(N_ENVS)])
    kwargs = dict(n_steps=N_STEPS, batch_size=BATCH, n_epochs=2, learning_rate=3e-4, seed=0, device="cpu")
    kwargs.update(overrides)
    return PPO("MlpPolicy", venv, **kwargs)


def at_apply_hook(fn) -> BaseCallback:
    """A callback that calls ``fn(model)`` at the hook sb3.APPLY_HOOK names, at every rollout end."""

    class Apply(BaseCallback):
        def _on_step(self) -> bool:
            return True

    setattr(Apply, sb3.APPLY_HOOK, lambda self: fn(self.model))
    return Apply()


class StepRecorder:
    """Counts optimizer steps per update and the LR each step ran with."""

    def __init__(self, model: PPO) -> None:
        self.lrs: list[float] = []
        model.policy.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: self.lrs.append(opt.param_groups[0]["lr"])
        )


class Capture(KVWriter):
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def write(self, key_values, key_excluded, step=0):
        self.rows.append(dict(key_values))

    def close(self):
        pass


def set_knob(name: str, value: float):
    def apply(model):
        sb3.sb3_knobs(model)[name][1](value)

    return apply


def test_apply_hook_is_between_rollouts():
    assert sb3.APPLY_HOOK == "_on_rollout_end"
    assert hasattr(BaseCallback, sb3.APPLY_HOOK)


def test_knob_names_and_getters():
    model = make_model(ent_coef=0.01, clip_range=0.2, target_kl=0.03)
    knobs = sb3.sb3_knobs(model)
    assert set(knobs) == {
        "lr", "ent_coef", "clip_range", "n_epochs", "target_kl",
        "reward.progress_scale", "reward.success_bonus", "reward.collision_penalty",
    }
    values = {k: get() for k, (get, _) in knobs.items()}
    assert values["lr"] == 3e-4 and values["ent_coef"] == 0.01 and values["clip_range"] == 0.2
    assert values["n_epochs"] == 2 and values["target_kl"] == 0.03
    assert values["reward.collision_penalty"] == 5.0


def test_lr_change_reaches_the_optimizer_and_survives_further_learning():
    model = make_model()
    rec = StepRecorder(model)
    model.learn(2 * ROLLOUT, callback=at_apply_hook(set_knob("lr", 1e-3)))
    assert rec.lrs and all(lr == 1e-3 for lr in rec.lrs)  # the first update already used it
    rec.lrs.clear()
    model.learn(ROLLOUT, reset_num_timesteps=False)  # no callback: SB3 re-reads lr_schedule
    assert rec.lrs and all(lr == 1e-3 for lr in rec.lrs)
    assert sb3.sb3_knobs(model)["lr"][0]() == 1e-3


def test_writing_only_the_optimizer_lr_is_undone_by_sb3():
    # Why the lr knob also replaces lr_schedule: SB3 rewrites param groups from it at every update.
    model = make_model()
    rec = StepRecorder(model)

    def optimizer_only(m):
        for group in m.policy.optimizer.param_groups:
            group["lr"] = 1e-3

    model.learn(ROLLOUT, callback=at_apply_hook(optimizer_only))
    assert rec.lrs and all(lr == 3e-4 for lr in rec.lrs)


def test_clip_range_change_is_the_clip_range_used():
    model = make_model(clip_range=0.2)
    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    model.learn(2 * ROLLOUT, callback=at_apply_hook(set_knob("clip_range", 0.05)))
    used = [row["train/clip_range"] for row in capture.rows if "train/clip_range" in row]
    assert used and all(v == 0.05 for v in used)
    assert callable(model.clip_range) and model.clip_range(0.3) == 0.05


def test_n_epochs_change_sets_the_number_of_gradient_steps():
    model = make_model(n_epochs=2)
    rec = StepRecorder(model)
    model.learn(ROLLOUT, callback=at_apply_hook(set_knob("n_epochs", 5)))
    assert len(rec.lrs) == 5 * MINIBATCHES
    with pytest.raises(ValueError, match="at least 1"):
        sb3.sb3_knobs(model)["n_epochs"][1](0)


def test_target_kl_change_stops_the_update_early():
    model = make_model(n_epochs=4, target_kl=None)
    rec = StepRecorder(model)
    model.learn(ROLLOUT)
    assert len(rec.lrs) == 4 * MINIBATCHES
    rec.lrs.clear()
    # A tiny target: the second minibatch's KL already exceeds 1.5x it, after one gradient step.
    model.learn(ROLLOUT, reset_num_timesteps=False, callback=at_apply_hook(set_knob("target_kl", 1e-8)))
    assert len(rec.lrs) == 1


def test_ent_coef_change_is_the_entropy_weight_used():
    # Same seed, same data; only the entropy weight set at the hook differs. A large weight must
    # push the log-std up in the very next update; a zero weight must not do the same.
    results = {}
    for coef in (0.0, 10.0):
        model = make_model(ent_coef=0.01, learning_rate=1e-2)
        before = model.policy.log_std.detach().clone()
        model.learn(ROLLOUT, callback=at_apply_hook(set_knob("ent_coef", coef)))
        results[coef] = model.policy.log_std.detach() - before
        assert model.ent_coef == coef
    assert (results[10.0] > 0).all()
    assert (results[10.0] > results[0.0]).all()


class RecordRewards(gym.Wrapper):
    """Keeps the env's own rewards (SB3's rollout buffer adds bootstrapped values on truncation)."""

    def __init__(self, env: gym.Env, sink: list[float]) -> None:
        super().__init__(env)
        self.sink = sink

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.sink.append(float(reward))
        return obs, reward, terminated, truncated, info


def zero_reward_weights(model) -> None:
    knobs = sb3.sb3_knobs(model)
    for name in ("progress_scale", "success_bonus", "collision_penalty"):
        knobs[f"reward.{name}"][1](0.0)


def test_reward_weights_reach_every_env_and_the_rewards():
    sinks: list[list[float]] = [[] for _ in range(N_ENVS)]
    venv = DummyVecEnv([lambda sink=sink: RecordRewards(PlanarArmReachEnv(), sink) for sink in sinks])
    model = make_model(venv)
    model.learn(2 * ROLLOUT, callback=at_apply_hook(zero_reward_weights))
    for weights in venv.env_method("get_reward_weights"):
        assert weights == {"progress_scale": 0.0, "success_bonus": 0.0, "collision_penalty": 0.0}
    assert sb3.sb3_knobs(model)["reward.progress_scale"][0]() == 0.0
    for sink in sinks:
        first, second = np.array(sink[:N_STEPS]), np.array(sink[N_STEPS:])
        assert len(second) == N_STEPS
        assert np.abs(first).max() > -FLOOR  # the default weights gave larger rewards
        assert second.min() >= FLOOR - 1e-9 and second.max() <= 0.0  # the next rollout used the new ones


@pytest.mark.slow
def test_reward_weights_reach_subprocess_envs():
    venv = SubprocVecEnv([PlanarArmReachEnv for _ in range(N_ENVS)])
    try:
        model = make_model(venv)
        knobs = sb3.sb3_knobs(model)
        knobs["reward.collision_penalty"][1](25.0)
        assert [w["collision_penalty"] for w in venv.env_method("get_reward_weights")] == [25.0] * N_ENVS
        assert knobs["reward.collision_penalty"][0]() == 25.0
        model.learn(ROLLOUT, callback=at_apply_hook(zero_reward_weights))
        venv.reset()
        rng = np.random.default_rng(0)
        rewards = [venv.step(rng.uniform(-1, 1, (N_ENVS, 2)).astype(np.float32))[1] for _ in range(N_STEPS)]
        assert np.min(rewards) >= FLOOR - 1e-9 and np.max(rewards) <= 0.0
    finally:
        venv.close()


def test_setters_reject_bad_values():
    knobs = sb3.sb3_knobs(make_model())
    for name, bad in [("lr", 0.0), ("lr", math.nan), ("clip_range", -0.1), ("target_kl", 0.0),
                      ("ent_coef", math.inf), ("reward.success_bonus", math.nan)]:
        with pytest.raises(ValueError, match=name.split(".")[0]):
            knobs[name][1](bad)


def test_changed_schedules_survive_save_and_load(tmp_path):
    model = make_model()
    knobs = sb3.sb3_knobs(model)
    knobs["lr"][1](1e-3)
    knobs["clip_range"][1](0.1)
    model.save(tmp_path / "m.zip")
    loaded = PPO.load(tmp_path / "m.zip", device="cpu")
    assert loaded.lr_schedule(0.5) == 1e-3 and loaded.clip_range(0.5) == 0.1


def test_envs_without_reward_weights_get_no_reward_knobs():
    model = PPO("MlpPolicy", DummyVecEnv([lambda: gym.make("Pendulum-v1")]), n_steps=64, device="cpu")
    assert set(sb3.sb3_knobs(model)) == {"lr", "ent_coef", "clip_range", "n_epochs", "target_kl"}


def test_other_algorithms_get_the_knobs_they_have():
    venv = DummyVecEnv([PlanarArmReachEnv])
    a2c = A2C("MlpPolicy", venv, n_steps=8, ent_coef=0.01, device="cpu")
    algorithm_knobs = lambda m: {k for k in sb3.sb3_knobs(m) if not k.startswith("reward.")}  # noqa: E731
    assert algorithm_knobs(a2c) == {"lr", "ent_coef"}
    rec = StepRecorder(a2c)
    a2c.learn(16, callback=at_apply_hook(set_knob("lr", 2e-3)))
    assert rec.lrs and all(lr == 2e-3 for lr in rec.lrs)

    # SAC learns its entropy coefficient by default ("auto"): only the lr is a knob. With a fixed
    # coefficient, the tensor SAC's loss reads is what changes.
    auto = SAC("MlpPolicy", venv, buffer_size=100, learning_starts=0, device="cpu")
    assert algorithm_knobs(auto) == {"lr"}
    fixed = SAC("MlpPolicy", venv, buffer_size=100, learning_starts=0, ent_coef=0.1, device="cpu")
    knobs = sb3.sb3_knobs(fixed)
    knobs["ent_coef"][1](0.05)
    assert float(fixed.ent_coef_tensor) == pytest.approx(0.05)
    knobs["lr"][1](1e-4)
    fixed.learn(8)
    assert fixed.actor.optimizer.param_groups[0]["lr"] == 1e-4 and fixed.critic.optimizer.param_groups[0]["lr"] == 1e-4


def test_a_model_with_a_listener_still_saves_and_loads(tmp_path):
    # SB3's save() pickles the model's attributes; atm's train() wrapper must not be among them.
    from atm.testing import FakeChannel

    import atm

    model = make_model()
    listener = atm.listen(model, channel=FakeChannel(), poll_interval=0.01)
    try:
        model.learn(ROLLOUT)
        model.save(tmp_path / "m.zip")
    finally:
        listener.close()
    loaded = PPO.load(tmp_path / "m.zip", device="cpu")
    assert "train" not in vars(loaded) and loaded.n_steps == N_STEPS


def test_a_second_learn_with_a_new_callback_applies_its_updates():
    import atm
    from atm.testing import FakeChannel, wait_for

    model = make_model()
    first, second = FakeChannel(), FakeChannel()
    model.learn(ROLLOUT, callback=atm.sb3_callback(channel=first, poll_interval=0.01))
    second.publish(1, step=0, lr=(3e-4, 1e-3))  # signed, as the watcher's
    cb = atm.sb3_callback(channel=second, poll_interval=0.01)

    def received(_model):  # at each rollout's end: the first update must be in before training on it
        wait_for(lambda: cb.listener is not None and (cb.listener._pending or cb.listener.applied))

    model.learn(2 * ROLLOUT, reset_num_timesteps=False, callback=[cb, at_apply_hook(received)])
    assert 1 in second.acks and second.acks[1].status == "applied"
    assert model.lr_schedule(0.5) == 1e-3
    assert not first.acks
