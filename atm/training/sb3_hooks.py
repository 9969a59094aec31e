"""Stable-Baselines3 glue: apply updates between rollouts, never mid-rollout.

``atm.listen(model)`` wraps the model's ``train()`` (the gradient phase that follows each
rollout), so pending updates take effect just before the next update, with the rollout that
was collected under the old values already in the buffer. The knobs themselves live in
:mod:`atm.training.sb3`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from atm.training.listener import Knob, Listener


#: The listener each model applies for: a later ``atm.listen`` on the same model (a second
#: ``learn()`` with a new callback) takes over from the first.
_LISTENERS: weakref.WeakKeyDictionary[Any, Listener] = weakref.WeakKeyDictionary()


def attach_sb3(model: Any) -> tuple[dict[str, Knob], Callable[[Listener], None], Callable[[], int]]:
    from atm.training.sb3 import sb3_knobs

    knobs = {name: Knob(get=g, set=s) for name, (g, s) in sb3_knobs(model).items()}

    def hook(listener: Listener) -> None:
        _LISTENERS[model] = listener
        if "train" in vars(model):
            return  # wrapped by an earlier listener; the wrapper reads the current one
        original = model.train

        def train(*args: Any, **kwargs: Any) -> Any:
            current = _LISTENERS.get(model)
            if current is not None and current.apply_mode == "auto":
                current.apply_pending()
            return original(*args, **kwargs)

        model.train = train
        # SB3's save() pickles the model's attributes: the wrapper (which reaches the listener's
        # thread and locks) is not part of the model, so keep it and this override out of the file.
        excluded = model._excluded_save_params
        model._excluded_save_params = lambda: [*excluded(), "train", "_excluded_save_params"]

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

        def _on_training_end(self) -> None:
            # Flush acks and stop the listener's thread; a later learn() with this callback attaches anew.
            if self.listener is not None:
                self.listener.close()
                self.listener = None

    return ATMCallback()
