"""``atm bench manipulation``: the report's arithmetic (pure), and the whole pipeline on the real task."""

from __future__ import annotations

import argparse
import json

import pytest

from atm.schema import Action, Change, DecisionRecord, Diagnosis, Status
from atm.bench.manipulation import build_report, compare, markdown, summarize


def _run_json(safe: list[float], collision: float = 0.05, every: int = 20_480) -> dict:
    tests = []
    for i, s in enumerate(safe):
        m = {"test/safe_success": s, "test/collision_rate": collision, "test/stochastic/safe_success": s / 2,
             "test/stochastic/collision_rate": collision * 2, "test/robust_score": s - collision}
        tests.append({"step": (i + 1) * every, "metrics": m})
    evals = [{"step": t["step"], "metrics": {"eval/safe_success": 0.0, "eval/collision_rate": 0.0}} for t in tests]
    return {"timesteps": len(safe) * every, "tests": tests, "evaluations": evals, "rollbacks": 0,
            "stopped_early": False}


def _record(seq: int, status: Status, step: int, applied_step: int | None, **kw) -> DecisionRecord:
    return DecisionRecord(run_id="r", seq=seq, step=step, status=status, source="rules",
                          diagnosis=Diagnosis.PLATEAU, applied_step=applied_step, **kw)


def test_summarize_reads_the_test_set_and_counts_only_applied_decisions():
    records = [
        _record(1, Status.APPLIED, 61_440, 63_488, changes={"lr": Change(old=3e-5, new=1.5e-4)}),
        _record(2, Status.REJECTED, 81_920, None),
        _record(3, Status.APPLIED, 102_400, 104_448, action=Action.ROLLBACK),
    ]
    row = summarize(_run_json([0.0, 0.3, 0.85, 0.9, 0.7]), records)
    assert row["final_safe_success"] == 0.7
    assert row["best_safe_success"] == 0.9
    assert row["collision_rate"] == 0.05
    assert row["steps_to_0.8"] == 3 * 20_480  # the first evaluation at or above 0.8
    assert row["interventions"] == 2
    assert [a["applied_step"] for a in row["applied"]] == [63_488, 104_448]
    assert row["applied"][0]["changes"] == {"lr": [3e-5, 1.5e-4]}
    assert row["applied"][1]["action"] == "rollback"
    assert len(row["decisions"]) == 3


def test_summarize_never_reaching_is_null_and_no_test_set_is_an_error():
    assert summarize(_run_json([0.1, 0.2]), [])["steps_to_0.8"] is None
    with pytest.raises(ValueError, match="--test-episodes"):
        summarize({"timesteps": 1, "tests": [], "evaluations": []}, [])


def test_compare_uses_seeds_where_both_arms_reached():
    fixed = {"final_safe_success": [0.0, 0.2], "collision_rate": [0.1, 0.3], "steps_to_0.8": [200_000, None],
             "final_stochastic_safe_success": [0.2, 0.4], "final_stochastic_collision_rate": [0.5, 0.5],
             "steps": [300_000, 300_000]}
    managed = {"final_safe_success": [0.9, 0.8], "collision_rate": [0.05, 0.05], "steps_to_0.8": [100_000, 120_000],
               "final_stochastic_safe_success": [0.9, 0.9], "final_stochastic_collision_rate": [0.05, 0.05],
               "steps": [120_000, 180_000]}
    r = compare(fixed, managed)
    assert r["final_stochastic_safe_success_gain"] == pytest.approx(0.6)
    assert r["stochastic_collision_rate_ratio"] == pytest.approx(0.1)
    assert r["budget_used"] == pytest.approx(0.5)  # the manager stopped early
    assert r["final_safe_success_gain"] == pytest.approx(0.75)
    assert r["final_safe_success_ratio"] == pytest.approx(8.5)
    assert r["collision_rate_ratio"] == pytest.approx(0.25)
    assert r["steps_to_0.8_ratio"] == pytest.approx(0.5)
    assert r["seeds_reaching_0.8"] == {"fixed": 1, "managed": 2}
    none = compare({**fixed, "final_safe_success": [0.0, 0.0], "steps_to_0.8": [None, None]}, managed)
    assert none["final_safe_success_ratio"] is None and none["steps_to_0.8_ratio"] is None


