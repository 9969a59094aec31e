"""Train SB3 PPO on the arm task with one recipe, evaluate on held-out scenes, log like a user would.

Logged with ``step=num_timesteps``: every evaluation's ``eval/*`` metrics (see
:meth:`EvalReport.metrics`), and after every update SB3's ``train/*`` statistics plus
``rollout/safe_success`` and ``rollout/collision_rate`` over the last 100 training episodes.
With ``test_episodes``, every evaluation also runs a second held-out set (``test/*``) that is
returned in :class:`TrainResult` and never logged, so a manager reading the run cannot see it.

The listener is attached only through :func:`atm.sb3_callback`. The workload gives it
two actions: ``rollback`` (restore the best evaluated policy and its optimizer state, done at the
next rollout start so the update in progress is not mixed with restored weights) and ``stop`` (end
training and keep the best evaluated policy, as early stopping with restore does; the final
evaluation is of that policy).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import HumanOutputFormat, KVWriter, Logger
from stable_baselines3.common.vec_env import DummyVecEnv

import atm
from atm.training.workloads.manipulation.env import ArmSpec, PlanarArmReachEnv
from atm.training.workloads.manipulation.evaluate import TEST_SEED_BASE, EvalReport, Evaluator
from atm.training.workloads.manipulation.recipes import Recipe, get_recipe
from atm.training.workloads.manipulation.tracking import Tracker, open_tracker

__all__ = [
    "DEFAULT_TIMESTEPS", "QUICK", "TrackerWriter", "TrainConfig", "TrainResult", "episode_stats", "make_model", "train",
]

# 300k steps: the baseline recipe learns the task by then (figures in this package's README.md),
# and 12 runs (fixed and managed, cautious and reckless, 3 seeds) fit in 90 minutes on 2 cores.
DEFAULT_TIMESTEPS = 300_000
DEFAULT_EVAL_EVERY = 20_480  # every 10 updates of 16 envs x 128 steps
# Start with action noise std 0.6 rather than SB3's 1.0: with std 1 the arm's random walk sweeps
# into the obstacle in about half of the episodes and the collision penalty drowns the reach signal.
POLICY_KWARGS: dict[str, Any] = {"log_std_init": -0.5}
QUICK = {"timesteps": 24_576, "eval_every": 8_192, "eval_episodes": 4}


class TrainConfig(BaseModel):
    recipe: str = "baseline"
    tracking: Literal["mlflow", "wandb", "none"] = "none"
    timesteps: int = Field(DEFAULT_TIMESTEPS, gt=0)
    seed: int = 40
    eval_every: int = Field(DEFAULT_EVAL_EVERY, gt=0)
    eval_episodes: int = Field(12, gt=0, description="held-out scenes per difficulty per evaluation")
    test_episodes: int = Field(
        0, ge=0, description="test scenes per difficulty, run at every evaluation and kept out of the tracker"
    )
    listen: bool = True
    experiment: str = "atm-manipulation"
    tracking_uri: str | None = None
    run_name: str | None = None
    torch_threads: int = Field(1, gt=0)
    verbose: bool = False


class EvalPoint(BaseModel):
    step: int
    metrics: dict[str, float]


class TrainResult(BaseModel):
    recipe: str
    seed: int
    timesteps: int
    wall_seconds: float
    evaluations: list[EvalPoint]
    final: dict[str, float]
    #: The test set at every evaluation (``test/*`` metrics), when ``test_episodes`` > 0.
    tests: list[EvalPoint] = Field(default_factory=list)
    rollbacks: int = 0
    stopped_early: bool = False
    run_id: str | None = None


class TrackerWriter(KVWriter):
    """Forwards SB3's logger records (train/*, rollout/*, time/fps) to the tracker."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
        metrics = {
            k: float(v)
            for k, v in key_values.items()
            if k.startswith(("train/", "rollout/", "time/fps")) and isinstance(v, (int, float, np.number))
        }
        if "train/entropy_loss" in metrics:  # SB3 logs the negated mean entropy
            metrics["train/entropy"] = -metrics["train/entropy_loss"]
        if metrics:
            self.tracker.log(metrics, step=step)

    def close(self) -> None:
        pass


