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
from atm.watcher.status import short_id, status_text


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
