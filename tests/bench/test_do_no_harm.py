"""benchmarks/do_no_harm.py end to end on a short run: the user's digits script alone and under
atm-watch (the CLI), each in its own MLflow store; and the premise its ratio rests on, that the job
alone is deterministic given its seed."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench._load import benchmark

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load():
    return benchmark("do_no_harm")


@pytest.mark.slow
def test_the_job_alone_is_deterministic_given_its_seed(tmp_path: Path) -> None:
    bench, finals = _load(), []
    for i in range(2):
        out = subprocess.run([sys.executable, str(BENCH / "jobs" / "digits_job.py"), "--tracking-uri",
                              f"sqlite:///{tmp_path / f'{i}.db'}", "--epochs", "4", "--epoch-sleep", "0", "--seed", "1"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        finals.append(bench._final(out.stdout))
    assert finals[0] == finals[1] and math.isfinite(finals[0])


@pytest.mark.slow
def test_a_pair_runs_alone_and_managed_and_reads_the_decisions(tmp_path: Path) -> None:
    bench = _load()
    r = bench.pair(tmp_path, "sgd-0.01", seed=0, epochs=20, interval=0.5, full=True)
    assert r["config"] == "sgd-0.01" and math.isfinite(r["alone"]) and math.isfinite(r["managed"])
    assert r["ratio"] == pytest.approx(r["managed"] / r["alone"])
    # The job, its two lines and atm-watch ran: whatever was decided came back from `atm history --json`,
    # and nothing was applied that the ratio does not reflect.
    assert isinstance(r["decisions"], list)
    applied = [d for d in r["decisions"] if d["status"] == "applied"]
    assert (r["managed"] == r["alone"]) == (not applied)
