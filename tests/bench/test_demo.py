"""atm demo: the bundled job twice on one seed, unmanaged and managed, compared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from atm.bench.demo import comparison


def _result(curve: list[tuple[int, float]], **kw: object) -> dict:
    return {"config": {"seed": 0, "early_stop_patience": 2, "early_stop_min_delta": 0.0}, "val_curve": curve,
            "final_val_loss": curve[-1][1], "best_val_loss": min(v for _, v in curve), "steps_done": curve[-1][0],
            "interventions": 0, "stopped_by_manager": False, **kw}


def test_the_comparison_sets_the_managed_run_against_early_stopping_of_the_unmanaged_one() -> None:
    fixed = _result([(10, 2.0), (20, 1.5), (30, 1.6), (40, 1.7), (50, 1.9)])
    managed = _result([(10, 2.0), (20, 1.5), (30, 1.4), (40, 1.3)], interventions=2, stopped_by_manager=True)
    text = " ".join(comparison({"unmanaged": fixed, "managed": managed}, 12.0).split())
    assert "unmanaged, early stopping 1.500 best of the unmanaged run (step 20), restored at step 40" in text
    assert "managed, final 1.300 after 40 steps, 2 interventions, stopped by the manager" in text
    assert "managed final / early stopping: 0.87x (below" in text


@pytest.mark.slow
def test_the_quick_demo_runs_both_jobs_and_draws_the_chart(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "atm.watcher.cli", "demo", "--quick", "--proposer", "rules", "--dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "unmanaged, early stopping" in out.stdout and "managed, final" in out.stdout
    assert "applied" in out.stdout  # the interventions table shows at least one applied decision
    assert (tmp_path / "d" / "demo.png").stat().st_size > 10_000
    assert not (tmp_path / "mlruns").exists(), "the demo keeps everything under its --dir"
