"""Experiment tracking for the workload, written the way a user would: mlflow or wandb called directly."""

from __future__ import annotations

import os
from typing import Any, Protocol

__all__ = ["Tracker", "open_tracker"]


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class _NoTracker:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class _MlflowTracker:
    def __init__(
        self, run_name: str, params: dict[str, Any], tags: dict[str, str], experiment: str,
        tracking_uri: str | None = None,
    ) -> None:
        import mlflow

        self._mlflow = mlflow
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if not os.environ.get("MLFLOW_EXPERIMENT_NAME") and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
            mlflow.set_experiment(experiment)
        self.run = mlflow.start_run(run_name=run_name, tags=tags)
        mlflow.log_params(params)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(metrics, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        self._mlflow.end_run(status=status)


class _WandbTracker:
    def __init__(self, run_name: str, params: dict[str, Any], tags: dict[str, str], experiment: str) -> None:
        import wandb

        self._wandb = wandb
        # With no API key and no WANDB_MODE chosen, log offline rather than prompting for a login.
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", experiment),
            name=run_name,
            config=params,
            tags=[f"{k}={v}"[:64] for k, v in tags.items()],
            mode=mode,  # type: ignore[arg-type]
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, status: str = "FINISHED") -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def open_tracker(
    kind: str, *, run_name: str, params: dict[str, Any], tags: dict[str, str], experiment: str,
    tracking_uri: str | None = None,
) -> Tracker:
    """Start a run on ``kind`` (``mlflow``, ``wandb`` or ``none``) and log the run's parameters.

    ``tracking_uri`` (MLflow only) overrides ``MLFLOW_TRACKING_URI``.
    """
    if kind == "none":
        return _NoTracker()
    if kind == "mlflow":
        return _MlflowTracker(run_name, params, tags, experiment, tracking_uri)
    if kind == "wandb":
        return _WandbTracker(run_name, params, tags, experiment)
    raise ValueError(f"unknown tracking {kind!r}; choose mlflow, wandb or none")
