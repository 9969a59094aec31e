"""How the daemon's status lines name a run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from atm.watcher.status import short_id


@pytest.mark.parametrize(
    ("run", "shown"),
    [
        ("wandb/offline-run-20260101_120000-abc123", "abc123"),
        ("/tmp/wandb/run-20260101_120000-a-b/", "a-b"),  # W&B ids may hold dashes
        ("entity/project/abc123", "abc123"),
        ("0123456789abcdef0123456789abcdef", "0123456789ab"),  # an MLflow run id
    ],
)
def test_a_run_is_shown_by_its_id(run: str, shown: str) -> None:
    assert short_id(run) == shown


def test_naming_a_run_does_not_import_wandb() -> None:
    # An MLflow-only daemon should not pay for (or need) wandb.
    code = "import sys, atm.watcher.status; print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
