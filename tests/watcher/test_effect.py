"""Verified effect: what an applied change did, judged on real training curves; settle, revert, groups."""

from __future__ import annotations

import math

import pytest
import torch

from atm.policies import DecisionContext, check, load_policy, parse_policy
from atm.schema import Action, Change, DecisionRecord, Diagnosis, EffectLabel, Outcome, Proposal, Status
from atm.watcher.decide import offline_situation
from atm.watcher.effect import hurt_unanswered, judge, measure
from atm.watcher.rules import RulesProposer, remedy_with_notes

LM = load_policy("lm")
EVERY = 10


def regression_run(lr: float, steps: int, change_at: int | None = None, new_lr: float | None = None,
                   seed: int = 0) -> list[tuple[int, float]]:
    """A real torch run: a linear model fitted by SGD to noisy data, its held-out loss every EVERY steps.

    From ``change_at`` on, the optimizer's lr is ``new_lr`` (what the listener does when it applies).
    """
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(8, 1, generator=g)
    x, xv = torch.randn(256, 8, generator=g) * 2, torch.randn(256, 8, generator=g) * 2
    y, yv = x @ w_true + 0.3 * torch.randn(256, 1, generator=g), xv @ w_true + 0.3 * torch.randn(256, 1, generator=g)
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for step in range(1, steps + 1):
        if change_at is not None and step == change_at:
            for group in opt.param_groups:
                group["lr"] = new_lr
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % EVERY == 0:
            with torch.no_grad():
                val = torch.nn.functional.mse_loss(model(xv), yv).item()
            out.append((step, val if math.isfinite(val) else float("inf")))
    return out


def applied(seq: int, step: int, changes: dict[str, tuple[float, float]], diagnosis: Diagnosis,
            effect: Outcome | None = None, action: Action | None = None) -> DecisionRecord:
    return DecisionRecord(run_id="r", seq=seq, step=step, status=Status.APPLIED, source="rules", diagnosis=diagnosis,
                          changes={k: Change(old=a, new=b) for k, (a, b) in changes.items()}, action=action,
                          effective_step=step + 1, applied_step=step + 1, effect=effect)


# --------------------------------------------------------------------------- measured on real runs


def test_an_lr_cut_on_a_run_that_was_diverging_helped() -> None:
    # lr 0.06 on this problem makes SGD's held-out loss climb; at step 200 the lr is cut 8x.
    cut = regression_run(lr=0.06, steps=260, change_at=201, new_lr=0.0075)
    rec = applied(1, 200, {"lr": (0.06, 0.0075)}, Diagnosis.DIVERGENCE)
    outcome = measure(rec, cut, metric="val_loss", higher_is_better=False, evals=3)
    assert outcome is not None and outcome.label == EffectLabel.HELPED, outcome
    assert outcome.measured < outcome.projected


def test_an_lr_raise_to_the_maximum_on_a_converging_run_hurt_and_is_set_back() -> None:
    # lr 0.01 converges; at step 200 it is raised to 0.08, past the edge of stability.
    run = regression_run(lr=0.01, steps=260, change_at=201, new_lr=0.08)
    rec = applied(1, 200, {"lr": (0.01, 0.08)}, Diagnosis.PLATEAU)
    outcome = measure(rec, run, metric="val_loss", higher_is_better=False, evals=3)
    assert outcome is not None and outcome.label == EffectLabel.HURT, outcome
    # The rules set it back, with the value from before (an allowed move whatever the multipliers).
    records, judged = judge([rec], run, metric="val_loss", higher_is_better=False, evals=3)
    assert judged == [1] and hurt_unanswered(records) is records[0]
    sit = offline_situation("r", LM, {"val_loss": run, "train_loss": run}, {"lr": 0.08, "weight_decay": 0.0},
                            records=records)
    result = RulesProposer().propose(sit.snapshot, LM, sit.ctx, sit.offer)
    assert result.proposal.reverts == 1
    assert result.proposal.changes == {"lr": 0.01}
    assert "hurt" in result.proposal.rationale
    assert check(result.proposal, LM, sit.ctx).accepted


def test_an_unchanged_run_is_neutral() -> None:
    run = regression_run(lr=0.01, steps=260)
    rec = applied(1, 200, {"weight_decay": (0.0, 0.0001)}, Diagnosis.OVERFITTING)
    outcome = measure(rec, run, metric="val_loss", higher_is_better=False, evals=3)
    assert outcome is not None and outcome.label == EffectLabel.NEUTRAL, outcome


# --------------------------------------------------------------------------- when it cannot be judged


def test_not_yet_measurable_then_unknown_when_the_run_ends() -> None:
    pts = [(s, 1.0 / s) for s in range(10, 210, 10)]
    rec = applied(1, 195, {"lr": (1e-3, 5e-4)}, Diagnosis.PLATEAU)
    assert measure(rec, pts, metric="val_loss", higher_is_better=False, evals=3) is None
    ended = measure(rec, pts, metric="val_loss", higher_is_better=False, evals=3, ended=True)
    assert ended is not None and ended.label == EffectLabel.UNKNOWN and "1 of 3" in ended.note