def test_report_shape_and_markdown():
    seeds = [40, 41]
    per = {s: summarize(_run_json([0.1 * s / 40, 0.5, 0.9]), []) for s in seeds}
    results = {"cautious": {"fixed": per, "managed-rules": per}, "reckless": {"fixed": per, "managed-rules": per}}
    config = {"measured_on": "test scenes", "arms_not_run": {"managed-llm": "not requested"}}
    report = build_report(results, seeds, config=config, wall=1.0)
    for recipe in ("cautious", "reckless"):
        for arm in ("fixed", "managed-rules"):
            d = report[recipe][arm]
            for key in ("final_safe_success", "best_safe_success", "collision_rate", "steps_to_0.8"):
                assert len(d[key]) == len(seeds), key
        assert set(report["ratios"][recipe]) == {"managed-rules"}
    json.dumps(report)  # the report is plain JSON
    md = markdown(report)
    assert "| cautious | managed-rules | 0.90 ± 0.00 |" in md
    assert "Not run: managed-llm (not requested)" in md


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_bench_runs_fixed_and_managed_arms_through_the_real_daemon(tmp_path):
    """The cautious recipe stalls at 0 safe success, so the rules act within the quick budget.

    Checks that a decision was applied by the job between rollouts (its step a multiple of the
    rollout size) and is in the run's audit log, and the shape of the written report.
    """
    from atm.adapters.mlflow_backend import MlflowBackend
    from atm.bench.manipulation import main
    from atm.bench.harness import run_records

    args = argparse.Namespace(seeds=1, proposers="rules", arms=None, quick=True, out=tmp_path, interval=0.5,
                              timesteps=None, recipes="cautious", jobs=1, resume=False)
    assert main(args) == 0

    report = json.loads((tmp_path / "manipulation.json").read_text())
    assert set(report["cautious"]) == {"fixed", "managed-rules"}
    for arm in ("fixed", "managed-rules"):
        d = report["cautious"][arm]
        for key in ("final_safe_success", "best_safe_success", "collision_rate", "steps_to_0.8"):
            assert len(d[key]) == 1
        assert 0.0 <= d["final_safe_success"][0] <= 1.0
    assert report["cautious"]["fixed"]["interventions"] == [0]
    assert (tmp_path / "manipulation.md").read_text().startswith("# atm bench manipulation")
    assert (tmp_path / "manipulation.png").stat().st_size > 0

    run = report["cautious"]["managed-rules"]["per_seed"]["40"]
    backend = MlflowBackend(f"sqlite:///{tmp_path / 'mlflow.db'}")
    records = run_records(f"sqlite:///{tmp_path / 'mlflow.db'}", run["run_id"])
    done = [r for r in records if r.status == Status.APPLIED]
    assert done, [r.summary() for r in records]
    rollout = 16 * 128  # n_envs x n_steps of every recipe
    for r in done:
        assert r.applied_step is not None and r.applied_step % rollout == 0 and r.applied_step >= r.step
    assert run["interventions"] == len(done)
    # The test set never reaches the tracker, so the manager cannot have seen it.
    import mlflow

    logged = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run["run_id"]).data.metrics
    assert "eval/safe_success" in logged and not any(k.startswith("test/") for k in logged)
    # The job reports the values now in force: the last applied change of each knob.
    values = backend.poll(run["run_id"]).listener.values
    last = {k: c.new for r in done for k, c in r.changes.items()}
    for k, v in last.items():
        assert values[k] == pytest.approx(v), k


def test_an_llm_arm_whose_model_is_missing_is_dropped_before_training(monkeypatch, capsys):
    from atm.bench.harness import drop_unbuildable

    monkeypatch.setenv("ATM_LLM", "local:/nonexistent/model.gguf")
    arms = ["fixed", "managed-rules", "managed-llm"]
    skipped = drop_unbuildable("manipulation", arms, "rl-ppo", requested=False)
    assert arms == ["fixed", "managed-rules"] and list(skipped) == ["managed-llm"]
    assert "/nonexistent/model.gguf" in skipped["managed-llm"] and "skipping managed-llm" in capsys.readouterr().out
    # Asked for by name: the bench refuses to start rather than run without it.
    with pytest.raises(SystemExit, match="managed-llm: its proposer could not be built"):
        drop_unbuildable("tinystories", ["fixed", "managed-llm"], "lm", requested=True)
