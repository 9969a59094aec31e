"""The counterfactual generator on a real SB3 PPO run (CartPole-v1): one decision point, two seeds, a short
horizon; the line it writes, its labels' direction (a return: higher is better) and its scoring."""

from __future__ import annotations

from atm.bench.counterfactual import branch, generate
from atm.bench.counterfactual_rl import RLRecipe, cartpole_job
from atm.watcher.counterfactual import BASELINES, NOOP, Move, load_dataset, score_dataset
from atm.watcher.proposers import make_proposer


def _tiny(seed: int):
    return cartpole_job(lr=1e-3, n_envs=2, n_steps=64, batch_size=64, eval_episodes=4, seed=seed)


# 128 env steps an update, evaluated after each; the rl-ppo preset offers moves from the 20th evaluation.
RECIPE = RLRecipe("cartpole", "tiny-ppo", "healthy", _tiny, steps=22 * 128, eval_every=128, horizon=256,
                  points=(0.95,))


def test_the_generator_branches_a_ppo_run_on_the_rl_ppo_offer(tmp_path) -> None:
    out = tmp_path / "rl.jsonl.gz"
    lines = generate([(RECIPE, "train")], out, seeds=2)

    assert len(lines) == 1 and load_dataset(out) == lines
    ln = lines[0]
    assert ln.policy == "rl-ppo" and ln.higher_is_better and ln.seeds == 2
    # SB3's own metric names, at SB3's step (environment steps), and the held-out evaluation.
    assert {"rollout/ep_rew_mean", "train/entropy_loss", "train/approx_kl", "eval/mean_reward"} <= set(ln.history)
    assert ln.step == 21 * 128 and set(ln.params) == {"lr", "ent_coef", "clip_range", "n_epochs"}
    keys = {m.move.key for m in ln.moves}
    assert {NOOP, "stop", "rollback", "ent_coef=0.01", "clip_range=0.1", "n_epochs=8", "lr=0.0005"} <= keys
    # Stop keeps the return evaluated at the decision point, on every seed.
    assert ln.outcome("stop").outcomes == [ln.history["eval/mean_reward"][-1][1]] * 2
    # Labels read a return the right way round: the best moves have the largest mean.
    top = max(m.mean for m in ln.moves)
    assert all(ln.outcome(k).mean == top for k in ln.labels.best)
    assert set(ln.labels.best) <= set(ln.labels.acceptable)
    for m in ln.moves:
        noop = ln.outcome(NOOP).mean
        assert m.label != "helped" or m.mean > noop
        assert m.label != "hurt" or m.mean < noop

    for make in [lambda: make_proposer("rules"), *BASELINES.values()]:
        report = score_dataset(make(), lines)
        assert report.summary.n == 1 and report.summary.unmatched == 0


def test_a_ppo_branch_restarts_from_its_checkpoint() -> None:
    job, points, _ = RECIPE.run_main()
    first = branch(job, points[0], Move(), seed=5, horizon=256)
    branch(job, points[0], Move(changes={"lr": 3e-3, "n_epochs": 8}), seed=5, horizon=256)
    assert branch(job, points[0], Move(), seed=5, horizon=256) == first
    assert job.params()["lr"] == points[0].params["lr"]


def test_the_arm_job_logs_what_the_arm_workload_logs_and_branches_from_its_checkpoint() -> None:
    """The MuJoCo arm as a branchable job: the workload's metric names, the rl-ppo preset's offer (its
    reward weights among the knobs), a branch that restarts from its checkpoint, and a reward-weight
    move that changes training's reward and not the held-out evaluation's."""
    from atm.bench.counterfactual import candidate_moves
    from atm.bench.counterfactual_rl import ArmJob
    from atm.policies import load_policy

    recipe = RLRecipe("arm", "tiny-arm", "lr_too_high", lambda s: ArmJob("reckless", s, eval_episodes=1),
                      steps=4 * 2048, eval_every=2048, horizon=2048, points=(0.99,))
    job, points, worst = recipe.run_main()
    pt = points[0]
    assert worst == 0.0 and pt.step == 4 * 2048 and len(pt.history["eval/safe_success"]) == 4
    # The workload's names (atm-train manipulation), each after every update or evaluation.
    assert {"rollout/safe_success", "rollout/collision_rate", "train/entropy", "train/std", "eval/robust_score",
            "eval/stochastic/safe_success", "eval/deterministic/hard/safe_success"} <= set(pt.history)
    assert len(pt.history["rollout/safe_success"]) == 4 and not any(k.startswith("time/") for k in pt.history)
    assert pt.value == pt.history["eval/safe_success"][-1][1]
    keys = {m.key for m in candidate_moves(load_policy("rl-ppo"), pt, recipe.run)}
    assert {NOOP, "lr=0.0015", "reward.collision_penalty=25", "clip_range=0.1", "stop"} <= keys

    first = branch(job, pt, Move(), seed=3, horizon=2048)
    branch(job, pt, Move(changes={"lr": 1e-4, "reward.collision_penalty": 25.0}), seed=3, horizon=2048)
    assert job.params()["reward.collision_penalty"] == 25.0
    assert {w["collision_penalty"] for w in job.evaluator.venv.env_method("get_reward_weights")} == {5.0}
    assert branch(job, pt, Move(), seed=3, horizon=2048) == first
    assert job.params()["reward.collision_penalty"] == 1.0 and job.params()["lr"] == pt.params["lr"]
