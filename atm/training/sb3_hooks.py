"""Stable-Baselines3 glue: apply updates between rollouts, never mid-rollout.

``atm.listen(model)`` wraps the model's ``train()`` (the gradient phase that follows each
rollout), so pending updates take effect just before the next update, with the rollout that
was collected under the old values already in the buffer. The knobs themselves live in
:mod:`atm.training.sb3`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from atm.training.listener import Knob, Listener


def attach_sb3(model: Any) -> tuple[dict[str, Knob], Callable[[Listener], None], Callable[[], int]]:
    from atm.training.sb3 import sb3_knobs

    knobs = {name: Knob(get=g, set=s) for name, (g, s) in sb3_knobs(model).items()}

    def hook(listener: Listener) -> None:
        original = model.train
        if getattr(original, "_atm_wrapped", False):
            return

        def train(*args: Any, **kwargs: Any) -> Any:
            if listener.apply_mode == "auto":
                listener.apply_pending()
            return original(*args, **kwargs)

        train._atm_wrapped = True  # type: ignore[attr-defined]
        model.train = train

    return knobs, hook, lambda: int(model.num_timesteps)


def make_callback(listen: Callable[..., Listener], **kwargs: Any) -> Any:
    from stable_baselines3.common.callbacks import BaseCallback

    class ATMCallback(BaseCallback):
        """Attaches atm when learning starts; stops learning when the manager asks to."""

        def __init__(self) -> None:
            super().__init__()
            self.listener: Listener | None = None

        def _on_training_start(self) -> None:
            if self.listener is None:
                self.listener = listen(self.model, **kwargs)

        def _on_step(self) -> bool:
            return not (self.listener is not None and self.listener.stop_requested)

    return ATMCallback()