def test_too_few_evaluations_before_it_is_unknown() -> None:
    pts = [(10, 1.0), (20, 0.9), (30, 0.8), (40, 0.7), (50, 0.6)]
    rec = applied(1, 15, {"lr": (1e-3, 5e-4)}, Diagnosis.PLATEAU)
    outcome = measure(rec, pts, metric="val_loss", higher_is_better=False, evals=3)
    assert outcome is not None and outcome.label == EffectLabel.UNKNOWN and "too few" in outcome.note


def test_non_finite_values_after_a_change_hurt() -> None:
    pts = [(s, 1.0 - s / 1000) for s in range(10, 110, 10)] + [(110, float("nan")), (120, 0.8), (130, 0.8)]
    rec = applied(1, 100, {"lr": (1e-3, 2e-3)}, Diagnosis.PLATEAU)
    outcome = measure(rec, pts, metric="val_loss", higher_is_better=False, evals=3)
    assert outcome is not None and outcome.label == EffectLabel.HURT


def test_a_flattening_curve_is_not_hurt() -> None:
    # Healthy curves flatten: worse than the straight line through the last evaluations, but still
    # better than where the run was. Not a harm a change did.
    pts = [(s, 2.0 * math.exp(-s / 60)) for s in range(10, 200, 10)]
    rec = applied(1, 150, {"lr": (1e-3, 5e-4)}, Diagnosis.PLATEAU)
    outcome = measure(rec, pts, metric="val_loss", higher_is_better=False, evals=3)
    assert outcome is not None and outcome.label != EffectLabel.HURT


def test_higher_is_better_metrics_are_judged_the_right_way_round() -> None:
    flat = [(s, 0.3) for s in range(1000, 7000, 1000)]
    rec = applied(1, 6000, {"ent_coef": (0.01, 0.02)}, Diagnosis.PLATEAU)
    up = measure(rec, flat + [(7000, 0.5), (8000, 0.6), (9000, 0.7)], metric="safe", higher_is_better=True, evals=3)
    down = measure(rec, flat + [(7000, 0.1), (8000, 0.1), (9000, 0.05)], metric="safe", higher_is_better=True, evals=3)
    assert up is not None and up.label == EffectLabel.HELPED
    assert down is not None and down.label == EffectLabel.HURT


# --------------------------------------------------------------------------- settle: no stacking


def _ctx(records: list[DecisionRecord], evals: list[int], params: dict[str, float] | None = None) -> DecisionContext:
    return DecisionContext(step=evals[-1], params=params or {"lr": 5e-4, "weight_decay": 0.0, "dropout": 0.1},
                           history=records, eval_steps=evals)


def test_a_second_remedy_for_the_same_problem_waits_for_the_first_ones_effect() -> None:
    first = applied(1, 100, {"lr": (1e-3, 5e-4)}, Diagnosis.OVERFITTING)
    second = Proposal(diagnosis=Diagnosis.OVERFITTING, changes={"lr": 2.5e-4})
    evals = list(range(10, 101, 10))
    early = check(second, LM, _ctx([first], evals + [110, 120]))
    assert not early.accepted and early.reason.startswith("settle: #1 for overfitting")
    assert check(second, LM, _ctx([first], evals + [110, 120, 130])).accepted  # 3 evaluations since
    judged = first.model_copy(update={"effect": Outcome(label=EffectLabel.NEUTRAL, metric="val_loss")})
    assert check(second, LM, _ctx([judged], evals + [110, 120])).accepted  # its effect is known
    # Divergence does not wait, nor does setting back a change that hurt, nor another problem.
    assert check(second.model_copy(update={"diagnosis": Diagnosis.DIVERGENCE}), LM, _ctx([first], evals + [110, 120])).accepted
    assert check(second.model_copy(update={"reverts": 1}), LM, _ctx([first], evals + [110, 120])).accepted
    assert check(second.model_copy(update={"diagnosis": Diagnosis.PLATEAU}), LM, _ctx([first], evals + [110, 120])).accepted


def test_the_rules_wait_instead_of_stacking() -> None:
    # A run that overfits: the rules would cut lr again, but the first cut is still being measured.
    val = [(s, 1.0 + abs(s - 80) / 200) for s in range(10, 121, 10)]  # two evaluations since #1
    train = [(s, 1.0 - s / 300) for s in range(5, 121, 5)]
    first = applied(1, 100, {"dropout": (0.0, 0.1)}, Diagnosis.OVERFITTING)
    sit = offline_situation("r", LM, {"val_loss": val, "train_loss": train}, {"lr": 1e-3, "dropout": 0.1}, [first])
    proposal = RulesProposer().propose(sit.snapshot, LM, sit.ctx, sit.offer).proposal
    assert proposal.diagnosis == Diagnosis.OVERFITTING and proposal.is_noop
    assert "waiting for the effect of #1" in proposal.rationale


