"""``atm bench tinystories --quick``: every arm as a real training process, the managed one under the
real daemon on a real MLflow store; then ``--resume`` reuses the finished runs."""

from __future__ import annotations

import argparse
import json

import pytest

from atm.schema import Status

ARMS = {"fixed", "plateau", "early-stop", "managed-rules"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quick_bench_manages_the_live_run_and_resumes(tmp_path, capsys):
    from atm.bench.tinystories import main
    from atm.bench.harness import run_records

    args = argparse.Namespace(seeds=1, proposers="rules", quick=True, out=tmp_path, interval=0.5, steps=None,
                              resume=False)
    assert main(args) == 0
    report = json.loads((tmp_path / "tinystories.json").read_text())
    assert set(report["arms"]) == ARMS and report["seeds"] == [40]
    for arm in ARMS:
        for key in ("final_val_loss", "best_val_loss", "interventions"):
            assert len(report["arms"][arm][key]) == 1, (arm, key)
        assert report["arms"][arm]["best_val_loss"][0] <= report["arms"][arm]["final_val_loss"][0] + 1e-9
    assert report["arms"]["fixed"]["interventions"] == [0]
    # Early stopping with restore ends at a point of the fixed run's curve, so never below its best.
    es, fixed = report["arms"]["early-stop"], report["arms"]["fixed"]
    assert es["final_val_loss"][0] >= fixed["best_val_loss"][0]
    assert es["final_val_loss"][0] in [v for _, v in fixed["per_seed"]["40"]["val_curve"]]
    assert set(report["ratios"]) == {"managed-rules"}
    assert (tmp_path / "tinystories.md").read_text().startswith("# atm bench tinystories")
    assert (tmp_path / "tinystories.png").stat().st_size > 0

    # The manager acted on the live run: applied by the job, in the run's audit log.
    seed = report["arms"]["managed-rules"]["per_seed"]["40"]
    records = run_records(f"sqlite:///{tmp_path / 'mlflow.db'}", seed["run_id"])
    applied = [r for r in records if r.status == Status.APPLIED]
    assert applied, [r.summary() for r in records]
    assert seed["interventions"] == len(applied) and report["arms"]["managed-rules"]["interventions"] == [len(applied)]
    assert all(r.applied_step is not None and r.applied_step >= r.step for r in applied)
    assert seed["decisions"]["applied"] == len(applied) and sum(seed["decisions"].values()) == len(records)
    (line,) = [ln for ln in (tmp_path / "tinystories.md").read_text().splitlines() if ln.startswith("- managed-rules")]
    assert f"{len(applied)} applied" in line.split("decisions:")[1]

    # --resume: nothing is trained again, and the figures are the same.
    capsys.readouterr()
    assert main(argparse.Namespace(**{**vars(args), "resume": True})) == 0
    assert capsys.readouterr().out.count("reused from") == 3
    again = json.loads((tmp_path / "tinystories.json").read_text())
    assert again["arms"] == report["arms"]
    assert sorted(again["config"]["reused_runs"]) == ["fixed-seed40", "managed-rules-seed40", "plateau-seed40"]
