"""Logging a job's own metric rows to its active tracker run(s), for :func:`atm.log_metrics`.

Here because only ``atm.adapters`` imports trackers. Like the listener's channel discovery, only a
tracker the job already imported is consulted: logging costs no extra imports.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping


def log_to_active_runs(values: Mapping[str, float], step: int | None) -> list[str]:
    """Log ``values`` to ``mlflow.active_run()`` and to ``wandb.run``, whichever exist.

    Returns the trackers with an active run (``["mlflow"]``, ``["wandb"]``, both, or none), also when
    ``values`` is empty and nothing was written. Errors from a tracker propagate: this runs in the
    job's own thread, as its own ``mlflow.log_metrics`` would.
    """
    active: list[str] = []
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:
        active.append("mlflow")
        if values:
            mlflow.log_metrics(dict(values), step=step)
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is not None:
        active.append("wandb")
        if values:
            # W&B numbers its rows itself without a step; a given step must not go back on that run.
            run.log(dict(values), step=step) if step is not None else run.log(dict(values))
    return active
