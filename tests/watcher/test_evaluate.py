"""Scenario loading, scoring and the ``atm eval`` / ``atm explain`` commands."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pytest

from atm.schema import Action, Diagnosis, Proposal
from atm.watcher.cli import main as atm_main
from atm.watcher.evaluate import (
    EvalReport,
    ScenarioError,
    add_eval_parser,
    judge,
    load_scenario,
    load_scenarios,
    render_explain,
    score,
    situation,
)
from atm.watcher.proposer import ProposalResult, ProposerError
from atm.watcher.rules import RulesProposer



@pytest.fixture(scope="module")
def suite(scenario_dir):
    return load_scenarios(scenario_dir)


def test_suite_is_large_and_covers_every_situation(suite):
    assert len(suite) >= 40
    diagnoses = Counter(d for s in suite for d in s.expect.diagnosis[:1])
    for d in (
        Diagnosis.OVERFITTING,
        Diagnosis.PLATEAU,
        Diagnosis.DIVERGENCE,
        Diagnosis.LOSS_IMBALANCE,
        Diagnosis.OVER_REGULARIZATION,
        Diagnosis.EXPLORATION_COLLAPSE,
        Diagnosis.UNSAFE_EXPLORATION,
        Diagnosis.CONVERGED,
        Diagnosis.HEALTHY,
    ):
        assert diagnoses[d] >= 2, d
    assert sum(not s.expect.any_of for s in suite) >= 10  # runs where doing nothing is right
    assert {s.policy for s in suite} == {"lm", "rl-ppo"}
    keys = {k for s in suite for k in s.metrics}
    assert {
        "train_loss",
        "loss",
        "train/loss",
        "val_loss",
        "eval_loss",
        "val/loss",
    } <= keys  # lm preset alternatives


def test_every_scenario_builds_a_situation(suite):
    for sc in suite:
        sit = situation(sc)
        assert sit.snapshot.series, sc.name
        assert sit.ctx.step == sit.snapshot.step
        # any_of moves are meant to be possible: each names a parameter the job registered
        for move in sc.expect.any_of + sc.expect.forbid:
            ((key, _),) = move.items()
            assert key == "action" or key in sc.params, (sc.name, key)


def test_rules_report_has_the_exact_shape(suite):
    report = score(RulesProposer(), suite)
    data = json.loads(report.model_dump_json())
    assert set(data) == {"proposer", "summary", "scenarios"}
    assert set(data["summary"]) == {
        "n",
        "acceptable_rate",
        "harmful_rate",
        "noop_precision",
        "latency_p50_s",
        "latency_p95_s",
    }
    assert all(
        set(r) == {"name", "diagnosis", "changes", "acceptable", "harmful", "latency_s"}
        for r in data["scenarios"]
    )
    assert data["proposer"] == "rules" and data["summary"]["n"] == len(suite)
    # The rules are the baseline: good on the suite but not perfect, and never harmful.
    assert data["summary"]["acceptable_rate"] >= 0.8
    assert data["summary"]["harmful_rate"] == 0.0


class FakeProposer:
    """Returns a fixed proposal (or fails), for scoring logic."""

    name = "fake"

    def __init__(self, proposal: Proposal | None):
        self.proposal = proposal

    def propose(self, snapshot, policy, ctx, offer):
        if self.proposal is None:
            raise ProposerError("model unavailable", {"error": "refused"})
        return ProposalResult(proposal=self.proposal, source=self.name)


def test_scoring_judges_what_the_validator_lets_through(suite):
    sc = next(s for s in suite if s.name == "overfit_small_gpt")
    sit = situation(sc)
    up = max(sit.offer.choices["dropout"])
    good = score(
        FakeProposer(Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"dropout": up})), [sc]
    ).scenarios[0]
    assert good.acceptable and not good.harmful and good.changes == {"dropout": up}
    harmful = score(
        FakeProposer(Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"lr": max(sit.offer.choices["lr"])})),
        [sc],
    )
    assert harmful.scenarios[0].harmful and not harmful.scenarios[0].acceptable
    assert harmful.summary.harmful_rate == 1.0
    # Out of policy: dropped by check, so nothing is applied and nothing harmful happens.
    wild = score(
        FakeProposer(Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"lr": 10.0})), [sc]
    ).scenarios[0]
    assert wild.changes == {} and not wild.harmful and not wild.acceptable
    # Right remedy, wrong diagnosis: not acceptable.
    wrong = score(
        FakeProposer(Proposal(diagnosis=Diagnosis.PLATEAU, changes={"dropout": up})), [sc]
    ).scenarios[0]
    assert not wrong.acceptable
    failed = score(FakeProposer(None), [sc])
    assert failed.scenarios[0].diagnosis is None and not failed.scenarios[0].acceptable


def test_noop_precision(suite):
    healthy = next(s for s in suite if s.name == "healthy_epochs")
    overfit = next(s for s in suite if s.name == "overfit_small_gpt")
    noop = FakeProposer(Proposal(diagnosis=Diagnosis.HEALTHY))
    report = score(noop, [healthy, overfit])
    assert report.summary.noop_precision == 0.5
    assert report.summary.acceptable_rate == 0.5
    stop = score(FakeProposer(Proposal(diagnosis=Diagnosis.HEALTHY, action=Action.STOP)), [healthy])
    assert stop.scenarios[0].harmful and stop.summary.noop_precision is None


def test_judge_directions_and_actions(suite):
    sc = next(s for s in suite if s.name == "rl_converged")
    assert judge(sc, Diagnosis.CONVERGED, [{"action": "stop"}]) == (True, False)
    assert judge(sc, Diagnosis.CONVERGED, []) == (False, False)
    assert judge(sc, Diagnosis.CONVERGED, [{"action": "rollback"}]) == (False, True)


def test_bad_scenarios_are_named(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(
        "name: a\npolicy: lm\nparams: {lr: 0.1}\nmetrics: {val_loss: [[1, 2.0]]}\n"
        "expect: {diagnosis: [healthy], any_of: [{lr: sideways}]}\n"
    )
    with pytest.raises(ScenarioError, match=r"a\.yaml.*up or down"):
        load_scenarios(tmp_path)
    with pytest.raises(ScenarioError, match="does not exist"):
        load_scenarios(tmp_path / "nope")
    (tmp_path / "a.yaml").write_text("- just a list\n")
    with pytest.raises(ScenarioError, match="mapping"):
        load_scenario(tmp_path / "a.yaml")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="atm")
    sub = ap.add_subparsers()
    add_eval_parser(sub)
    return ap


def test_eval_command_json_and_table(scenario_dir, capsys):
    args = _parser().parse_args(
        ["eval", "--scenarios", str(scenario_dir), "--proposer", "rules", "--json", "--only", "overfit"]
    )
    assert args.func(args) == 0
    report = EvalReport.model_validate_json(capsys.readouterr().out)
    assert report.summary.n == len([p for p in scenario_dir.glob("*.yaml") if "overfit" in p.stem])
    args = _parser().parse_args(["eval", "--scenarios", str(scenario_dir), "--only", "healthy_epochs"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "healthy_epochs" in out and "acceptable=100%" in out
    args = _parser().parse_args(["eval", "--scenarios", "/nonexistent"])
    assert args.func(args) == 2 and "--scenarios" in capsys.readouterr().err


def test_explain(labelled, scenario_dir, capsys):
    sit = labelled("rl_unsafe_reckless")
    text = render_explain(sit.snapshot, sit.policy, sit.ctx, sit.offer)
    # The default variant (brief): the policy as the system message, then the problem and the rules' choice.
    assert "=== system" in text and 'POLICY "rl-ppo"' in text
    assert "PROBLEM at step" in text and "unsafe_exploration" in text and "SUGGESTED {" in text
    assert "reward.collision_penalty (now 1): 2.5, 5, 10" in text
    assert atm_main(["explain", "--scenario", str(scenario_dir / "healthy_epochs.yaml"), "--no-evidence"]) == 0
    out = capsys.readouterr().out
    assert "PARAMETERS AND ALLOWED MOVES" in out and "AUTOMATIC CHECK" not in out


def test_eval_command_llm_path_reports_failures_instead_of_crashing(scenario_dir, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        "eval",
        "--scenarios",
        str(scenario_dir),
        "--proposer",
        "llm",
        "--llm",
        "openai/none",
        "--llm-base-url",
        f"http://127.0.0.1:{port}/v1",
        "--variant",
        "plain",
        "--only",
        "healthy_epochs",
        "--json",
    ]
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    report = EvalReport.model_validate_json(capsys.readouterr().out)
    assert report.proposer == "llm[plain]"
    assert report.scenarios[0].diagnosis is None and not report.scenarios[0].acceptable
    args = _parser().parse_args(
        ["eval", "--scenarios", str(scenario_dir), "--proposer", "llm", "--variant", "psychic"]
    )
    assert args.func(args) == 2 and "psychic" in capsys.readouterr().err
