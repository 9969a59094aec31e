"""Stable-Baselines3 hooks for the listener: the knobs of a model (PPO, A2C, SAC, ...) and where to apply them.

Every knob here is read by SB3 at the start of ``train()``, so a change made at
:data:`APPLY_HOOK` (``BaseCallback._on_rollout_end``: the rollout is complete and the update has not
started) takes effect in the very next update and never splits a rollout. Rules each setter keeps:

- ``lr`` sets ``model.learning_rate`` and ``model.lr_schedule`` (a constant schedule) and the
  optimizer's param groups: SB3 rewrites the optimizer's LR from ``lr_schedule`` at every update,
  so writing the optimizer alone is silently undone.
- ``clip_range`` stays a schedule (PPO calls it with the progress remaining).
- ``ent_coef``, ``n_epochs`` and ``target_kl`` are plain attributes (SAC with a fixed ``ent_coef``
  reads a tensor, which is set too); an algorithm gets the knobs it has.
- ``reward.<name>`` is set in every sub-env through ``VecEnv.env_method`` (works for
  ``DummyVecEnv`` and ``SubprocVecEnv``); its getter reads env 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

__all__ = ["APPLY_HOOK", "Knob", "constant_schedule", "sb3_knobs"]

Getter = Callable[[], Any]
Setter = Callable[[float], None]
Knob = tuple[Getter, Setter]

APPLY_HOOK = "_on_rollout_end"
"""The ``BaseCallback`` hook at which queued updates must be applied: between rollouts, before the
update that follows, never mid-rollout."""


def constant_schedule(value: float) -> Callable[[float], float]:
    """A constant SB3 schedule, built with the installed SB3's own helper (picklable for ``save``)."""
    try:  # SB3 >= 2.6
        from stable_baselines3.common.utils import ConstantSchedule, FloatSchedule

        return FloatSchedule(ConstantSchedule(float(value)))
    except ImportError:  # older SB3
        from stable_baselines3.common.utils import get_schedule_fn

        return get_schedule_fn(float(value))


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _optimizers(model: BaseAlgorithm) -> list[Any]:
    """Every optimizer SB3's ``_update_learning_rate`` drives: the policy's, or an actor's and critic's."""
    owners = [model.policy, getattr(model.policy, "actor", None), getattr(model.policy, "critic", None)]
    return [o.optimizer for o in owners if o is not None and getattr(o, "optimizer", None) is not None]


def _algorithm_knobs(model: BaseAlgorithm) -> dict[str, Knob]:
    """The knobs this algorithm has: ``lr`` always; ``ent_coef`` when it is a number (PPO, A2C, SAC
    with a fixed coefficient; SAC's ``"auto"`` learns it); ``clip_range``, ``n_epochs``, ``target_kl``
    where they exist (PPO)."""

    def progress() -> float:
        return float(model._current_progress_remaining)

    def get_lr() -> float:
        return float(model.lr_schedule(progress()))

    def set_lr(value: float) -> None:
        value = _finite("lr", value)
        if value <= 0:
            raise ValueError(f"lr must be positive, got {value}")
        model.learning_rate = value
        model.lr_schedule = constant_schedule(value)
        # Also write the optimizers now, so that anything reading them before the next update agrees.
        for opt in _optimizers(model):
            for group in opt.param_groups:
                group["lr"] = value

    knobs: dict[str, Knob] = {"lr": (get_lr, set_lr)}

    ent = getattr(model, "ent_coef", None)
    if isinstance(ent, (int, float)) and not isinstance(ent, bool):

        def set_ent(value: float) -> None:
            value = _finite("ent_coef", value)
            if value < 0:
                raise ValueError(f"ent_coef must not be negative, got {value}")
            model.ent_coef = value  # type: ignore[attr-defined]
            tensor = getattr(model, "ent_coef_tensor", None)  # SAC with a fixed coefficient reads this
            if tensor is not None:
                tensor.fill_(value)

        knobs["ent_coef"] = (lambda: float(model.ent_coef), set_ent)  # type: ignore[attr-defined]

    if callable(getattr(model, "clip_range", None)):

        def get_clip() -> float:
            return float(model.clip_range(progress()))  # type: ignore[attr-defined]

        def set_clip(value: float) -> None:
            value = _finite("clip_range", value)
            if value <= 0:
                raise ValueError(f"clip_range must be positive, got {value}")
            model.clip_range = constant_schedule(value)  # type: ignore[attr-defined]

        knobs["clip_range"] = (get_clip, set_clip)

    if isinstance(getattr(model, "n_epochs", None), int):

        def set_epochs(value: float) -> None:
            epochs = int(round(_finite("n_epochs", value)))
            if epochs < 1:
                raise ValueError(f"n_epochs must be at least 1, got {value}")
            model.n_epochs = epochs  # type: ignore[attr-defined]

        knobs["n_epochs"] = (lambda: int(model.n_epochs), set_epochs)  # type: ignore[attr-defined]

    if hasattr(model, "target_kl"):

        def get_target_kl() -> float | None:
            kl = model.target_kl  # type: ignore[attr-defined]
            return None if kl is None else float(kl)

        def set_target_kl(value: float) -> None:
            value = _finite("target_kl", value)
            if value <= 0:
                raise ValueError(f"target_kl must be positive, got {value}")
            model.target_kl = value  # type: ignore[attr-defined]

        knobs["target_kl"] = (get_target_kl, set_target_kl)
    return knobs


def _reward_knobs(model: BaseAlgorithm, getter_method: str, setter_method: str) -> dict[str, Knob]:
    venv = model.get_env()
    if venv is None:
        return {}
    # has_attr asks every sub-env without raising (a missing method inside a SubprocVecEnv worker
    # would otherwise end the worker); SB3 before 2.4 lacks it, so fall back to calling the method.
    if hasattr(venv, "has_attr"):
        if not (venv.has_attr(getter_method) and venv.has_attr(setter_method)):
            return {}
        weights = venv.env_method(getter_method, indices=[0])[0]
    else:
        try:
            weights = venv.env_method(getter_method, indices=[0])[0]
        except AttributeError:
            return {}

    def knob(name: str) -> Knob:
        def get() -> float:
            return float(venv.env_method(getter_method, indices=[0])[0][name])

        def set_(value: float) -> None:
            venv.env_method(setter_method, name, _finite(f"reward.{name}", value))

        return get, set_

    return {f"reward.{name}": knob(name) for name in weights}


def sb3_knobs(
    model: BaseAlgorithm,
    *,
    reward_getter: str = "get_reward_weights",
    reward_setter: str = "set_reward_weight",
) -> dict[str, Knob]:
    """The run-time knobs of an SB3 model, as ``{name: (getter, setter)}``.

    Args:
        model: any SB3 algorithm (PPO, A2C, SAC, TD3, DQN, ...) with its env attached.
        reward_getter: env method returning ``{weight name: value}``; when the env lacks it, no
            ``reward.*`` knobs are returned.
        reward_setter: env method ``(name, value)`` setting one weight.

    Returns:
        ``lr``; ``ent_coef``, ``clip_range``, ``n_epochs``, ``target_kl`` where the algorithm has
        them (see :func:`_algorithm_knobs`); ``reward.<name>`` per weight. Getters return the value
        SB3 will use next (``target_kl`` may be None: disabled). Setters raise ``ValueError`` on a
        non-finite or out-of-domain value. Apply them at :data:`APPLY_HOOK`.
    """
    return {**_algorithm_knobs(model), **_reward_knobs(model, reward_getter, reward_setter)}
