"""Tracker backends and LLM providers: the only modules that import mlflow, wandb, openai or llama_cpp."""

from __future__ import annotations

import os
import sys
from typing import Any

from atm.adapters.base import Backend, BackendError, BackendUnavailable, Channel, RunNotFound, RunView
from atm.signing import SigningKey

__all__ = [
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "Channel",
    "RunNotFound",
    "RunView",
    "discover_channel",
    "make_backend",
]


def make_backend(name: str, **options: Any) -> Backend:
    """The daemon's backend by name (``mlflow`` or ``wandb``)."""
    if name == "mlflow":
        from atm.adapters.mlflow_backend import MlflowBackend

        return MlflowBackend(
            tracking_uri=options.get("tracking_uri"), existing=bool(options.get("existing")), key=options.get("key")
        )
    if name == "wandb":
        from atm.adapters import wandb_backend  # type: ignore[attr-defined]

        return wandb_backend.WandbBackend(**options)
    raise ValueError(f"unknown backend {name!r}: choose mlflow or wandb")


def discover_channel(run_id: str | None = None, backend: str | None = None, key: SigningKey | None = None) -> Channel | None:
    """The listener's channel to the job's own run, or None when there is no run to attach to.

    MLflow: ``mlflow.active_run()`` or ``MLFLOW_RUN_ID`` (or ``run_id``). W&B: ``wandb.run``.
    Only a tracker the job already imported is consulted, so attaching costs no extra imports.
    ``key`` signs the channel's acks (default: resolved from the environment on first use).
    """
    if backend in (None, "wandb") and "wandb" in sys.modules:
        wandb = sys.modules["wandb"]
        if getattr(wandb, "run", None) is not None:
            try:
                from atm.adapters import wandb_backend  # type: ignore[attr-defined]
            except ImportError:
                pass
            else:
                return wandb_backend.WandbChannel.from_run(wandb.run, key=key)
    if backend in (None, "mlflow") and ("mlflow" in sys.modules or os.environ.get("MLFLOW_RUN_ID") or run_id):
        from atm.adapters.mlflow_backend import MlflowChannel

        if run_id:
            return MlflowChannel(run_id, key=key)
        return MlflowChannel.from_environment(key=key)
    return None
