"""Which evaluations a change is judged on: not past the next change's start, not across a restore.

Shaped after an overfitting CNN run managed by the rules with a rollback registered: a remedy's
after-window took in an evaluation after the next decision's rollback, and the rollback's drop was
credited to the remedy ("helped"); a remedy made after a rollback was judged against a line fitted
across the restore's jump (a negative cross-entropy "projected").
"""

from __future__ import annotations

import pytest

from atm.schema import Action, Diagnosis, EffectLabel, Status
from atm.testing import make_record, series
from atm.watcher.effect import judge, measure

EVERY = 100


def val_points(values: list[float]) -> list[tuple[int, float]]:
    return series(values, every=EVERY)


# Val loss of an overfitting run, one evaluation every 100 steps: best 1.36 at step 400, then rising.
RISING = [2.10, 1.70, 1.50, 1.36, 1.40, 1.45, 1.48, 1.53, 1.56]  # steps 100..900


def test_a_remedy_is_not_credited_with_the_next_decisions_rollback() -> None:
    # #3 (lr cut, decided at 900) is in effect for two evaluations; #4, a rollback decided at 1100,
    # brings val back to the restored checkpoint's 1.25 from step 1200 on.
    points = val_points(RISING + [1.60, 1.63, 1.25, 1.26, 1.27])
    lr_cut = make_record(3, 900, changes={"lr": (0.05, 0.025)})
    rollback = make_record(4, 1100, action=Action.ROLLBACK)
    records, judged = judge([lr_cut, rollback], points, metric="val/loss", higher_is_better=False, evals=3)
    three, four = records
    assert judged == [3, 4]
    # Two of its three evaluations came before the rollback took effect: too few to judge, as for a run
    # that ended early; the drop at 1200 is not its doing.
    assert three.effect is not None and three.effect.label == EffectLabel.UNKNOWN, three.effect
    assert three.effect.evals == 2 and "#4" in three.effect.note and "2 of 3" in three.effect.note
    # The drop is the rollback's.
    assert four.effect is not None and four.effect.label == EffectLabel.HELPED, four.effect
    assert four.effect.measured == pytest.approx((1.25 + 1.26 + 1.27) / 3)


def test_a_remedy_overtaken_before_any_evaluation_is_unknown() -> None:
    points = val_points(RISING + [1.25, 1.26, 1.27])
    lr_cut = make_record(3, 900, changes={"lr": (0.05, 0.025)}, effective_step=905)
    rollback = make_record(4, 905, action=Action.ROLLBACK, effective_step=950)
    outcome = measure(lr_cut, points, metric="val/loss", higher_is_better=False, evals=3, records=[lr_cut, rollback])
    assert outcome is not None and outcome.label == EffectLabel.UNKNOWN and outcome.evals == 0
    assert "#4" in outcome.note


def test_a_later_decision_not_applied_or_not_yet_in_effect_does_not_cut_the_window() -> None:
    points = val_points(RISING + [1.60, 1.63, 1.67])
    lr_cut = make_record(3, 900, changes={"lr": (0.05, 0.025)})
    rejected = make_record(4, 1000, action=Action.ROLLBACK, status=Status.REJECTED)
    pending_view = make_record(5, 1100, changes={"dropout": (0.1, 0.2)}).model_copy(update={"effective_step": None})
    outcome = measure(lr_cut, points, metric="val/loss", higher_is_better=False, evals=3,
                      records=[lr_cut, rejected, pending_view])
    assert outcome is not None and outcome.label != EffectLabel.UNKNOWN and outcome.evals == 3


def test_the_trend_before_a_change_is_fitted_from_the_latest_restore_on() -> None:
    # #1, a rollback at 600, restored the best checkpoint: val fell from 2.2 to 1.05. #2 (decided at
    # 900) was made three evaluations later, on a run falling 0.02 an evaluation.
    points = val_points([2.3, 1.9, 1.75, 1.8, 2.0, 2.2, 1.05, 1.03, 1.01, 0.99, 0.97, 0.95])
    rollback = make_record(1, 600, action=Action.ROLLBACK, diagnosis=Diagnosis.OVERFITTING)
    lr_cut = make_record(2, 900, changes={"lr": (0.05, 0.025)})
    records, _ = judge([rollback, lr_cut], points, metric="val/loss", higher_is_better=False, evals=3)
    outcome = records[1].effect
    assert outcome is not None
    # The line through 1.05, 1.03, 1.01 projects 0.99, 0.97, 0.95: on its trend, no effect.
    assert outcome.projected == pytest.approx(0.97, abs=1e-6)
    assert outcome.before == pytest.approx(1.03)
    assert outcome.label == EffectLabel.NEUTRAL, outcome


def test_a_trend_that_projects_a_loss_below_zero_is_not_used() -> None:
    # A fast fall when the change is made: the line through it crosses 0 within the window after.
    points = val_points([3.0, 2.0, 1.0, 0.5, 0.45, 0.44])
    rec = make_record(1, 300, changes={"lr": (0.1, 0.05)}, diagnosis=Diagnosis.PLATEAU)
    outcome = measure(rec, points, metric="val/loss", higher_is_better=False, evals=3)
    assert outcome is not None and outcome.label == EffectLabel.UNKNOWN, outcome
    assert "below 0" in outcome.note and outcome.evals == 3
    # A metric that does go below 0 (a log-likelihood, say) is projected as it is.
    shifted = [(s, v - 2.0) for s, v in points]
    judged = measure(rec, shifted, metric="val/nll", higher_is_better=False, evals=3)
    assert judged is not None and judged.label != EffectLabel.UNKNOWN
