"""Counterfactual branches of reinforcement learning runs: Stable-Baselines3 PPO on a gymnasium task, branched
at decision points like the supervised jobs of :mod:`atm.bench.counterfactual`.

:class:`PPOJob` gives an SB3 PPO model the interface the branch loop uses (knobs, train, evaluate,
checkpoints). Its knobs are the in-job listener's own setters (:func:`atm.training.sb3.sb3_knobs`), so a
move changes the model as a live change would. The history holds what SB3's logger writes, under SB3's
names (``rollout/ep_rew_mean``, ``train/entropy_loss``, ``train/approx_kl``, ...), at SB3's step (the
environment steps), plus a held-out evaluation (``eval/mean_reward``, ``eval/mean_ep_length`` as SB3's
``EvalCallback`` names them): the deterministic policy on fixed episode seeds no training env uses.

A branch's seed seeds the training envs' episodes and the policy's action sampling (the RL counterpart
of the data order); every branch starts new episodes from the checkpoint's policy, value function and
optimizer state. The outcome is the held-out mean return at the horizon (higher is better); ``stop``
keeps the return evaluated at the decision point.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from atm.bench.counterfactual import Point

if TYPE_CHECKING:
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecEnv

#: Episode seeds of the held-out evaluation: far from the training envs' (a branch's seed + env index).
EVAL_SEED = 1_000_000


def _history_output() -> Any:
    """An SB3 logger output that appends every numeric row to a history (key -> [(step, value)])."""
    from stable_baselines3.common.logger import KVWriter

    class HistoryOutput(KVWriter):
        def __init__(self) -> None:
            self.history: dict[str, list[tuple[int, float]]] = {}

        def write(self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0) -> None:
            for k, v in key_values.items():
                # time/* is the machine's speed, not the run's.
                if k.startswith("time/") or isinstance(v, bool) or not isinstance(v, numbers.Real):
                    continue
                self.history.setdefault(k, []).append((int(step), float(v)))

    return HistoryOutput()


class PPOJob:
    """An SB3 PPO model on a vectorised gymnasium env, with the knobs the SB3 listener exposes.

    Args:
        model: the PPO model, its training env attached.
        eval_env: a separate vectorised env for the held-out evaluation.
        eval_episodes: episodes per evaluation.
    """

    def __init__(self, model: PPO, eval_env: VecEnv, eval_episodes: int = 16) -> None:
        from stable_baselines3.common.logger import Logger

        from atm.training.sb3 import sb3_knobs

        self.model = model
        self.eval_env = eval_env
        self.eval_episodes = eval_episodes
        #: Whether evaluations go to the history; a job that logs none keeps them to itself (its best
        #: checkpoint, the outcome of a branch).
        self.log_eval = True
        self.output = _history_output()
        model.set_logger(Logger(None, [self.output]))  # type: ignore[list-item]
        self.knobs = sb3_knobs(model)
        #: An SB3 callback for :meth:`train` (what the job logs besides SB3's rows).
        self.callback: Any = None

    @property
    def step(self) -> int:
        return int(self.model.num_timesteps)

    @property
    def history(self) -> dict[str, list[tuple[int, float]]]:
        return self.output.history

    def params(self) -> dict[str, float]:
        """The knobs in force (a disabled ``target_kl`` is not one)."""
        out = {}
        for name, (get, _) in self.knobs.items():
            v = get()
            if v is not None:
                out[name] = float(v)
        return out

    def apply(self, changes: dict[str, float]) -> None:
        for name, value in changes.items():
            if name not in self.knobs:
                raise ValueError(f"job has no knob {name!r}; knobs: {', '.join(self.knobs)}")
            self.knobs[name][1](value)

    def reseed(self, seed: int) -> None:
        """New episodes and action sampling from ``seed``: the training envs reset at the next ``train``."""
        self.model.set_random_seed(seed)
        self.model._last_obs = None  # type: ignore[assignment]  # SB3 resets the env when it is None
        self.model.ep_info_buffer = None

    def train(self, steps: int) -> dict[str, float]:
        """At least ``steps`` environment steps (whole rollouts); SB3's rows go to the history."""
        self.model.learn(steps, reset_num_timesteps=False, log_interval=1, callback=self.callback)
        return {}

    def evaluate(self) -> float:
        """Held-out mean return of the deterministic policy (the same episodes every time), logged as
        ``eval/mean_reward`` and ``eval/mean_ep_length`` at the current step."""
        from stable_baselines3.common.evaluation import evaluate_policy

        self.eval_env.seed(EVAL_SEED)
        # Forked so that evaluating leaves training's random stream where it was.
        with torch.random.fork_rng():
            returns, lengths = evaluate_policy(self.model, self.eval_env, n_eval_episodes=self.eval_episodes,
                                               deterministic=True, return_episode_rewards=True)
        mean = float(np.mean(returns))
        if self.log_eval:
            for key, v in (("eval/mean_reward", mean), ("eval/mean_ep_length", float(np.mean(lengths)))):
                self.history.setdefault(key, []).append((self.step, v))
        return mean if math.isfinite(mean) else -math.inf

    def state(self) -> dict[str, Any]:
        return {
            "policy": copy.deepcopy(self.model.policy.state_dict()),
            "optimizer": copy.deepcopy(self.model.policy.optimizer.state_dict()),
            "step": self.model.num_timesteps,
            "n_updates": self.model._n_updates,
            "knobs": self.params(),
        }

    def load(self, state: dict[str, Any], *, weights_only: bool = False) -> None:
        """Restore a checkpoint; ``weights_only`` restores policy and optimizer and keeps step and knobs."""
        knobs = self.params()
        self.model.policy.load_state_dict(state["policy"])
        self.model.policy.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if not weights_only:
            self.model.num_timesteps = state["step"]
            self.model._n_updates = state["n_updates"]
            knobs = state["knobs"]
        self.apply(knobs)
        # Rows branched from here start a new log; the main run's history was copied at each point.
        self.output.history = {}


