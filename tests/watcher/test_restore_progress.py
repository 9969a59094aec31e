"""Progress a rollback gives back is not divergence: the train loss is read from the restore on.

Shaped after a CNN run managed with a rollback registered: after the rollback restored the best
checkpoint, the train loss went from 0.002 back to 0.52 (the restored model's own loss) and the
rules read "train loss gave back 53% of its progress" as divergence and cut the lr.
"""

from __future__ import annotations

import math

import pytest

from atm.policies import load_policy
from atm.schema import Action, Diagnosis
from atm.testing import concat, decay, make_history, make_record
from atm.watcher.rules import diagnose
from atm.watcher.snapshot import RunTelemetry, build_snapshot
from _reference_snapshot import reference_snapshot

LM = load_policy("lm")
PARAMS = {"lr": 0.01, "dropout": 0.1}

# One point an epoch (100 steps): the train loss falls to 0.0035 while val rises from its best (0.50,
# epoch 2); the rollback decided at step 1100 restores epoch 2's checkpoint, train loss 0.52 again.
TRAIN = decay(11, 0.80, 0.0015, rate=6.0)
VAL = [0.60, 0.50, 0.52, 0.56, 0.62, 0.70, 0.78, 0.85, 0.92, 0.98, 1.03]
ROLLBACK = make_record(4, 1100, action=Action.ROLLBACK, effective_step=1101)


def run(train_after: list[float], val_after: list[float]) -> dict[str, list[tuple[int, float]]]:
    return make_history({"train/loss": concat(TRAIN, train_after), "val/loss": concat(VAL, val_after)}, every=100)


def test_the_restored_models_own_loss_is_not_divergence_and_a_blow_up_after_it_still_is() -> None:
    history = run([0.52, 0.52, 0.51, 0.50, 0.50, 0.49], [0.51, 0.51, 0.505, 0.505, 0.502, 0.503])
    snap = build_snapshot("r", LM, history, PARAMS, [ROLLBACK])
    sig = snap.signals
    # From the restore on, the smoothed train loss has only improved (0.52 -> 0.50).
    assert float(sig["train_lost_progress"]) < 0.05, sig
    assert float(sig["train_smoothed_best_step"]) >= 1101
    assert diagnose(snap)[0] != Diagnosis.DIVERGENCE, diagnose(snap)
    # Without the rollback on record the same curve reads as divergence: the signal is what changed.
    assert diagnose(build_snapshot("r", LM, history, PARAMS, []))[0] == Diagnosis.DIVERGENCE
    # The restored model blowing up is divergence, by the train loss's lost progress ...
    blown = build_snapshot("r", LM, run([0.52, 0.50, 0.9, 1.6, 2.8, 4.5], [0.51, 0.51, 0.9, 1.8, 3.0, 4.2]),
                           PARAMS, [ROLLBACK])
    assert float(blown.signals["train_lost_progress"]) > 0.5
    diagnosis, evidence = diagnose(blown)
    assert diagnosis == Diagnosis.DIVERGENCE and "gave back" in evidence
    # ... and by a NaN.
    nan = build_snapshot("r", LM, run([0.52, 0.50, math.nan], [0.51, 0.51, math.nan]), PARAMS, [ROLLBACK])
    assert diagnose(nan)[0] == Diagnosis.DIVERGENCE and nan.signals["nonfinite"] is True


def test_too_few_points_since_the_restore_say_nothing_yet() -> None:
    history = run([0.52, 0.52], [0.51, 0.51])
    assert "train_lost_progress" not in build_snapshot("r", LM, history, PARAMS, [ROLLBACK]).signals


@pytest.mark.parametrize("cut", [3, 11, 12, 14])
def test_folded_poll_by_poll_it_is_the_whole_historys_signal(cut: int) -> None:
    history = run([0.52, 0.52, 0.51, 0.50, 0.50, 0.49], [0.51, 0.51, 0.505, 0.505, 0.502, 0.503])
    telemetry = RunTelemetry(LM)
    telemetry.fold({k: pts[:cut] for k, pts in history.items()})
    telemetry.snapshot("r", PARAMS, [ROLLBACK], now=0.0)  # a snapshot between polls, as the daemon takes one
    telemetry.fold(history)
    got = telemetry.snapshot("r", PARAMS, [ROLLBACK], now=0.0)
    assert float(got.signals["train_smoothed_best_step"]) >= 1101
    assert got == build_snapshot("r", LM, history, PARAMS, [ROLLBACK], now=0.0)
    assert got.model_dump_json() == reference_snapshot("r", LM, history, PARAMS, [ROLLBACK], now=0.0).model_dump_json()
