"""The lr as the rules read it: a warm-up the listener charts, a loss's pace since the lr settled, and the
rule that raises the lr on that pace."""

from __future__ import annotations

import math
import random

import pytest

from atm.policies import load_policy
from atm.schema import Diagnosis, EffectLabel, Outcome
from atm.testing import make_record
from atm.watcher.decide import offline_situation
from atm.watcher.rules import RulesProposer
from atm.watcher.snapshot import pace

LM = load_policy("lm")


def _steady(n: int = 14, *, lr: list[tuple[int, float]] | None = None, noise: float = 0.003,
            seed: int = 0) -> dict[str, list[tuple[int, float]]]:
    """An SGD run at a small lr: val loss falling in a straight line, evaluated every 100 steps."""
    rng = random.Random(seed)
    val = [(100 * (i + 1), 1.2 - 0.015 * i + rng.gauss(0, noise)) for i in range(n)]
    train = [(10 * (i + 1), 1.21 - 0.0015 * i + rng.gauss(0, 0.01)) for i in range(10 * n)]
    return {"loss": train, "val_loss": val, "atm/lr": lr if lr is not None else [(0, 0.002)]}


def _decide(history: dict[str, list[tuple[int, float]]], records=()):  # type: ignore[no-untyped-def]
    sit = offline_situation("run-pace", LM, history, {"lr": 0.002, "weight_decay": 0.0, "dropout": 0.0}, records)
    return sit, RulesProposer().propose(sit.snapshot, sit.policy, sit.ctx, sit.offer).proposal


def test_pace_is_about_one_for_a_straight_line_and_small_for_a_loss_that_slows() -> None:
    line = [(s, 2.0 - 0.001 * s) for s in range(100, 1300, 100)]
    read = pace(line[0], line[-6:])
    assert read is not None and read[0] == pytest.approx(1.0)
    curve = [(s, 1.0 + math.exp(-s / 200)) for s in range(100, 1300, 100)]
    slowing = pace(curve[0], curve[-6:])
    assert slowing is not None and slowing[0] < 0.2
    rising = [(s, 1.0 + 0.001 * s) for s in range(100, 1300, 100)]
    assert pace(rising[0], rising[-6:]) is None


def test_a_steady_fall_at_a_constant_lr_is_lr_too_low_and_the_lr_goes_up_half_as_much_again() -> None:
    sit, proposal = _decide(_steady())
    assert sit.snapshot.signals["pace"] > 0.9 and sit.snapshot.signals["pace_from"] == 100
    assert proposal.diagnosis == Diagnosis.LR_TOO_LOW
    assert proposal.changes == {"lr": pytest.approx(0.003)}
    assert "not slowing down" in proposal.rationale


def test_without_an_lr_series_no_pace_is_read_and_nothing_is_raised() -> None:
    history = _steady()
    del history["atm/lr"]
    sit, proposal = _decide(history)
    assert "pace" not in sit.snapshot.signals
    assert proposal.diagnosis == Diagnosis.HEALTHY and not proposal.changes


def test_a_warm_up_or_a_cut_of_the_lr_starts_the_pace_afresh() -> None:
    # A warm-up ending at step 900: the fall before it was slowed by the warm-up, not by the lr in force.
    warm = [(100 * i, 0.002 * min(1.0, (i + 1) / 10)) for i in range(10)]
    sit, _ = _decide(_steady(lr=warm))
    assert sit.snapshot.signals["pace_from"] == 900
    # A step schedule's 10x cut at step 1000: 5 evaluations since are too few to read a pace from.
    cut = [(0, 0.02), (1000, 0.002)]
    sit, proposal = _decide(_steady(lr=cut))
    assert "pace" not in sit.snapshot.signals
    assert proposal.diagnosis != Diagnosis.LR_TOO_LOW
    # A decay logged at every 1% it moved is neither: the pace is read from the first evaluation.
    decaying = [(100 * i, 0.002 * 0.99**i) for i in range(14)]
    sit, _ = _decide(_steady(lr=decaying))
    assert sit.snapshot.signals["pace_from"] == 100


def test_a_noisy_fall_is_not_read_as_a_step_too_small() -> None:
    # The same line under noise 10x larger: its improvement is within its confidence interval's reach.
    sit, proposal = _decide(_steady(noise=0.03, seed=3))
    assert proposal.diagnosis != Diagnosis.LR_TOO_LOW


def test_no_raise_after_atm_cut_the_lr_for_another_problem_or_after_a_raise_that_did_not_help() -> None:
    cut = make_record(1, 150, changes={"lr": (0.004, 0.002)}, diagnosis=Diagnosis.OVERFITTING, effective_step=150)
    _, proposal = _decide(_steady(n=16), [cut])
    assert proposal.diagnosis != Diagnosis.LR_TOO_LOW
    raised = make_record(1, 150, changes={"lr": (0.00133, 0.002)}, diagnosis=Diagnosis.LR_TOO_LOW, effective_step=150)
    neutral = raised.model_copy(update={"effect": Outcome(label=EffectLabel.NEUTRAL, metric="val_loss", evals=3)})
    _, proposal = _decide(_steady(n=16), [neutral])
    assert proposal.diagnosis != Diagnosis.LR_TOO_LOW
    helped = raised.model_copy(update={"effect": Outcome(label=EffectLabel.HELPED, metric="val_loss", evals=3)})
    sit, proposal = _decide(_steady(n=16), [helped])
    # Read from where the raise took effect: 15 evaluations since step 150's change.
    assert sit.snapshot.signals["pace_from"] == 200
    assert proposal.diagnosis == Diagnosis.LR_TOO_LOW