@dataclass(frozen=True)
class RLRecipe:
    """One PPO run of a family: how it is built, how long it trains and where it is branched.

    ``build(seed)`` returns the job; ``steps``, ``eval_every`` and ``horizon`` are environment steps
    (each a whole number of rollouts).
    """

    family: str
    run: str
    #: What the recipe was built to show (``healthy``, ``stalled``, ...); not a label.
    condition: str
    build: Callable[[int], PPOJob]
    steps: int
    eval_every: int
    horizon: int
    seed: int = 0
    points: tuple[float, ...] = (0.3, 0.55, 0.8)
    policy: str = "rl-ppo"
    #: The outcome is a return: larger is better.
    higher_is_better: bool = True
    #: Whether the run logs its evaluations; without them a proposer sees SB3's rollout statistics alone.
    log_eval: bool = True
    #: The smallest difference the outcome can tell (a success rate over N episodes: 1/N); a mean return
    #: tells any.
    resolution: float = 0.0

    def run_main(self) -> tuple[PPOJob, list[Point], float]:
        return rl_main_run(self)


def rl_main_run(recipe: RLRecipe) -> tuple[PPOJob, list[Point], float]:
    """Train the recipe's run, evaluating every ``eval_every`` steps and keeping a checkpoint at each decision
    point and at the best evaluation so far; returns the job, the points and the worst outcome a branch
    can count as (the lowest held-out return seen, or 0)."""
    job = recipe.build(recipe.seed)
    job.log_eval = recipe.log_eval
    job.reseed(recipe.seed)
    evals = list(range(recipe.eval_every, recipe.steps + 1, recipe.eval_every))
    at = {next(i for i, e in enumerate(evals) if e >= f * recipe.steps) for f in recipe.points}
    points: list[Point] = []
    best_val, best_state, worst = -math.inf, job.state(), 0.0
    for i, e in enumerate(evals):
        job.train(e - job.step)
        val = job.evaluate()
        worst = min(worst, val) if math.isfinite(val) else worst
        if val > best_val:
            best_val, best_state = val, job.state()
        if i in at:
            points.append(Point(len(points), job.step, copy.deepcopy(job.history), job.params(), job.state(),
                                best_state, val))
    return job, points, worst


# --------------------------------------------------------------------------- PPO on CartPole-v1