class _WorkloadCallback(BaseCallback):
    """Evaluation, rollout statistics, and the workload's rollback and stop actions."""

    def __init__(
        self, evaluator: Evaluator, tracker: Tracker, eval_every: int, echo: bool = True,
        tester: Evaluator | None = None,
    ) -> None:
        super().__init__()
        self.evaluator = evaluator
        self.tester = tester
        self.tests: list[EvalPoint] = []
        self.tracker = tracker
        self.eval_every = eval_every
        self.echo = echo
        self.next_eval = eval_every
        self.evaluations: list[EvalPoint] = []
        self.best_score = -np.inf
        self.best_state: dict[str, Any] | None = None
        self.rollback_pending = False
        self.rollbacks = 0
        self.stop_requested = False
        self._last_eval_step = -1
        self._started = time.perf_counter()

    # -- actions offered to the listener

    def request_rollback(self) -> None:
        if self.best_state is None:
            raise RuntimeError("no evaluated policy to roll back to yet")
        self.rollback_pending = True

    def request_stop(self) -> None:
        self.stop_requested = True

    # -- SB3 hooks

    def _on_step(self) -> bool:
        return not self.stop_requested

    def _on_rollout_start(self) -> None:
        if self.rollback_pending and self.best_state is not None:
            self._restore_best()
            self.rollback_pending = False
            self.rollbacks += 1

    def _on_rollout_end(self) -> None:
        for key, value in episode_stats(self.model).items():
            self.logger.record(key, value)
        if self.num_timesteps >= self.next_eval:
            self.evaluate()
            while self.next_eval <= self.num_timesteps:
                self.next_eval += self.eval_every

    def _on_training_end(self) -> None:
        if self.stop_requested and self.best_state is not None:
            self._restore_best()
            self.evaluate()
        elif self._last_eval_step != self.num_timesteps:
            self.evaluate()

    def _restore_best(self) -> None:
        assert self.best_state is not None
        self.model.policy.load_state_dict(self.best_state["policy"])
        self.model.policy.optimizer.load_state_dict(self.best_state["optimizer"])

    def evaluate(self) -> EvalReport:
        report = self.evaluator.evaluate(self.model)
        metrics = report.metrics()
        step = int(self.num_timesteps)
        self.tracker.log(metrics, step=step)
        self.evaluations.append(EvalPoint(step=step, metrics=metrics))
        self._last_eval_step = step
        if report.robust_score > self.best_score:
            self.best_score = report.robust_score
            self.best_state = {
                "policy": copy.deepcopy(self.model.policy.state_dict()),
                "optimizer": copy.deepcopy(self.model.policy.optimizer.state_dict()),
            }
        test = ""
        if self.tester is not None:
            # After the best-state bookkeeping, and never logged: nothing of it reaches the run.
            tm = self.tester.evaluate(self.model).metrics(prefix="test")
            self.tests.append(EvalPoint(step=step, metrics=tm))
            test = f"  test safe {tm['test/safe_success']:.2f} collision {tm['test/collision_rate']:.2f}"
        if self.echo:
            print(
                f"step {step:>8d}  {time.perf_counter() - self._started:6.0f}s  "
                f"safe {metrics['eval/safe_success']:.2f} "
                f"(stoch {metrics['eval/stochastic/safe_success']:.2f})  "
                f"collision {metrics['eval/collision_rate']:.2f} "
                f"(stoch {metrics['eval/stochastic/collision_rate']:.2f})  "
                f"dist {metrics['eval/final_distance']:.3f}  return {metrics['eval/mean_reward']:.2f}  "
                f"robust {report.robust_score:+.2f}{test}",
                flush=True,
            )
        return report


def make_model(recipe: Recipe, spec: ArmSpec, seed: int) -> PPO:
    """The recipe's PPO model on its training envs (``recipe.n_envs`` arms with the recipe's reward weights)."""
    # DummyVecEnv: sub-process envs gain nothing on 2 cores; the env steps far faster than PPO trains.
    venv = make_vec_env(
        PlanarArmReachEnv,
        n_envs=recipe.n_envs,
        seed=seed,
        vec_env_cls=DummyVecEnv,
        env_kwargs={"spec": spec, "reward_weights": recipe.reward_weights()},
        monitor_kwargs={"info_keywords": ("safe_success", "collision")},
    )
    return PPO(
        "MlpPolicy", venv, seed=seed, device="cpu", verbose=0, policy_kwargs=POLICY_KWARGS, **recipe.ppo_kwargs(),
    )


