"""The authors' three PPO recipes (baseline, cautious, reckless) mapped onto Stable-Baselines3 PPO."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["RECIPES", "Recipe", "get_recipe"]


class Recipe(BaseModel):
    """One PPO recipe. SB3 has a single optimizer, so ``learning_rate`` is the release's actor LR;
    ``critic_learning_rate`` is kept for the record and not applied."""

    model_config = ConfigDict(frozen=True)

    name: str
    learning_rate: float
    critic_learning_rate: float
    ent_coef: float
    clip_range: float
    n_epochs: int
    target_kl: float
    collision_penalty: float
    success_bonus: float
    progress_scale: float
    n_envs: int = 16
    n_steps: int = 128
    batch_size: int = 256
    gamma: float = 0.99
    gae_lambda: float = 0.95
    max_grad_norm: float = 0.5

    def ppo_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``stable_baselines3.PPO`` (besides policy, env and seed)."""
        return {
            "learning_rate": self.learning_rate,
            "n_steps": self.n_steps,
            "batch_size": self.batch_size,
            "n_epochs": self.n_epochs,
            "gamma": self.gamma,
            "gae_lambda": self.gae_lambda,
            "clip_range": self.clip_range,
            "ent_coef": self.ent_coef,
            "max_grad_norm": self.max_grad_norm,
            "target_kl": self.target_kl,
        }

    def reward_weights(self) -> dict[str, float]:
        return {
            "progress_scale": self.progress_scale,
            "success_bonus": self.success_bonus,
            "collision_penalty": self.collision_penalty,
        }


RECIPES: dict[str, Recipe] = {
    "baseline": Recipe(
        name="baseline", learning_rate=3e-4, critic_learning_rate=1e-3, ent_coef=0.01, clip_range=0.2,
        n_epochs=6, target_kl=0.03, collision_penalty=5.0, success_bonus=5.0, progress_scale=3.0,
    ),
    "cautious": Recipe(
        name="cautious", learning_rate=3e-5, critic_learning_rate=1e-3, ent_coef=0.001, clip_range=0.1,
        n_epochs=3, target_kl=0.01, collision_penalty=25.0, success_bonus=2.5, progress_scale=1.5,
    ),
    "reckless": Recipe(
        name="reckless", learning_rate=3e-3, critic_learning_rate=3e-3, ent_coef=0.08, clip_range=0.3,
        n_epochs=8, target_kl=0.10, collision_penalty=1.0, success_bonus=10.0, progress_scale=5.0,
    ),
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None
