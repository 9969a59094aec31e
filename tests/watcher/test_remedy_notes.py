"""A remedy's notes say what was changed and why a parameter was not: never a move that was not made.

Shaped after an overfitting run under the ``lm`` preset: "#3 (lr, weight_decay) was neutral: trying
dropout", while the changes were lr and weight decay again, dropout being at 0.3, the highest value
the preset offers (its maximum is 0.5).
"""

from __future__ import annotations

from atm.policies import load_policy
from atm.schema import Diagnosis, EffectLabel, Outcome
from atm.testing import make_record
from atm.watcher.decide import offline_situation
from atm.watcher.rules import remedy_with_notes

LM = load_policy("lm")

# Val loss rising from its best at step 100, train loss still falling: overfitting.
VAL = [(s, 1.0 + abs(s - 100) / 200) for s in range(10, 171, 10)]
TRAIN = [(s, 1.0 - s / 300) for s in range(5, 171, 5)]
NEUTRAL = Outcome(label=EffectLabel.NEUTRAL, metric="val_loss")


def notes_for(params: dict[str, float], tried: dict[str, tuple[float, float]]) -> tuple[dict[str, float], list[str]]:
    last = make_record(3, 100, changes=tried).model_copy(update={"effect": NEUTRAL})
    sit = offline_situation("r", LM, {"val_loss": VAL, "train_loss": TRAIN}, params, [last])
    changes, _, notes = remedy_with_notes(Diagnosis.OVERFITTING, sit.snapshot, LM, sit.offer)
    return changes, notes


def test_a_parameter_at_the_highest_value_offered_is_not_said_to_be_tried() -> None:
    changes, notes = notes_for({"lr": 1e-3, "weight_decay": 0.05, "dropout": 0.3},
                               {"lr": (2e-3, 1e-3), "weight_decay": (0.01, 0.05)})
    assert set(changes) == {"lr", "weight_decay"} and "dropout" not in changes
    assert not any("trying dropout" in n for n in notes), notes
    assert "dropout is at the highest value the policy offers (0.3)" in notes, notes
    assert any(n.startswith("#3 (lr, weight_decay) was neutral") and "lr, weight_decay again" in n for n in notes), notes


def test_at_the_policys_bound_it_says_so_and_a_move_made_is_named() -> None:
    # Dropout at the policy's maximum; the last remedy moved lr alone: weight decay is tried, with lr again.
    changes, notes = notes_for({"lr": 1e-3, "weight_decay": 0.05, "dropout": 0.5}, {"lr": (2e-3, 1e-3)})
    assert set(changes) == {"weight_decay", "lr"}
    assert "dropout is at the policy's maximum 0.5" in notes, notes
    assert "#3 (lr) was neutral: trying weight_decay, and lr again" in notes, notes
