"""Hugging Face ``transformers.Trainer`` glue: attach the listener when training begins.

The Trainer makes its optimizer and LR scheduler inside ``train()`` and wraps them for
``accelerate``, so a script cannot pass them to :func:`atm.listen` beforehand. The callback
receives them at ``on_train_begin``, after the Trainer's own ``report_to`` callbacks have started
the MLflow or W&B run, and attaches to the optimizer inside the wrapper (the one whose ``step()``
really runs) with the scheduler, so an lr change scales the schedule instead of being undone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from atm.training.listener import Listener

log = logging.getLogger("atm.listener")


def no_decay_groups(groups: list[dict[str, Any]]) -> list[int]:
    """The param groups the Trainer keeps free of weight decay: at 0 and holding only biases and
    normalisation weights (tensors of one dimension), as ``Trainer.create_optimizer`` builds its second
    group. With the Trainer's default ``weight_decay=0`` both groups start at 0 and cannot be told apart
    by their values; a weight-decay change then reached the biases and LayerNorm weights too. Empty
    when every group looks so (nothing to tell apart). Pure."""
    free = [i for i, g in enumerate(groups)
            if float(g.get("weight_decay", 0.0)) == 0.0 and g["params"] and all(p.ndim <= 1 for p in g["params"])]
    return free if len(free) < len(groups) else []


def make_callback(listen: Callable[..., Listener], dropout: Callable[[Any], Any], **kwargs: Any) -> Any:
    from transformers import TrainerCallback

    class ATMTrainerCallback(TrainerCallback):  # type: ignore[misc]
        """Attaches atm when training begins; ends training when the manager asks to stop."""

        def __init__(self) -> None:
            self.listener: Listener | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.listener is not None:
                return
            from atm.training._dist import world

            opts = dict(kwargs)
            # Every process of a multi-GPU job attaches: they apply the main process's updates together.
            opts.setdefault("distributed", world()[1] > 1)
            knobs = dict(opts.pop("knobs", None) or {})
            step = opts.pop("step", None) or (lambda: int(state.global_step))
            model = kw.get("model")
            if "dropout" not in knobs and model is not None:
                try:
                    knobs["dropout"] = dropout(model)
                except ValueError:
                    log.info("atm: the model has no nn.Dropout modules; no dropout knob")
            optimizer = kw.get("optimizer")
            if "no_decay" not in opts and optimizer is not None:
                opts["no_decay"] = no_decay_groups(optimizer.param_groups)
            self.listener = listen(
                optimizer,
                scheduler=kw.get("lr_scheduler"),
                knobs=knobs,
                step=step,
                **opts,
            )

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.listener is not None and self.listener.stop_requested:
                control.should_training_stop = True

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.listener is not None:
                self.listener.close()

    return ATMTrainerCallback()
