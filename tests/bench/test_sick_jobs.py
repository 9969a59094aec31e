"""benchmarks/sick_jobs.py end to end on a short run: the user's digits script in a configuration whose lr
is too high, alone, under ReduceLROnPlateau and under atm-watch (the CLI), each in its own MLflow store,
with early stopping replayed on the alone run's curve."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench._load import benchmark

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
JOB = BENCH / "jobs" / "digits_job.py"


def _load():
    return benchmark("sick_jobs")


def test_the_job_refuses_two_schedulers_and_says_which(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(JOB), "--tracking-uri", f"sqlite:///{tmp_path / 'x.db'}",
                          "--plateau", "--warmup-epochs", "5"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--plateau and --warmup-epochs" in out.stderr
    assert not (tmp_path / "x.db").exists()  # refused before any run was started


@pytest.mark.slow
def test_a_trio_runs_and_the_baselines_are_what_they_say(tmp_path: Path) -> None:
    bench = _load()
    r = bench.trio(tmp_path, "lr-too-high-adam", seed=0, epochs=30, interval=0.5)
    for key in ("alone", "managed", "plateau", "early_stop"):
        assert math.isfinite(r[key]), key
    # Early stopping restores the best weights it saw: never above the alone run's final, never below its best.
    assert r["best_alone"] <= r["early_stop"] <= r["alone"]
    assert r["ratio_usual"] == pytest.approx(r["managed"] / min(r["plateau"], r["early_stop"]))
    # ReduceLROnPlateau changed the job (this configuration is at its best by epoch 15, then climbs).
    assert r["plateau"] != r["alone"]
    applied = [d for d in r["decisions"] if d["status"] == "applied"]
    assert (r["managed"] == r["alone"]) == (not applied)
