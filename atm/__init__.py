"""atm, the AI Training Manager: a bounded supervisor for live training runs.

In a training script::

    import atm
    atm.listen(optimizer)          # or atm.listen(sb3_model), or atm.listen(knobs={...})

then ``atm-watch --backend mlflow --run <run_id>`` next to it.
"""

from __future__ import annotations

from atm.training.api import (
    attr,
    attrs,
    dropout,
    hf_callback,
    lightning_callback,
    listen,
    log_metrics,
    sb3_callback,
)
from atm.training.listener import Knob, Listener
from atm.training.torch_hooks import keep_hyperparameters

__version__ = "0.1.0"
__all__ = [
    "Knob", "Listener", "attr", "attrs", "dropout", "hf_callback", "keep_hyperparameters", "lightning_callback",
    "listen", "log_metrics", "sb3_callback", "__version__",
]
