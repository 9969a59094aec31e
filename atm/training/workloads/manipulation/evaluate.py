"""Held-out evaluation: the same fixed scenes every time, batched in one vector env.

Evaluation scenes come from seeds at :data:`EVAL_SEED_BASE` and above, test scenes from
:data:`TEST_SEED_BASE`; training envs are seeded with the run's seed plus the env index, far below
both, so training never draws these scenes. Each
evaluation runs ``episodes_per_difficulty`` scenes of each difficulty with the deterministic and the
stochastic policy. Returns are computed with the baseline reward weights, so they compare across
recipes and across reward-weight changes made during training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from stable_baselines3.common.vec_env import DummyVecEnv

from atm.training.workloads.manipulation.env import ArmSpec, Difficulty, PlanarArmReachEnv
from atm.training.workloads.manipulation.recipes import RECIPES

__all__ = ["CellResult", "EVAL_SEED_BASE", "EvalReport", "Evaluator", "TEST_SEED_BASE"]

EVAL_SEED_BASE = 1_000_000
#: A second held-out set, for reporting: its results stay out of the tracker, so a manager reading
#: the run never sees them (the release's "test set the manager never sees").
TEST_SEED_BASE = 2_000_000
MODES = ("deterministic", "stochastic")


class CellResult(BaseModel):
    """One (policy mode, scene difficulty) cell of an evaluation."""

    model_config = ConfigDict(frozen=True)

    mode: str
    difficulty: str
    episodes: int
    safe_success: float
    collision_rate: float
    final_distance: float
    mean_return: float
    mean_length: float


class EvalReport(BaseModel):
    """All cells of one evaluation, with the aggregates that get logged."""

    model_config = ConfigDict(frozen=True)

    cells: list[CellResult]

    def _pooled(self, mode: str) -> dict[str, float]:
        cells = [c for c in self.cells if c.mode == mode]
        n = sum(c.episodes for c in cells)

        def mean(attr: str) -> float:
            return sum(getattr(c, attr) * c.episodes for c in cells) / n

        return {
            "safe_success": mean("safe_success"),
            "collision_rate": mean("collision_rate"),
            "final_distance": mean("final_distance"),
            "mean_reward": mean("mean_return"),
            "mean_ep_length": mean("mean_length"),
        }

    @property
    def robust_score(self) -> float:
        """Worst safe-success cell minus worst collision cell (the release's rollback score)."""
        return min(c.safe_success for c in self.cells) - max(c.collision_rate for c in self.cells)

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat metrics: ``eval/<name>`` for the deterministic policy over all scenes (the headline),
        ``eval/stochastic/<name>``, per-cell ``eval/<mode>/<difficulty>/<name>``, and the
        ``eval/robust_score`` / ``eval/min_safe_success`` / ``eval/max_collision_rate`` across cells."""
        out = {f"{prefix}/{k}": v for k, v in self._pooled("deterministic").items()}
        out.update({f"{prefix}/stochastic/{k}": v for k, v in self._pooled("stochastic").items()})
        for c in self.cells:
            key = f"{prefix}/{c.mode}/{c.difficulty}"
            out[f"{key}/safe_success"] = c.safe_success
            out[f"{key}/collision_rate"] = c.collision_rate
            out[f"{key}/final_distance"] = c.final_distance
        out[f"{prefix}/robust_score"] = self.robust_score
        out[f"{prefix}/min_safe_success"] = min(c.safe_success for c in self.cells)
        out[f"{prefix}/max_collision_rate"] = max(c.collision_rate for c in self.cells)
        return out


class Evaluator:
    """Runs a policy on the held-out scenes. Build once per run; :meth:`evaluate` as often as needed."""

    def __init__(
        self,
        spec: ArmSpec | None = None,
        *,
        episodes_per_difficulty: int = 12,
        seed_base: int = EVAL_SEED_BASE,
        modes: Sequence[str] = MODES,
    ) -> None:
        if episodes_per_difficulty < 1:
            raise ValueError(f"episodes_per_difficulty must be at least 1, got {episodes_per_difficulty}")
        unknown = set(modes) - set(MODES)
        if unknown:
            raise ValueError(f"unknown evaluation modes {sorted(unknown)}; use {MODES}")
        spec = spec or ArmSpec()
        weights = RECIPES["baseline"].reward_weights()
        self.difficulties = [d.value for d in Difficulty for _ in range(episodes_per_difficulty)]
        self.seed_base = seed_base
        self.modes = tuple(modes)
        self.max_steps = spec.max_steps
        self.venv = DummyVecEnv(
            [lambda: PlanarArmReachEnv(spec, reward_weights=weights) for _ in self.difficulties]
        )

    def evaluate(self, model: Any) -> EvalReport:
        """Evaluate ``model`` (anything with SB3's ``predict(obs, deterministic=...)``)."""
        cells: list[CellResult] = []
        for mode in self.modes:
            cells.extend(self._run(model, deterministic=mode == "deterministic"))
        return EvalReport(cells=cells)

    def _run(self, model: Any, deterministic: bool) -> list[CellResult]:
        n = self.venv.num_envs
        self.venv.seed(self.seed_base)  # env i draws scene seed_base + i at the next reset
        self.venv.set_options([{"difficulty": d} for d in self.difficulties])
        returns = np.zeros(n)
        lengths = np.zeros(n, dtype=int)
        outcome: list[dict[str, Any] | None] = [None] * n
        # Stochastic actions come from torch's global RNG: fork it so that evaluating is repeatable
        # and leaves the training run's random stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed_base)
            obs = self.venv.reset()
            for _ in range(self.max_steps):
                actions, _ = model.predict(obs, deterministic=deterministic)
                obs, rewards, dones, infos = self.venv.step(actions)
                for i in range(n):
                    if outcome[i] is None:
                        returns[i] += rewards[i]
                        lengths[i] += 1
                        if dones[i]:
                            outcome[i] = infos[i]
                if all(o is not None for o in outcome):
                    break
        mode = "deterministic" if deterministic else "stochastic"
        cells = []
        for level in Difficulty:
            idx = [i for i, d in enumerate(self.difficulties) if d == level.value]
            done = [outcome[i] for i in idx]
            assert all(o is not None for o in done), "an evaluation episode outlived max_steps"
            cells.append(
                CellResult(
                    mode=mode,
                    difficulty=level.value,
                    episodes=len(idx),
                    safe_success=float(np.mean([o["safe_success"] for o in done])),  # type: ignore[index]
                    collision_rate=float(np.mean([o["collision"] for o in done])),  # type: ignore[index]
                    final_distance=float(np.mean([o["final_distance"] for o in done])),  # type: ignore[index]
                    mean_return=float(returns[idx].mean()),
                    mean_length=float(lengths[idx].mean()),
                )
            )
        return cells

    def close(self) -> None:
        self.venv.close()
