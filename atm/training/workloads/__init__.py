"""Reference workloads that reproduce the paper: user code that logs like users do."""

from __future__ import annotations

import os
from pathlib import Path

#: Where the workloads log when neither --tracking-uri nor MLFLOW_TRACKING_URI says (under the current folder).
DEFAULT_TRACKING_URI = "sqlite:///atm-demo/mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///atm-demo/mlflow.db`` (under the current folder).

    The folder of a relative sqlite path is created, since sqlite will not create it.
    """
    resolved = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if resolved.startswith("sqlite:///"):
        Path(resolved[len("sqlite:///"):]).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return resolved


def announce_run(run_id: str | None, tracking: str, tracking_uri: str | None, *, wandb_dir: str | None = None,
                 policy: str | None = None) -> None:
    """Print ``run id <id>`` and the atm-watch command that manages the run: one line a supervisor
    (``atm bench``, a shell script) reads to attach the daemon, and a user copies."""
    if not run_id:
        return
    if tracking == "mlflow":
        hint = f"atm-watch --backend mlflow --run {run_id} --tracking-uri {tracking_uri}"
    else:
        hint = f"atm-watch --backend wandb --run {run_id}" + (f" --wandb-dir {wandb_dir}" if wandb_dir else "")
    hint += f" --policy {policy}" if policy else ""
    print(f"run id {run_id}   (to manage it: {hint})", flush=True)
