"""What atm-watch shows of its runs: how a run is named, and the one shape of its log lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from atm.watcher.report import RunStatus
from atm.watcher.status import short_id, status_table, status_text


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


# --------------------------------------------------------------------------- log lines


def _status(**fields: object) -> RunStatus:
    return RunStatus(**{"run_id": "0123456789abcdef0123456789abcdef", **fields})  # type: ignore[arg-type]


def test_a_status_reads_as_one_message() -> None:
    s = _status(name="brawny-crab-588", step=200, state="watching", diagnosis="overfitting", applied=0, decisions=1,
                pending="#1 awaiting approval", last="#1 @200 awaiting-approval overfitting lr 0.002->0.001")
    assert status_text(s) == ("brawny-crab-588, step 200, watching, overfitting, interventions 0 applied / 1, "
                              "pending #1 awaiting approval, last #1 @200 awaiting-approval overfitting lr 0.002->0.001")
    # A W&B run whose name is its id is not named twice; a decision in flight is the table's, not the log's.
    assert status_text(RunStatus(run_id="entity/proj/abc123", name="abc123", step=5, state="deciding",
                                 pending="deciding on step 5")) == "step 5, deciding, interventions 0 applied / 0"
    assert status_text(_status(state="waiting", pending="the run is not started yet")) == \
        "waiting, the run is not started yet"


#: ``14:25:23 INFO atm.watch: ...``: the shape of every line atm-watch writes without its live table.
LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S")


def test_every_line_atm_watch_writes_without_the_table_has_one_shape(mlflow_uri: str, tmp_path: Path) -> None:
    # A run that overfits, held for approval: status changes, a decision, a warning saying how to approve it,
    # and MLflow's own lines, all in the one file a service manager or `> watch.log 2>&1` collects.
    from _runs import overfitting_run

    rid = overfitting_run(mlflow_uri, experiment="log-lines")
    log = tmp_path / "watch.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "atm.watcher.cli", "watch", "--backend", "mlflow", "--run", rid, "--tracking-uri",
             mlflow_uri, "--interval", "0.2", "--approve", "--no-table"],
            stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        try:
            deadline = time.time() + 120
            while "pending #1 awaiting approval" not in log.read_text():
                assert proc.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.1)
        finally:
            proc.terminate()
            proc.wait(30)
    lines = log.read_text().splitlines()
    assert [line for line in lines if not LINE.match(line)] == []
    about_run = [line.split(": ", 1)[1] for line in lines if rid in line and "watching " + rid not in line]
    assert about_run and all(m.startswith(f"run {rid}: ") for m in about_run), about_run
    text = "\n".join(lines)
    assert f"INFO atm.watch: watching {rid} (mlflow" in text  # the banner
    assert f"WARNING atm.watch: run {rid}: decision #1 awaits approval" in text
    assert f"INFO atm.watch: run {rid}: " in text and ", step 200, watching, overfitting" in text  # status lines


# --------------------------------------------------------------------------- the live table


def _column_starts(statuses: list[RunStatus], width: int) -> list[int]:
    """Where the columns of one frame start on a console ``width`` wide (its borders' positions)."""
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(status_table(statuses))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    top = next(line for line in lines if line.startswith("┏"))
    starts = [i for i, ch in enumerate(top) if ch == "┳"]
    for row in (line for line in lines if line.startswith("│")):  # every row keeps to the header's columns
        assert [i for i, ch in enumerate(row) if ch == "│"][1:-1] == starts, row
    return starts


def test_the_live_tables_columns_start_at_the_same_place_in_every_frame() -> None:
    first = [_status(state="starting")]
    later = [
        _status(name="brawny-crab-588", step=123456, state="watching", diagnosis="overfitting", applied=3, decisions=4,
                pending="#5 waiting for the job", problems=2,
                last="#4 @1200 applied overfitting dropout 0->0.1, lr 0.002->0.001 — within policy: dropout 0 -> 0.1"),
        RunStatus(run_id="wandb/offline-run-20260101_120000-abc123", state="unreachable", error="connection refused " * 5,
                  note="unmapped: val_loss (policy file: extends: lm, metrics: {val_loss: [dev/xent]})"),
    ]
    for width in (200, 160, 120, 100, 80):
        assert _column_starts(first, width) == _column_starts(later, width) == _column_starts([], width), width
