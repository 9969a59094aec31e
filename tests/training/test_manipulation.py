"""The arm-and-obstacle workload: geometry, collision and success logic, scenes, evaluation, recipes."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from atm.training.workloads.manipulation.env import (
    ACTION_COST,
    MEDIUM_CLEARANCE_BELOW,
    PROXIMITY_COST,
    PROXIMITY_MARGIN,
    ArmSpec,
    Difficulty,
    PlanarArmReachEnv,
    Scene,
    arm_clearance,
    classify_scene,
    direct_path_clearance,
    forward_kinematics,
    sample_scene,
    scene_is_solvable,
)

SPEC = ArmSpec()
FAR = (-0.9, -0.6)  # an obstacle position well away from an arm stretched along +x


def expected_reward(weights: dict[str, float], prev: float, info: dict, action: np.ndarray) -> float:
    a = np.clip(action, -1, 1)
    return (
        weights["progress_scale"] * (prev - info["final_distance"])
        + weights["success_bonus"] * info["safe_success"]
        - weights["collision_penalty"] * info["collision"]
        - ACTION_COST * float(a @ a)
        - PROXIMITY_COST * max(0.0, PROXIMITY_MARGIN - max(info["clearance"], 0.0)) / PROXIMITY_MARGIN
    )


def run_constant(env: PlanarArmReachEnv, action, max_steps: int = 60):
    """Step a constant action until the episode ends; returns the list of (reward, info, prev_distance)."""
    action = np.asarray(action, dtype=np.float32)
    prev = env._distance
    out = []
    for _ in range(max_steps):
        _, reward, terminated, truncated, info = env.step(action)
        out.append((reward, info, prev))
        prev = info["final_distance"]
        if terminated or truncated:
            break
    return out


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("center", "radius", "clearance"),
    [
        ((0.5, 0.2), 0.1, 0.2 - 0.1 - 0.025),  # beside link 1
        ((0.5, 0.1), 0.1, 0.1 - 0.1 - 0.025),  # overlapping link 1
        ((1.0, -0.15), 0.1, 0.15 - 0.1 - 0.025),  # beside link 2
        ((1.4, 0.0), 0.1, 0.2 - 0.1 - 0.025),  # past the hand: distance to the segment's end
    ],
)
def test_arm_clearance_on_hand_placed_obstacles(center, radius, clearance):
    assert float(arm_clearance(np.array([0.0, 0.0]), center, radius, SPEC)) == pytest.approx(clearance)


def test_forward_kinematics_matches_mujoco_site():
    import mujoco

    env = PlanarArmReachEnv()
    env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(15):
        _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
        mujoco.mj_kinematics(env.model, env.data)  # mj_step leaves positions from before integration
        _, hand = forward_kinematics(env.data.qpos.copy(), SPEC)
        assert np.allclose(hand, env.data.site("hand").xpos[:2], atol=1e-9)
        if terminated or truncated:
            break


# ---------------------------------------------------------------- collision and success


def test_sweeping_into_the_obstacle_is_a_collision_and_ends_the_episode():
    env = PlanarArmReachEnv()
    scene = Scene(q0=(0.0, 0.0), target=(-0.3, -0.9), obstacle_center=(0.95, 0.3), obstacle_radius=0.1)
    _, info0 = env.reset(options={"scene": scene})
    assert info0["clearance"] == pytest.approx(0.3 - 0.125, abs=1e-6) and not info0["collision"]
    steps = run_constant(env, [1.0, 0.0])
    reward, info, prev = steps[-1]
    assert len(steps) <= 4
    assert info["collision"] and not info["safe_success"]
    assert float(arm_clearance(env.data.qpos.copy(), scene.obstacle_center, 0.1, SPEC)) <= 0.0
    assert all(not i["collision"] and i["clearance"] > 0 for _, i, _ in steps[:-1])
    weights = env.get_reward_weights()
    assert reward == pytest.approx(expected_reward(weights, prev, info, np.array([1.0, 0.0])))
    with pytest.raises(RuntimeError):  # an ended episode must be reset, not stepped
        PlanarArmReachEnv().step(np.zeros(2, dtype=np.float32))


@pytest.mark.parametrize("phase", np.linspace(0.25, 0.45, 9))
def test_a_thin_obstacle_is_not_tunnelled_through_between_control_steps(phase):
    # At full speed the forearm sweeps 0.12 rad (0.13 m at this radius) per control step, more than
    # the 0.06 m contact band of this thin obstacle: only sub-step checks catch every phase.
    env = PlanarArmReachEnv()
    center = (1.1 * math.cos(phase), 1.1 * math.sin(phase))
    env.reset(options={"scene": Scene((0.0, 0.0), (-0.6, 0.6), center, 0.005)})
    steps = run_constant(env, [1.0, 0.0])
    assert steps[-1][1]["collision"]


def test_reaching_the_target_is_a_safe_success_with_its_bonus():
    env = PlanarArmReachEnv()
    target = (1.2 * math.cos(0.12), 1.2 * math.sin(0.12))  # 0.144 from the hand
    env.reset(options={"scene": Scene((0.0, 0.0), target, FAR, 0.1)})
    steps = run_constant(env, [1.0, 0.0])
    reward, info, prev = steps[-1]
    assert info["safe_success"] and info["is_success"] and not info["collision"]
    assert info["final_distance"] <= SPEC.success_radius
    weights = env.get_reward_weights()
    assert reward == pytest.approx(expected_reward(weights, prev, info, np.array([1.0, 0.0])))
    assert reward > env.get_reward_weights()["success_bonus"]


def test_touching_the_obstacle_at_the_target_is_not_a_safe_success():
    # The hand starts on the target; link 1 starts 1 mm from a small obstacle that the first
    # sub-step of a shoulder turn reaches: the collision is what counts.
    env = PlanarArmReachEnv()
    env.reset(options={"scene": Scene((0.0, 0.0), (1.2, 0.0), (0.3, 0.056), 0.03)})
    (_, info, _), = run_constant(env, [1.0, 0.0])
    assert info["collision"] and not info["safe_success"]
    assert info["final_distance"] <= SPEC.success_radius


def test_an_episode_is_truncated_at_max_steps():
    env = PlanarArmReachEnv()
    env.reset(options={"scene": Scene((0.0, 1.0), (-0.5, -0.5), FAR, 0.1)})
    steps = run_constant(env, [0.0, 0.0], max_steps=500)
    assert len(steps) == SPEC.max_steps
    assert not steps[-1][1]["collision"] and not steps[-1][1]["safe_success"]


def test_reward_weights_are_settable_and_take_effect():
    scene = Scene(q0=(0.0, 0.0), target=(-0.3, -0.9), obstacle_center=(0.95, 0.3), obstacle_radius=0.1)
    rewards = []
    for penalty in (5.0, 30.0):
        env = PlanarArmReachEnv(reward_weights={"collision_penalty": 5.0})
        env.set_reward_weight("collision_penalty", penalty)
        assert env.get_reward_weights()["collision_penalty"] == penalty
        env.reset(options={"scene": scene})
        rewards.append(run_constant(env, [1.0, 0.0])[-1][0])
    assert rewards[0] - rewards[1] == pytest.approx(25.0)
    env = PlanarArmReachEnv()
    with pytest.raises(KeyError, match="progress_scale"):
        env.set_reward_weight("speed_bonus", 1.0)
    with pytest.raises(ValueError, match="finite"):
        env.set_reward_weight("success_bonus", float("nan"))


# ---------------------------------------------------------------- determinism


def _episode(seed: int, actions: np.ndarray):
    env = PlanarArmReachEnv()
    obs, info = env.reset(seed=seed)
    trace = [obs]
    rewards = []
    for a in actions:
        obs, r, terminated, truncated, info = env.step(a)
        trace.append(obs)
        rewards.append(r)
        if terminated or truncated:
            break
    return env.scene, np.array(trace), np.array(rewards)


def test_same_seed_same_episode_other_seed_other_scene():
    actions = np.random.default_rng(1).uniform(-1, 1, size=(40, 2)).astype(np.float32)
    scene_a, obs_a, rew_a = _episode(11, actions)
    scene_b, obs_b, rew_b = _episode(11, actions)
    scene_c, _, _ = _episode(12, actions)
    assert scene_a == scene_b
    np.testing.assert_array_equal(obs_a, obs_b)
    np.testing.assert_array_equal(rew_a, rew_b)
    assert scene_c != scene_a


def test_env_passes_gymnasium_checker():
    from gymnasium.utils.env_checker import check_env

    check_env(PlanarArmReachEnv(), skip_render_check=True)


# ---------------------------------------------------------------- scenes


def test_classify_scene_thresholds():
    assert classify_scene(-0.001) is Difficulty.HARD
    assert classify_scene(0.0) is Difficulty.MEDIUM
    assert classify_scene(MEDIUM_CLEARANCE_BELOW - 1e-6) is Difficulty.MEDIUM
    assert classify_scene(MEDIUM_CLEARANCE_BELOW) is Difficulty.EASY


def test_direct_path_clearance_on_hand_placed_scenes():
    hand, target = (0.0, 0.0), (1.0, 0.0)
    assert direct_path_clearance(hand, target, (0.5, 0.05), 0.1) == pytest.approx(-0.05)
    assert direct_path_clearance(hand, target, (0.5, 0.2), 0.1) == pytest.approx(0.1)
    assert direct_path_clearance(hand, target, (1.3, 0.4), 0.1) == pytest.approx(0.4)  # past the end


@pytest.mark.parametrize("level", list(Difficulty))
def test_sampled_scenes_have_the_requested_difficulty_and_are_solvable(level):
    rng = np.random.default_rng(7)
    for _ in range(25):
        scene = sample_scene(rng, SPEC, level)
        q0 = np.array(scene.q0)
        _, hand = forward_kinematics(q0, SPEC)
        assert scene.difficulty is level
        direct = direct_path_clearance(hand, scene.target, scene.obstacle_center, scene.obstacle_radius)
        assert classify_scene(direct) is level
        assert float(arm_clearance(q0, scene.obstacle_center, scene.obstacle_radius, SPEC)) >= 0.05
        reach_of_link1 = SPEC.link_lengths[0] + SPEC.link_radius + scene.obstacle_radius
        assert np.linalg.norm(scene.obstacle_center) > reach_of_link1
        assert scene_is_solvable(scene, SPEC)


def test_unforced_sampling_mixes_the_three_difficulties():
    rng = np.random.default_rng(3)
    counts = Counter(sample_scene(rng, SPEC).difficulty for _ in range(150))
    assert all(30 <= counts[d] <= 70 for d in Difficulty), counts


def test_scene_is_solvable_rejects_impossible_scenes():
    base = dict(q0=(0.0, 0.0), obstacle_radius=0.1)
    assert not scene_is_solvable(Scene(target=(1.5, 0.0), obstacle_center=FAR, **base), SPEC)  # out of reach
    # target inside the obstacle; start pose touching it
    assert not scene_is_solvable(Scene(target=(0.0, 1.0), obstacle_center=(0.0, 1.02), **base), SPEC)
    assert not scene_is_solvable(Scene(target=(0.0, 1.0), obstacle_center=(0.9, 0.0), **base), SPEC)
    assert scene_is_solvable(Scene(target=(0.0, 1.0), obstacle_center=FAR, **base), SPEC)


# ---------------------------------------------------------------- evaluation


class StillPolicy:
    """A fake policy that never moves."""

    def predict(self, obs, deterministic=True):
        return np.zeros((len(obs), 2), dtype=np.float32), None


class ReachPolicy:
    """A scripted policy: the damped least-squares joint step toward the target, from the observation."""

    def predict(self, obs, deterministic=True):
        step = obs[:, 22:24] / (SPEC.max_joint_speed * SPEC.dt)
        if not deterministic:
            step = step + np.random.default_rng().normal(0, 0.3, step.shape)
        return np.clip(step, -1, 1).astype(np.float32), None


def test_evaluator_reports_every_cell_of_a_still_policy():
    from atm.training.workloads.manipulation.evaluate import Evaluator

    evaluator = Evaluator(episodes_per_difficulty=3)
    report = evaluator.evaluate(StillPolicy())
    evaluator.close()
    assert {(c.mode, c.difficulty) for c in report.cells} == {
        (m, d.value) for m in ("deterministic", "stochastic") for d in Difficulty
    }
    for cell in report.cells:
        assert cell.episodes == 3
        assert cell.safe_success == 0.0 and cell.collision_rate == 0.0
        assert cell.mean_length == SPEC.max_steps
    metrics = report.metrics()
    for key in ("safe_success", "collision_rate", "mean_reward", "final_distance", "mean_ep_length"):
        assert f"eval/{key}" in metrics and f"eval/stochastic/{key}" in metrics
    assert metrics["eval/robust_score"] == 0.0


def test_evaluator_is_repeatable_and_tells_difficulties_apart():
    from atm.training.workloads.manipulation.evaluate import Evaluator

    evaluator = Evaluator(episodes_per_difficulty=10, modes=("deterministic",))
    first = evaluator.evaluate(ReachPolicy())
    second = evaluator.evaluate(ReachPolicy())
    evaluator.close()
    assert first == second
    by_level = {c.difficulty: c for c in first.cells}
    # A straight reach succeeds in most easy scenes and runs into the obstacle in hard ones.
    assert by_level["easy"].safe_success >= 0.5
    assert by_level["hard"].collision_rate > by_level["easy"].collision_rate
    assert by_level["hard"].safe_success < by_level["easy"].safe_success


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", ["baseline", "cautious", "reckless"])
def test_recipes_map_onto_sb3_ppo(name):
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv

    from atm.training.sb3 import sb3_knobs
    from atm.training.workloads.manipulation.recipes import get_recipe

    recipe = get_recipe(name)
    venv = DummyVecEnv([lambda: PlanarArmReachEnv(reward_weights=recipe.reward_weights())])
    kwargs = {**recipe.ppo_kwargs(), "n_steps": 256}  # one env here instead of 16
    model = PPO("MlpPolicy", venv, device="cpu", **kwargs)
    knobs = {k: get() for k, (get, _) in sb3_knobs(model).items()}
    assert knobs["lr"] == recipe.learning_rate
    assert knobs["ent_coef"] == recipe.ent_coef
    assert knobs["clip_range"] == recipe.clip_range
    assert knobs["n_epochs"] == recipe.n_epochs
    assert knobs["target_kl"] == recipe.target_kl
    assert knobs["reward.collision_penalty"] == recipe.collision_penalty
    assert knobs["reward.success_bonus"] == recipe.success_bonus
    assert knobs["reward.progress_scale"] == recipe.progress_scale


def test_unknown_recipe_lists_the_known_ones():
    from atm.training.workloads.manipulation.recipes import get_recipe

    with pytest.raises(KeyError, match="baseline, cautious, reckless"):
        get_recipe("bold")


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_quick_run_logs_to_mlflow(tmp_path, monkeypatch):
    import mlflow

    from atm.training.workloads.manipulation.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "summary.json"
    argv = ["--quick", "--tracking", "mlflow", "--no-listen", "--experiment", "t", "--out", str(out)]
    assert main(argv) == 0
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["recipe"] == "baseline"
    keys = set(run.data.metrics)
    for key in (
        "eval/safe_success", "eval/collision_rate", "eval/mean_reward", "eval/final_distance",
        "eval/mean_ep_length", "train/entropy_loss", "train/approx_kl", "train/clip_fraction",
        "train/explained_variance", "train/std", "train/entropy", "rollout/safe_success",
    ):
        assert key in keys, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/safe_success")]
    assert steps == [8192, 16384, 24576]
    train_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/approx_kl")]
    assert train_steps and all(s % 2048 == 0 for s in train_steps)
    assert out.exists()
