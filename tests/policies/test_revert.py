"""Setting back a change undoes that change, not what the job's schedule did since.

Seen under a CosineAnnealingLR: an lr halved early in the run was "set back" at step 950 of 1000 to
its value from before the halving, 128 times the annealed lr in force (0.000521 -> 0.06656).
"""

from __future__ import annotations

import pytest

from atm.policies import DecisionContext, available_choices, check, load_policy
from atm.policies._validator import revert_value, undo_value
from atm.schema import Change, Diagnosis, Proposal
from atm.testing import make_record

LM = load_policy("lm")


def halved(applied: float | None = None):
    rec = make_record(1, 100, changes={"lr": (0.1, 0.05)}, diagnosis=Diagnosis.PLATEAU)
    return rec.model_copy(update={"applied_values": {"lr": applied if applied is not None else 0.05}})


@pytest.mark.parametrize("now, expected", [
    (0.05, 0.1),          # nothing moved it since: the value from before, as it was
    (0.0498, 0.1),        # within 1% (a schedule's first steps): the same
    (0.00026, 0.00052),   # annealed since: the change's factor (x2) on the value in force
    (0.08, 0.16),         # a warm-up raised it since: the same factor
])
def test_the_value_that_undoes_a_change(now: float, expected: float) -> None:
    assert undo_value(Change(old=0.1, new=0.05), 0.05, now) == pytest.approx(expected)
    ctx = DecisionContext(step=950, params={"lr": now}, history=[halved()], eval_steps=tuple(range(50, 951, 50)))
    assert revert_value("lr", LM.params["lr"], ctx) == pytest.approx(expected)
    assert any(v == pytest.approx(expected) for v in available_choices(LM, ctx)["lr"])


def test_drift_is_read_from_the_value_the_job_applied() -> None:
    # The job had moved the lr before applying the halving: it set 0.04, not the decided 0.05.
    assert undo_value(Change(old=0.1, new=0.05), 0.04, 0.04) == pytest.approx(0.1)
    assert undo_value(Change(old=0.1, new=0.05), 0.04, 0.02) == pytest.approx(0.04)


def test_a_set_value_from_zero_is_set_back_to_zero() -> None:
    assert undo_value(Change(old=0.0, new=0.1), 0.1, 0.12) == 0.0


def test_an_undo_outside_the_policys_bounds_is_not_offered() -> None:
    # A warm-up took the lr to the policy's maximum since a halving: doubling it would pass the maximum.
    ctx = DecisionContext(step=950, params={"lr": 0.8}, history=[halved()], eval_steps=tuple(range(50, 951, 50)))
    assert revert_value("lr", LM.params["lr"], ctx) is None


def test_the_validator_accepts_the_undo_as_a_move_of_the_changes_factor() -> None:
    ctx = DecisionContext(step=950, params={"lr": 0.00026}, history=[halved()], eval_steps=tuple(range(50, 951, 50)))
    verdict = check(Proposal(diagnosis=Diagnosis.PLATEAU, changes={"lr": 0.00052}, reverts=1), LM, ctx)
    assert verdict.accepted, verdict.reason
    assert verdict.changes["lr"].new / verdict.changes["lr"].old == pytest.approx(2.0)