def cartpole_job(*, lr: float, n_epochs: int = 4, clip_range: float = 0.2, ent_coef: float = 0.0,
                 batch_size: int = 128, target_kl: float | None = None, n_envs: int = 4, n_steps: int = 128,
                 eval_episodes: int = 16, seed: int = 0) -> PPOJob:
    """SB3 PPO on CartPole-v1: by default 4 envs x 128 steps a rollout (512 env steps an update), gamma
    0.98, GAE 0.8, a 64x64 MLP; constant lr and clip range, as a listener leaves them after a change."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed)
    eval_env = make_vec_env("CartPole-v1", n_envs=8, seed=EVAL_SEED)
    model = PPO("MlpPolicy", env, n_steps=n_steps, batch_size=batch_size, n_epochs=n_epochs, learning_rate=lr,
                clip_range=clip_range, ent_coef=ent_coef, target_kl=target_kl, gamma=0.98, gae_lambda=0.8,
                policy_kwargs={"net_arch": [64, 64]}, seed=seed, device="cpu", verbose=0)
    return PPOJob(model, eval_env, eval_episodes=eval_episodes)


def cartpole_recipes() -> list[RLRecipe]:
    """PPO on CartPole-v1, evaluated every 2 updates. The points come after the 20th logged point of the
    return: the ``rl-ppo`` preset counts a run's evaluations by its return when it logs no safe success,
    and only from the 20th on (see :func:`atm.watcher.snapshot.eval_steps`); before, it offers no move."""
    f = "cartpole"
    common = {"steps": 40_960, "eval_every": 1024, "horizon": 4096, "points": (0.55, 0.7, 0.85)}
    return [
        RLRecipe(f, "cartpole-healthy", "healthy", lambda s: cartpole_job(lr=3e-4, seed=s), **common),
        RLRecipe(f, "cartpole-stalled-low-lr", "stalled",
                 lambda s: cartpole_job(lr=2e-5, ent_coef=0.01, seed=s), **common),
        RLRecipe(f, "cartpole-lr-too-high", "lr_too_high",
                 lambda s: cartpole_job(lr=3e-3, n_epochs=8, clip_range=0.3, batch_size=32, target_kl=0.1,
                                        seed=s), **common),
        # No evaluation logged (SB3 without an EvalCallback writing to the tracker): the preset counts
        # rollout rows, 20 of them by 10k steps, so the points can come earlier.
        RLRecipe(f, "cartpole-rollout-only-lr-1e-3", "healthy",
                 lambda s: cartpole_job(lr=1e-3, seed=s), steps=40_960, eval_every=1024, horizon=4096,
                 points=(0.3, 0.55, 0.8), log_eval=False),
    ]


# --------------------------------------------------------------------------- PPO on the MuJoCo arm

#: Held-out scenes of each difficulty per evaluation: the workload's default.
ARM_EVAL_EPISODES = 12


class _History:
    """A tracker (:class:`atm.training.workloads.manipulation.tracking.Tracker`) that keeps what is logged
    in a history, without the machine's speed (``time/*``)."""

    def __init__(self) -> None:
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if not k.startswith("time/"):
                self.history.setdefault(k, []).append((int(step), float(v)))

    def finish(self, status: str = "FINISHED") -> None:
        pass


class ArmJob(PPOJob):
    """The arm workload (``atm-train manipulation``) as a branchable job: its recipe's PPO model and envs,
    logging what the workload logs (SB3's ``train/*`` and ``rollout/*`` rows, ``train/entropy``,
    ``rollout/safe_success`` and ``rollout/collision_rate`` after every update, and at each evaluation the
    ``eval/*`` metrics of its held-out scenes, both policy modes). Its evaluation metric, the outcome of a
    branch and what its best checkpoint is chosen by, is ``eval/safe_success``: the deterministic policy's
    safe success on those scenes, the ``rl-ppo`` preset's evaluation metric."""

    def __init__(self, recipe: str, seed: int, eval_episodes: int = ARM_EVAL_EPISODES) -> None:
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.logger import Logger

        from atm.training.workloads.manipulation.env import ArmSpec
        from atm.training.workloads.manipulation.evaluate import Evaluator
        from atm.training.workloads.manipulation.recipes import get_recipe
        from atm.training.workloads.manipulation.train import TrackerWriter, episode_stats, make_model

        spec = ArmSpec()
        super().__init__(make_model(get_recipe(recipe), spec, seed), eval_env=None)  # type: ignore[arg-type]
        self.evaluator = Evaluator(spec, episodes_per_difficulty=eval_episodes)
        self.output = _History()  # type: ignore[assignment]
        self.model.set_logger(Logger(None, [TrackerWriter(self.output)]))  # type: ignore[list-item]

        class EpisodeStats(BaseCallback):
            def _on_step(self) -> bool:
                return True

            def _on_rollout_end(self) -> None:
                for key, value in episode_stats(self.model).items():  # type: ignore[arg-type]
                    self.logger.record(key, value)

        self.callback = EpisodeStats()

    def evaluate(self) -> float:
        metrics = self.evaluator.evaluate(self.model).metrics()
        if self.log_eval:
            for k, v in metrics.items():
                self.history.setdefault(k, []).append((self.step, v))
        return metrics["eval/safe_success"]


def arm_recipes() -> list[RLRecipe]:
    """The arm workload's recipes, evaluated every 10 updates (its default cadence, 20,480 steps) on 12 scenes
    of each difficulty, branched for 8 updates (16,384 steps). Points at 35% and 70% of 204,800 steps: the
    4th and 7th evaluations."""
    from atm.training.workloads.manipulation.env import Difficulty

    f = "arm"
    # The outcome is a share of 36 scenes (12 of each difficulty): it moves by 1/36 at the least.
    scenes = ARM_EVAL_EPISODES * len(Difficulty)
    common: dict[str, Any] = {"steps": 204_800, "eval_every": 20_480, "horizon": 16_384, "points": (0.35, 0.7),
                              "seed": 40, "resolution": 1 / scenes}
    return [
        RLRecipe(f, "arm-reckless", "lr_too_high", lambda s: ArmJob("reckless", s), **common),
        RLRecipe(f, "arm-cautious", "stalled", lambda s: ArmJob("cautious", s), **common),
        RLRecipe(f, "arm-baseline", "healthy", lambda s: ArmJob("baseline", s), **common),
    ]