def test_the_pace_folded_poll_by_poll_is_the_pace_read_whole_and_reads_past_the_recent_points() -> None:
    from atm.watcher.snapshot import RunTelemetry, build_snapshot

    history = _steady(n=40, lr=[(0, 0.002), (1500, 0.004)])
    whole = build_snapshot("r", LM, history, {"lr": 0.004}).signals
    assert whole["pace_from"] == 1500 and whole["pace_evals"] == 26
    polled = RunTelemetry(LM)
    for end in (500, 1400, 2200, 4000):
        polled.fold({k: [p for p in pts if p[0] <= end] for k, pts in history.items()})
    assert {k: v for k, v in polled.snapshot("r", {"lr": 0.004}).signals.items() if k.startswith("pace")} == {
        k: v for k, v in whole.items() if k.startswith("pace")}
    # Keeping only the last 8 points of each series, the count since the jump comes from the evaluation
    # steps and the first point from the thinned ones: the same here, where every point is kept thinned.
    small = RunTelemetry(LM, recent=8)
    small.fold(history)
    sig = small.snapshot("r", {"lr": 0.004}).signals
    assert sig["pace_from"] == 1500 and sig["pace_evals"] == 26 and sig["pace"] == pytest.approx(whole["pace"])


def test_a_policy_turns_the_raise_off_or_asks_for_a_steadier_fall(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name, text in (("off.yaml", "extends: lm\nthresholds: {lr_low_pace: .inf}\n"),
                       ("strict.yaml", "extends: lm\nthresholds: {lr_low_significance: 100}\n")):
        path = tmp_path / name
        path.write_text(text)
        sit = offline_situation("run-pace", load_policy(str(path)), _steady(),
                                {"lr": 0.002, "weight_decay": 0.0, "dropout": 0.0})
        proposal = RulesProposer().propose(sit.snapshot, sit.policy, sit.ctx, sit.offer).proposal
        assert proposal.diagnosis == Diagnosis.HEALTHY and not proposal.changes, name


def test_an_lr_the_job_logs_once_gives_way_to_the_listeners_series_of_it() -> None:
    # The job logs its configured lr once; its scheduler warms the lr up over 900 steps, which only the
    # listener's atm/lr shows. The loss fell slowly under the warm-up, then fast, and is slowing as a
    # good run's does: read from the start, the slow warm-up makes that a fall faster than its average.
    val = [(100 * (i + 1), 2.0 - (0.01 * (i + 1) if i < 9 else 0.09 + 0.3 * (1 - math.exp(-(i - 8) / 2))))
           for i in range(14)]
    history = {"loss": [(10 * (j + 1), val[j // 10][1] - 0.01) for j in range(140)], "val_loss": val,
               "lr": [(0, 0.002)], "atm/lr": [(100 * i, 0.002 * min(1.0, (i + 1) / 10)) for i in range(10)]}
    sit, proposal = _decide(history)
    assert sit.snapshot.series["lr"].key == "atm/lr"
    assert sit.snapshot.signals["pace_from"] == 900 and sit.snapshot.signals["pace"] < 0.9
    assert proposal.diagnosis == Diagnosis.HEALTHY and not proposal.changes
    # A job that logs its lr as it moves keeps its own series.
    history["lr"] = history["atm/lr"]
    sit, _ = _decide(history)
    assert sit.snapshot.series["lr"].key == "lr"


def test_a_warm_up_the_listener_charts_every_few_evaluations_is_still_a_warm_up() -> None:
    # A fast job (an evaluation every 0.3 s): the listener's atm/lr, logged every 3 s while the
    # scheduler moves it, last charted the rising lr 5 evaluations before the decision.
    rng = random.Random(1)
    val = [(e, 2.3 * math.exp(-e / 6) + 0.1 + 0.002 * e + rng.gauss(0, 0.002)) for e in range(1, 24)]
    train = [(e, 2.3 * math.exp(-e / 6) + 0.02 - 0.001 * e) for e in range(1, 24)]
    warm = [(0, 0.0017), (7, 0.02), (18, 0.0383)]
    sit, proposal = _decide({"train_loss": train, "val_loss": val, "atm/lr": warm})
    assert proposal.diagnosis == Diagnosis.HEALTHY and "warm-up" in proposal.rationale
    # The same lr charted last 30 evaluations ago: the warm-up is over, the rules read the run again.
    ended = [(s - 30, v) for s, v in warm]
    later = [(s + 30, v) for s, v in val]
    sit, proposal = _decide({"train_loss": [(s + 30, v) for s, v in train], "val_loss": later, "atm/lr": ended})
    assert "warm-up" not in proposal.rationale