def episode_stats(model: PPO) -> dict[str, float]:
    """``rollout/safe_success`` and ``rollout/collision_rate`` over SB3's buffer of recent training episodes
    (empty before the first episode ends)."""
    episodes = list(model.ep_info_buffer or [])
    if not episodes:
        return {}
    return {
        "rollout/safe_success": float(np.mean([e["safe_success"] for e in episodes])),
        "rollout/collision_rate": float(np.mean([e["collision"] for e in episodes])),
    }


def train(
    config: TrainConfig, spec: ArmSpec | None = None, on_start: Callable[[str | None], None] | None = None
) -> TrainResult:
    """Train one run.

    Args:
        config: the run's settings.
        spec: the arm and scene geometry (default :class:`ArmSpec`).
        on_start: called with the tracker's run id (None without a tracker) once the run has
            started, before the first step (``atm bench`` reads it to attach the daemon).

    Raises:
        KeyError: for an unknown recipe (the message lists the known ones).
    """
    recipe = get_recipe(config.recipe)
    spec = spec or ArmSpec()
    torch.set_num_threads(config.torch_threads)
    started = time.perf_counter()

    weights = recipe.reward_weights()
    model = make_model(recipe, spec, config.seed)
    venv = model.get_env()
    assert venv is not None

    params: dict[str, Any] = {
        "workload": "manipulation",
        "recipe": recipe.name,
        "seed": config.seed,
        "timesteps": config.timesteps,
        "eval_every": config.eval_every,
        "eval_episodes_per_difficulty": config.eval_episodes,
        **{f"ppo.{k}": v for k, v in recipe.ppo_kwargs().items()},
        **{f"reward.{k}": v for k, v in weights.items()},
        "n_envs": recipe.n_envs,
        "max_joint_speed": spec.max_joint_speed,
        "success_radius": spec.success_radius,
    }
    tracker = open_tracker(
        config.tracking,
        run_name=config.run_name or f"manipulation-{recipe.name}-s{config.seed}",
        params=params,
        tags={"workload": "manipulation", "recipe": recipe.name},
        experiment=config.experiment,
        tracking_uri=config.tracking_uri,
    )
    if on_start is not None:
        on_start(_run_id(tracker))
    outputs: list[KVWriter] = [TrackerWriter(tracker)]
    if config.verbose:
        outputs.append(HumanOutputFormat(sys.stdout))
    model.set_logger(Logger(folder=None, output_formats=outputs))

    evaluator = Evaluator(spec, episodes_per_difficulty=config.eval_episodes)
    tester = (
        Evaluator(spec, episodes_per_difficulty=config.test_episodes, seed_base=TEST_SEED_BASE)
        if config.test_episodes else None
    )
    workload_cb = _WorkloadCallback(evaluator, tracker, config.eval_every, tester=tester)
    callbacks: list[BaseCallback] = [workload_cb]
    if config.listen and config.tracking != "none":
        try:
            actions = {"rollback": workload_cb.request_rollback, "stop": workload_cb.request_stop}
            callbacks.append(atm.sb3_callback(actions=actions))
        except ImportError as exc:
            print(
                f"warning: {exc}; training with the fixed recipe (pass --no-listen to silence)",
                file=sys.stderr,
            )

    status = "FAILED"
    try:
        model.learn(total_timesteps=config.timesteps, callback=CallbackList(callbacks))
        status = "FINISHED"
    finally:
        tracker.finish(status)
        evaluator.close()
        if tester is not None:
            tester.close()
        venv.close()
    return TrainResult(
        recipe=recipe.name,
        seed=config.seed,
        timesteps=int(model.num_timesteps),
        wall_seconds=time.perf_counter() - started,
        evaluations=workload_cb.evaluations,
        final=workload_cb.evaluations[-1].metrics if workload_cb.evaluations else {},
        tests=workload_cb.tests,
        rollbacks=workload_cb.rollbacks,
        stopped_early=workload_cb.stop_requested,
        run_id=_run_id(tracker),
    )


def _run_id(tracker: Tracker) -> str | None:
    run = getattr(tracker, "run", None)
    return getattr(getattr(run, "info", None), "run_id", None) or getattr(run, "id", None)
