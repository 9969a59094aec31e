"""The improvement across the trailing window is a share of where the window began: never over 100%
for a loss that stays above 0.

Seen: "val/loss 1.052 still improving (107.7% over the window)" after a rollback, the window fitted
from a spike after the restore down to 1.052, relative to the best val loss; early in a run the same
figure read 229% for a loss falling from 4 to 1.15.
"""

from __future__ import annotations

import pytest

from atm.policies import load_policy
from atm.schema import Action, Diagnosis
from atm.testing import decay, make_history, make_record
from atm.watcher.rules import diagnose
from atm.watcher.snapshot import build_snapshot, fitted_change

LM = load_policy("lm")


def test_after_a_spike_following_a_rollback_the_improvement_is_a_share_of_the_windows_start() -> None:
    val = [2.3, 1.6, 1.25, 1.05, 0.98, 1.02, 1.08, 1.15, 1.22] + [2.35, 1.70, 1.30, 1.12, 1.052]
    train = [2.4, 1.5, 1.0, 0.8, 0.6, 0.45, 0.33, 0.25, 0.18] + [2.2, 1.5, 1.1, 0.9, 0.8]
    history = make_history({"train/loss": train, "val/loss": val}, every=100)
    rollback = make_record(1, 900, action=Action.ROLLBACK, effective_step=901)
    sig = build_snapshot("r", LM, history, {"lr": 0.01, "dropout": 0.1}, [rollback]).signals
    window = history["val/loss"][-5:]  # from the restore on
    change = fitted_change(window)
    start = sum(v for _, v in window) / 5 - change / 2  # the fitted line at the window's first step
    assert float(sig["window_improvement"]) == pytest.approx(-change / start)
    assert 0 < float(sig["window_improvement"]) < 1


def test_early_descent_is_not_read_as_improving_by_more_than_all_of_it() -> None:
    history = make_history({"train/loss": decay(40, 4.2, 0.9, rate=3.0), "val/loss": decay(8, 4.0, 1.0, rate=3.0)},
                           every={"train/loss": 10, "val/loss": 50})
    snap = build_snapshot("r", LM, history, {"lr": 0.01})
    assert 0.5 < float(snap.signals["window_improvement"]) <= 1.0
    diagnosis, evidence = diagnose(snap)
    assert diagnosis == Diagnosis.HEALTHY and "still improving" in evidence
    share = float(evidence.split("(")[1].split("%")[0]) / 100
    assert share <= 1.0, evidence


def test_a_line_steeper_than_the_loss_can_fall_is_held_at_all_of_it() -> None:
    # A sharp drop then flat: the line through it ends below 0, beyond "all of it".
    history = make_history({"train/loss": [2.0, 0.1, 0.1, 0.1]}, every=10)
    assert build_snapshot("r", LM, history, {}).signals["window_improvement"] == pytest.approx(1.0)
