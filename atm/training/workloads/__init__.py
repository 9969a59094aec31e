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
