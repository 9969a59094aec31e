"""Named training situations with the diagnosis a sensible supervisor gives each.

Metric keys are the ones real jobs log and the presets look for (``train/loss`` and
``eval_loss`` as the Hugging Face Trainer names them; ``eval/safe_success`` and SB3's
``train/std`` for PPO), so a scenario also checks that the presets map them.

Supervised runs log the train loss every 10 steps and evaluate every 50 (20 evaluations);
PPO runs log train metrics once per 2048-step rollout and evaluate every 5 rollouts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from atm.policies import DecisionContext, Policy, load_policy
from atm.schema import Diagnosis, TelemetrySnapshot
from atm.testing._curves import Points, concat, decay, flat, make_history, ramp, valley
from atm.watcher.snapshot import build_snapshot, eval_steps

LM_EVERY = {"train/loss": 10, "eval_loss": 50, "loss/main": 10, "loss/aux": 10}
RL_EVERY = {
    "eval/safe_success": 10240,
    "eval/collision_rate": 10240,
    "train/entropy_loss": 2048,
    "train/std": 2048,
}
LM_PARAMS = {"lr": 1e-3, "weight_decay": 0.01, "dropout": 0.0, "loss_weight.aux": 1.0}
RL_PARAMS = {
    "lr": 3e-4,
    "ent_coef": 0.01,
    "clip_range": 0.2,
    "n_epochs": 6,
    "target_kl": 0.03,
    "reward.collision_penalty": 5.0,
    "reward.success_bonus": 5.0,
    "reward.progress_scale": 3.0,
}


@dataclass(frozen=True)
class Scenario:
    name: str
    #: Preset name (``lm`` or ``rl-ppo``).
    policy: str
    history: dict[str, Points]
    params: dict[str, float]
    expected: Diagnosis
    description: str = ""
    run_id: str = field(default="run-test")

    def load_policy(self) -> Policy:
        return load_policy(self.policy)

    def snapshot(self, policy: Policy | None = None) -> TelemetrySnapshot:
        policy = policy or self.load_policy()
        return build_snapshot(self.run_id, policy, self.history, self.params, now=0.0)

    def context(self, policy: Policy | None = None) -> DecisionContext:
        """The validator context at the last logged step, with no earlier decisions."""
        policy = policy or self.load_policy()
        step = max(pts[-1][0] for pts in self.history.values() if pts)
        return DecisionContext(step=step, params=dict(self.params), eval_steps=tuple(eval_steps(policy, self.history)))


def _gauss_entropy_loss(stds: list[float]) -> list[float]:
    # SB3 logs -entropy; a 2-D diagonal Gaussian has entropy sum(0.5 * log(2 pi e s^2)).
    return [-2 * 0.5 * math.log(2 * math.pi * math.e * s * s) for s in stds]


def _lm(curves: dict[str, list[float]]) -> dict[str, Points]:
    return make_history(curves, every=LM_EVERY)


def _rl(safe: list[float], collision: list[float], std: list[float]) -> dict[str, Points]:
    return make_history(
        {
            "eval/safe_success": safe,
            "eval/collision_rate": collision,
            "train/std": std,
            "train/entropy_loss": _gauss_entropy_loss(std),
        },
        every=RL_EVERY,
    )


def _overfitting() -> Scenario:
    return Scenario(
        "overfitting", "lm",
        _lm({
            "train/loss": decay(100, 4.0, 0.2, rate=4.0, noise=0.01, seed=1),
            "eval_loss": valley(20, 4.1, 1.5, 2.2, bottom_at=8, noise=0.005, seed=2),
        }),
        dict(LM_PARAMS), Diagnosis.OVERFITTING,
        "val loss bottomed at eval 8 and climbs while train loss keeps falling",
    )


def _healthy() -> Scenario:
    return Scenario(
        "healthy", "lm",
        _lm({
            "train/loss": decay(100, 4.0, 1.0, rate=2.5, noise=0.01, seed=3),
            "eval_loss": decay(20, 4.1, 1.2, rate=2.5, noise=0.003, seed=4),
        }),
        dict(LM_PARAMS), Diagnosis.HEALTHY,
        "both losses still falling, val a little above train",
    )


def _nan() -> Scenario:
    h = _healthy().history
    train = h["train/loss"][:-1] + [(h["train/loss"][-1][0], float("nan"))]
    return Scenario(
        "nan_loss", "lm", {**h, "train/loss": train}, dict(LM_PARAMS), Diagnosis.DIVERGENCE,
        "a healthy run whose latest train loss is NaN",
    )


def _loss_explodes() -> Scenario:
    return Scenario(
        "loss_explodes", "lm",
        _lm({
            "train/loss": concat(decay(80, 4.0, 0.8, rate=4.0, noise=0.01, seed=5), ramp(20, 1.0, 3.5)),
            "eval_loss": concat(decay(16, 4.1, 1.1, rate=4.0), ramp(4, 1.5, 3.6)),
        }),
        dict(LM_PARAMS), Diagnosis.DIVERGENCE,
        "train loss fell to 0.9 and shot back up to 3.5",
    )


def _plateau() -> Scenario:
    return Scenario(
        "plateau", "lm",
        _lm({
            "train/loss": concat(decay(40, 4.0, 2.0, rate=5.0), flat(60, 2.0, noise=0.002, seed=6)),
            "eval_loss": concat(decay(8, 4.1, 2.3, rate=5.0), flat(12, 2.3, noise=0.002, seed=7)),
        }),
        dict(LM_PARAMS), Diagnosis.PLATEAU,
        "both losses flat for the last 12 evaluations, lightly regularized",
    )


def _over_regularization() -> Scenario:
    return Scenario(
        "over_regularization", "lm",
        _lm({
            "train/loss": concat(decay(40, 4.0, 2.0, rate=5.0), flat(60, 2.0, noise=0.002, seed=8)),
            "eval_loss": concat(decay(8, 4.0, 2.01, rate=5.0), flat(12, 2.01, noise=0.002, seed=9)),
        }),
        {**LM_PARAMS, "weight_decay": 0.2, "dropout": 0.3}, Diagnosis.OVER_REGULARIZATION,
        "flat losses with train no lower than val under weight decay 0.2 and dropout 0.3",
    )


def _loss_imbalance() -> Scenario:
    healthy = _healthy().history
    comps = make_history(
        {"loss/main": decay(100, 1.5, 0.9, rate=2.0), "loss/aux": decay(100, 150.0, 90.0, rate=2.0)}, every=LM_EVERY
    )
    return Scenario(
        "loss_imbalance", "lm", {**healthy, **comps}, dict(LM_PARAMS), Diagnosis.LOSS_IMBALANCE,
        "an auxiliary loss term 100x the main one",
    )


def _lm_insufficient() -> Scenario:
    return Scenario(
        "lm_insufficient", "lm",
        _lm({"train/loss": decay(15, 4.0, 3.0), "eval_loss": decay(3, 4.1, 3.5)}),
        dict(LM_PARAMS), Diagnosis.INSUFFICIENT_DATA,
        "three evaluations so far",
    )


def _rl_converged() -> Scenario:
    safe = [0.1, 0.3, 0.5, 0.82, 0.85, 0.88, 0.9, 0.9, 0.92, 0.91, 0.93, 0.94]
    return Scenario(
        "rl_converged", "rl-ppo",
        _rl(safe, ramp(12, 0.3, 0.04), decay(60, 1.0, 0.8, rate=2.0)),
        dict(RL_PARAMS), Diagnosis.CONVERGED,
        "safe success above 0.85 for eight evaluations, collisions near zero",
    )


def _rl_unsafe() -> Scenario:
    return Scenario(
        "rl_unsafe", "rl-ppo",
        _rl(ramp(12, 0.0, 0.15, noise=0.05, seed=10), ramp(12, 0.6, 0.5, noise=0.02, seed=11), flat(60, 1.2)),
        {**RL_PARAMS, "lr": 3e-3, "ent_coef": 0.08, "reward.collision_penalty": 1.0}, Diagnosis.UNSAFE_EXPLORATION,
        "half the evaluation episodes end in a collision",
    )


def _rl_collapse() -> Scenario:
    return Scenario(
        "rl_exploration_collapse", "rl-ppo",
        _rl(concat(ramp(4, 0.0, 0.3), ramp(8, 0.29, 0.2)), flat(12, 0.1), decay(60, 1.0, 0.2, rate=4.0)),
        {**RL_PARAMS, "ent_coef": 0.0}, Diagnosis.EXPLORATION_COLLAPSE,
        "action std fell from 1.0 to about 0.2 while safe success slid from 0.3 to 0.2",
    )


def _rl_stalled() -> Scenario:
    return Scenario(
        "rl_stalled", "rl-ppo",
        _rl(flat(12, 0.05, noise=0.1, seed=12), flat(12, 0.1, noise=0.05, seed=13), flat(60, 1.0, noise=0.01, seed=14)),
        {**RL_PARAMS, "lr": 3e-5, "clip_range": 0.1, "n_epochs": 3}, Diagnosis.PLATEAU,
        "a cautious recipe: safe success stuck near 0.05 for twelve evaluations",
    )


def _rl_healthy() -> Scenario:
    return Scenario(
        "rl_healthy", "rl-ppo",
        _rl(ramp(12, 0.05, 0.6), ramp(12, 0.25, 0.1), decay(60, 1.0, 0.85, rate=1.0)),
        dict(RL_PARAMS), Diagnosis.HEALTHY,
        "safe success climbing steadily, collisions falling",
    )


def _rl_insufficient() -> Scenario:
    return Scenario(
        "rl_insufficient", "rl-ppo",
        _rl([0.05], [0.3], flat(10, 1.0)),
        dict(RL_PARAMS), Diagnosis.INSUFFICIENT_DATA,
        "one evaluation so far: no trend yet",
    )


_BUILDERS: tuple[Callable[[], Scenario], ...] = (
    _overfitting,
    _healthy,
    _nan,
    _loss_explodes,
    _plateau,
    _over_regularization,
    _loss_imbalance,
    _lm_insufficient,
    _rl_converged,
    _rl_unsafe,
    _rl_collapse,
    _rl_stalled,
    _rl_healthy,
    _rl_insufficient,
)

#: Scenario name -> builder. Built on demand so every caller gets its own copy.
SCENARIOS: dict[str, Callable[[], Scenario]] = {b().name: b for b in _BUILDERS}


def scenario(name: str) -> Scenario:
    """A fresh copy of the named scenario.

    Raises:
        KeyError: no scenario has that name; the message lists them.
    """
    try:
        return SCENARIOS[name]()
    except KeyError:
        raise KeyError(f"no scenario {name!r}; known: {', '.join(SCENARIOS)}") from None
