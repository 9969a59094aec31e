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
    # The daemon's own log, every decision at INFO, beside the job's; the fixed arms have none.
    daemon_log = (tmp_path / "logs" / "managed-rules-seed40.daemon.log").read_text()
    assert f"run {seed['run_id']}" in daemon_log and " INFO atm.watch: " in daemon_log
    assert not (tmp_path / "logs" / "fixed-seed40.daemon.log").exists()
    (line,) = [ln for ln in (tmp_path / "tinystories.md").read_text().splitlines() if ln.startswith("- managed-rules")]
    assert f"{len(applied)} applied" in line.split("decisions:")[1]

    # --resume: nothing is trained again, and the figures are the same.
    capsys.readouterr()
    assert main(argparse.Namespace(**{**vars(args), "resume": True})) == 0
    assert capsys.readouterr().out.count("reused from") == 3
    again = json.loads((tmp_path / "tinystories.json").read_text())
    assert again["arms"] == report["arms"]
    assert sorted(again["config"]["reused_runs"]) == ["fixed-seed40", "managed-rules-seed40", "plateau-seed40"]


def test_stacked_remedies_counts_a_second_remedy_decided_before_the_first_ones_effect_was_known() -> None:
    from atm.bench.harness import stacked_remedies
    from atm.schema import Diagnosis
    from atm.testing import make_record

    evals = list(range(10, 201, 10))
    first = make_record(1, 50, changes={"lr": (1e-3, 5e-4)}, effective_step=51)
    early = make_record(2, 70, changes={"weight_decay": (0.0, 0.01)}, effective_step=71)   # 2 evals after #1: stacked
    late = make_record(3, 120, changes={"dropout": (0.0, 0.1)}, effective_step=121)        # 5 evals after #2: not
    other = make_record(4, 130, changes={"lr": (5e-4, 2.5e-4)}, diagnosis=Diagnosis.PLATEAU)  # first of its kind
    panic = make_record(5, 140, changes={"lr": (2.5e-4, 1e-4)}, diagnosis=Diagnosis.DIVERGENCE)  # speed wins: not counted
    revert = make_record(6, 150, changes={"weight_decay": (0.01, 0.0)}).model_copy(update={"reverts": 2})
    pending = make_record(7, 160, status=Status.PENDING, changes={"lr": (1e-4, 5e-5)})
    assert stacked_remedies([first, early, late, other, panic, revert, pending], evals) == (1, 2)
    assert stacked_remedies([first, early, late], evals, evals=1) == (0, 2)


def test_seeds_given_with_quick_are_kept_and_quick_alone_means_one() -> None:
    from atm.bench.harness import common_args, seed_count

    p = argparse.ArgumentParser()
    common_args(p, seeds=3)
    assert [seed_count(p.parse_args(a)) for a in ([], ["--quick"], ["--quick", "--seeds", "3"], ["--seeds", "2"])] == [3, 1, 3, 2]