# --------------------------------------------------------------------------- escalation and bounds


def test_a_neutral_remedy_makes_the_next_one_try_other_axes() -> None:
    val = [(s, 1.0 + abs(s - 100) / 200) for s in range(10, 171, 10)]
    train = [(s, 1.0 - s / 300) for s in range(5, 171, 5)]
    neutral = Outcome(label=EffectLabel.NEUTRAL, metric="val_loss")
    first = applied(1, 100, {"dropout": (0.0, 0.1), "lr": (2e-3, 1e-3)}, Diagnosis.OVERFITTING, effect=neutral)
    sit = offline_situation("r", LM, {"val_loss": val, "train_loss": train},
                            {"lr": 1e-3, "dropout": 0.1, "weight_decay": 0.0}, [first])
    changes, _, notes = remedy_with_notes(Diagnosis.OVERFITTING, sit.snapshot, LM, sit.offer)
    assert "weight_decay" in changes
    assert any("was neutral" in n for n in notes)


GROUPED = """
name: two-optimizers
metrics: {train_loss: [loss], val_loss: [val_loss]}
params:
  actor_lr: {min: 1.0e-5, max: 3.0e-3, multipliers: [0.5, 2.0], group: lr}
  critic_lr: {min: 1.0e-4, max: 3.0e-3, multipliers: [0.5, 2.0], group: lr}
limits: {max_changes: 1, warmup: {evals: 1}}
"""


def test_a_group_moves_every_member_by_the_same_factor_within_its_bounds() -> None:
    policy = parse_policy(GROUPED, source="grouped.yaml")
    plateau = {"val_loss": [(s, 1.0) for s in range(10, 201, 10)], "loss": [(s, 0.9) for s in range(5, 201, 5)]}
    sit = offline_situation("r", policy, plateau, {"actor_lr": 1e-3, "critic_lr": 1e-4})
    changes, _, notes = remedy_with_notes(Diagnosis.PLATEAU, sit.snapshot, policy, sit.offer)
    # Both move as one change (max_changes 1); the critic's lr is at its minimum and says so.
    assert changes == {"actor_lr": 5e-4}
    assert any("critic_lr is at the policy's minimum" in n for n in notes)
    both = offline_situation("r", policy, plateau, {"actor_lr": 1e-3, "critic_lr": 1e-3})
    changes, _, _ = remedy_with_notes(Diagnosis.PLATEAU, both.snapshot, policy, both.offer)
    assert changes == {"actor_lr": 5e-4, "critic_lr": 5e-4}
    for name, value in changes.items():
        assert policy.params[name].min <= value <= policy.params[name].max


@pytest.mark.parametrize("label", [EffectLabel.HELPED, EffectLabel.NEUTRAL])
def test_only_a_change_that_hurt_is_set_back(label: EffectLabel) -> None:
    rec = applied(1, 100, {"lr": (1e-3, 2e-3)}, Diagnosis.PLATEAU, effect=Outcome(label=label, metric="val_loss"))
    assert hurt_unanswered([rec]) is None


def test_the_llm_is_offered_a_group_members_moves_as_the_groups() -> None:
    from atm.watcher.llm_variants import remedy_moves
    from atm.watcher.prompt import offered_moves

    policy = parse_policy(GROUPED, source="grouped.yaml")
    plateau = {"val_loss": [(s, 1.0) for s in range(10, 201, 10)], "loss": [(s, 0.9) for s in range(5, 201, 5)]}
    sit = offline_situation("r", policy, plateau, {"actor_lr": 1e-3, "critic_lr": 1e-3})
    moves = remedy_moves(Diagnosis.PLATEAU, offered_moves(sit.offer, sit.snapshot.params), sit.snapshot, policy)
    assert {(m.param, m.direction) for m in moves} == {("actor_lr", "down"), ("critic_lr", "down")}


def test_a_stop_gets_no_measured_effect_and_one_the_job_ignored_says_so() -> None:
    from atm.watcher.effect import measure

    stop = applied(1, 100, {}, Diagnosis.OVERFITTING, action=Action.STOP)  # in effect from step 101
    before = [(s, 1.0 - s / 1000) for s in range(10, 101, 10)]
    # The job stopped: one last point where it ended, nothing after.
    ended = measure(stop, before + [(101, 0.9)], metric="val_loss", higher_is_better=False, evals=3, ended=True)
    assert ended is not None and ended.label == EffectLabel.UNKNOWN and ended.note == "training ended here, as asked"
    assert measure(stop, before, metric="val_loss", higher_is_better=False, evals=3) is None  # not over yet
    # The job trained on (it never reads stop_requested): not a "neutral" effect of the stop.
    went_on = before + [(s, 0.9) for s in range(110, 200, 10)]
    outcome = measure(stop, went_on, metric="val_loss", higher_is_better=False, evals=3)
    assert outcome is not None and outcome.label == EffectLabel.UNKNOWN and "trained on after the stop" in outcome.note
