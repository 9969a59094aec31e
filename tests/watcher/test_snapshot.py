"""Snapshot building: statistics of one series, role mapping, derived signals, measured effects."""

from __future__ import annotations

import math

import pytest

from atm.policies import Policy, load_policy
from atm.schema import Action, Status, TelemetrySnapshot
from atm.testing import decay, flat, make_history, make_record, ramp, scenario, series, valley
from atm.watcher.snapshot import (
    MISSING_METRIC_AFTER,
    TRAIL,
    build_snapshot,
    eval_steps,
    fitted_change_ci,
    mean_ci,
    missing_role_note,
    resolve_roles,
    series_stats,
)


@pytest.fixture(scope="module")
def lm() -> Policy:
    return load_policy("lm")


@pytest.fixture(scope="module")
def rl() -> Policy:
    return load_policy("rl-ppo")


# --------------------------------------------------------------------------- series_stats


def test_empty_series_has_no_stats() -> None:
    assert series_stats("x", []) is None


def test_basic_stats_of_a_falling_loss() -> None:
    pts = series(ramp(20, 3.0, 1.1), every=10)  # steps 10..200, slope -0.1 per 10 steps
    st = series_stats("loss", pts)
    assert st is not None
    assert (st.key, st.n, st.first_step, st.last_step) == ("loss", 20, 10, 200)
    assert st.latest == pytest.approx(1.1)
    assert (st.min, st.max) == (pytest.approx(1.1), pytest.approx(3.0))
    # Slopes are per 1000 steps: -0.1 per 10 steps is -10 per 1000.
    assert st.slope == pytest.approx(-10.0)
    # The window is the last 8 points: 1.8 .. 1.1.
    assert st.window_mean == pytest.approx(1.45)
    assert st.window_std == pytest.approx(math.sqrt(sum((1.45 - (1.8 - 0.1 * i)) ** 2 for i in range(8)) / 8))
    assert (st.best, st.best_step, st.steps_since_best) == (pytest.approx(1.1), 200, 0)
    assert not st.nonfinite


def test_ema_weights_recent_points() -> None:
    st = series_stats("x", [(1, 0.0), (2, 0.0), (3, 10.0)])
    assert st is not None
    assert st.ema == pytest.approx(3.0)  # 0.3 * 10 + 0.7 * 0
    assert 0 < st.ema < st.latest


def test_slope_sign() -> None:
    up = series_stats("x", series(ramp(10, 0.0, 0.9), every=100))
    down = series_stats("x", series(ramp(10, 0.9, 0.0), every=100))
    still = series_stats("x", series(flat(10, 0.5), every=100))
    assert up is not None and down is not None and still is not None
    assert up.slope == pytest.approx(1.0) and down.slope == pytest.approx(-1.0) and still.slope == 0.0


@pytest.mark.parametrize(
    "higher, best, best_step, since",
    [(False, 1.0, 30, 20), (True, 5.0, 50, 0)],
)
def test_best_depends_on_direction(higher: bool, best: float, best_step: int, since: int) -> None:
    pts = [(10, 3.0), (20, 2.0), (30, 1.0), (40, 4.0), (50, 5.0)]
    st = series_stats("x", pts, higher_is_better=higher)
    assert st is not None
    assert (st.best, st.best_step, st.steps_since_best) == (best, best_step, since)


def test_best_tie_is_the_earliest() -> None:
    st = series_stats("x", [(10, 2.0), (20, 1.0), (30, 1.0), (40, 1.5)])
    assert st is not None and st.best_step == 20 and st.steps_since_best == 20


def test_points_are_sorted_by_step() -> None:
    st = series_stats("x", [(30, 1.0), (10, 3.0), (20, 2.0)])
    assert st is not None
    assert (st.first_step, st.last_step, st.latest) == (10, 30, 1.0)
    assert st.slope < 0


def test_trail_is_short_spread_and_ends_with_latest() -> None:
    pts = series(decay(100, 4.0, 1.0), every=10)
    st = series_stats("x", pts)
    assert st is not None
    assert 2 <= len(st.trail) <= TRAIL == 8
    assert st.trail[0] == pts[0]
    assert st.trail[-1] == pts[-1]
    assert [s for s, _ in st.trail] == sorted({s for s, _ in st.trail})
    short = series_stats("x", pts[:5])
    assert short is not None and short.trail == pts[:5]


def test_nonfinite_latest() -> None:
    pts = series([3.0, 2.0, 1.0, float("nan")], every=10)
    st = series_stats("x", pts)
    assert st is not None
    assert st.nonfinite
    assert math.isnan(st.latest)
    # Statistics of the finite points stay usable.
    assert (st.best, st.min, st.max) == (1.0, 1.0, 3.0)
    assert st.trail[-1] == (30, 1.0)


def test_all_nonfinite() -> None:
    st = series_stats("x", [(1, float("inf")), (2, float("nan"))])
    assert st is not None and st.nonfinite and st.n == 2 and st.trail == []


def test_old_nonfinite_point_is_not_flagged_forever() -> None:
    # One NaN early on, then 20 finite points: the series is finite again.
    values = [4.0, float("nan")] + decay(20, 3.5, 1.0)
    st = series_stats("x", series(values, every=10))
    assert st is not None
    assert not st.nonfinite
    assert st.n == 22 and st.best == pytest.approx(min(v for v in values if not math.isnan(v)))


# --------------------------------------------------------------------------- roles


def test_first_candidate_wins(lm: Policy) -> None:
    roles = resolve_roles(lm, ["loss", "train/loss", "eval_loss", "val/loss", "other"])
    assert roles["train_loss"] == "train/loss"
    assert roles["val_loss"] == "val/loss"
    assert "grad_norm" not in roles


def test_glob_roles_keep_components_apart(lm: Policy) -> None:
    keys = ["train/loss", "loss/main", "loss/aux", "train/loss_kl", "lossy"]
    roles = resolve_roles(lm, keys)
    comps = {r: k for r, k in roles.items() if r.startswith("loss_components")}
    assert comps == {
        "loss_components[loss/aux]": "loss/aux",
        "loss_components[loss/main]": "loss/main",
        "loss_components[train/loss_kl]": "train/loss_kl",
    }
    assert roles["train_loss"] == "train/loss"


def test_rl_roles(rl: Policy) -> None:
    roles = resolve_roles(rl, ["eval/safe_success", "eval/collision_rate", "train/entropy_loss", "train/std", "rollout/ep_rew_mean"])
    assert roles == {
        "return": "rollout/ep_rew_mean",
        "safe_success": "eval/safe_success",
        "collision": "eval/collision_rate",
        "entropy_loss": "train/entropy_loss",
        "action_std": "train/std",
    }


def test_eval_steps(lm: Policy, rl: Policy) -> None:
    history = make_history({"train/loss": flat(10, 1.0), "eval_loss": flat(4, 1.0)}, every={"eval_loss": 3})
    assert eval_steps(lm, history) == [3, 6, 9, 12]
    assert eval_steps(rl, history) == []
    # Duplicated steps (a re-logged evaluation) count once.
    assert eval_steps(lm, {"eval_loss": [(5, 1.0), (5, 1.1), (9, 1.0)]}) == [5, 9]


def test_a_run_without_its_evaluation_metric_yet_has_no_evaluations(lm: Policy) -> None:
    # A job evaluating once per epoch: its first mini-batch losses are not evaluations (a daemon started
    # before the job decided on the 4th batch and asked for a rollback before any checkpoint existed).
    early = make_history({"train_loss": flat(MISSING_METRIC_AFTER - 1, 2.3)})
    assert eval_steps(lm, early) == []
    # A job that never evaluates counts its training loss, once it has logged enough of it.
    late = make_history({"train_loss": flat(MISSING_METRIC_AFTER, 2.3)})
    assert eval_steps(lm, late) == list(range(1, MISSING_METRIC_AFTER + 1))
    # Once the evaluation metric shows, only its points count.
    assert eval_steps(lm, {**early, "val_loss": [(25, 2.0)]}) == [25]


# --------------------------------------------------------------------------- signals


def _signals(policy: Policy, curves: dict[str, list[float]], every: dict[str, int]) -> dict[str, float | bool]:
    return build_snapshot("r", policy, make_history(curves, every=every), {}).signals


def test_gap_and_gap_slope_when_val_rises_and_train_falls(lm: Policy) -> None:
    sig = _signals(
        lm,
        {"train/loss": decay(100, 4.0, 0.2, rate=4.0), "eval_loss": valley(20, 4.1, 1.5, 2.2, bottom_at=8)},
        {"train/loss": 10, "eval_loss": 50},
    )
    train_at_1000 = 0.2 + 3.8 * math.exp(-4.0)
    assert sig["gap"] == pytest.approx(2.2 - train_at_1000)
    assert float(sig["gap_slope"]) > 0
    assert float(sig["rise_over_best"]) == pytest.approx((2.2 - 1.5) / 1.5)
    assert float(sig["window_improvement"]) < 0
    assert float(sig["gap_ratio"]) > 1


def test_gap_slope_negative_when_both_fall_together(lm: Policy) -> None:
    sig = _signals(
        lm,
        {"train/loss": decay(100, 4.0, 1.0, rate=2.0), "eval_loss": decay(20, 4.5, 1.2, rate=2.0)},
        {"train/loss": 10, "eval_loss": 50},
    )
    assert float(sig["gap_slope"]) < 0
    assert float(sig["window_improvement"]) > 0.01
    assert sig["rise_over_best"] == 0.0


def test_gap_uses_the_last_train_value_at_or_before_each_eval(lm: Policy) -> None:
    history = {"train/loss": [(10, 3.0), (20, 2.0), (30, 1.0)], "eval_loss": [(15, 3.5), (25, 2.7)]}
    sig = build_snapshot("r", lm, history, {}).signals
    assert sig["gap"] == pytest.approx(0.7)  # 2.7 - train at step 20
    assert sig["gap_slope"] == pytest.approx((0.7 - 0.5) / 10 * 1000)


def test_window_improvement_is_relative_to_where_the_window_began(lm: Policy) -> None:
    sig = _signals(lm, {"train/loss": ramp(8, 2.0, 1.0)}, {"train/loss": 10})
    assert sig["window_improvement"] == pytest.approx(0.5)  # (2 - 1) / 2
    assert "gap" not in sig


def test_train_lost_progress(lm: Policy) -> None:
    # Of the smoothed curve: climbing back from 1.0 towards 4.0 and staying there is lost progress ...
    back_up = _signals(lm, {"train/loss": [4.0, 2.0, 1.0, 1.0, 1.0, 2.5, 3.0, 3.5, 3.5]}, {"train/loss": 10})
    assert float(back_up["train_lost_progress"]) > 0.5
    # ... one bad point is not, and neither is the scatter of a job that logs one mini-batch's loss.
    spike = _signals(lm, {"train/loss": [4.0, 2.0, 1.0, 1.0, 1.0, 2.5]}, {"train/loss": 10})
    assert float(spike["train_lost_progress"]) < 0.5
    noisy = _signals(lm, {"train/loss": decay(40, 1.1, 0.45, rate=6.0) + flat(40, 0.6, noise=0.25, seed=3)}, {"train/loss": 10})
    assert float(noisy["train_lost_progress"]) < 0.5
    # Near zero, a wobble is a small share of the progress made (not a 150% rise).
    wobble = _signals(lm, {"train/loss": decay(60, 4.5, 0.02, rate=8.0) + [0.03, 0.05, 0.04, 0.05]}, {"train/loss": 10})
    assert float(wobble["train_lost_progress"]) < 0.02


def test_loss_component_ratio(lm: Policy) -> None:
    sig = _signals(
        lm, {"train/loss": flat(10, 1.0), "loss/main": flat(10, 1.0), "loss/aux": flat(10, 100.0)}, {}
    )
    assert sig["loss_component_ratio"] == pytest.approx(100.0)
    one = _signals(lm, {"train/loss": flat(10, 1.0), "loss/main": flat(10, 1.0)}, {})
    assert "loss_component_ratio" not in one


def test_grad_norm_ratio(lm: Policy) -> None:
    sig = _signals(lm, {"train/loss": flat(10, 1.0), "grad_norm": [1.0] * 7 + [9.0]}, {})
    assert sig["grad_norm_ratio"] == pytest.approx(9.0 / 2.0)


def test_nonfinite_signal(lm: Policy) -> None:
    sig = _signals(lm, {"train/loss": [3.0, 2.0, float("inf")], "eval_loss": [3.0, 2.5, 2.4]}, {})
    assert sig["nonfinite"] is True
    assert "train_lost_progress" not in sig


def test_signals_with_no_series(lm: Policy) -> None:
    assert build_snapshot("r", lm, {"accuracy": [(1, 0.5)]}, {}).signals == {"nonfinite": False}


# --------------------------------------------------------------------------- snapshots


def test_build_snapshot_with_lm_alternative_names(lm: Policy) -> None:
    sc = scenario("overfitting")
    snap = build_snapshot("run-1", lm, sc.history, sc.params, run_name="gpt", now=123.0)
    assert set(snap.series) == {"train_loss", "val_loss"}
    assert snap.series["train_loss"].key == "train/loss"
    assert snap.series["val_loss"].key == "eval_loss"
    assert snap.step == 1000
    assert (snap.run_id, snap.run_name, snap.taken_at) == ("run-1", "gpt", 123.0)
    assert snap.params == sc.params
    assert snap.recent == []
    # The snapshot is a message: it survives JSON.
    assert TelemetrySnapshot.model_validate_json(snap.model_dump_json()) == snap


def test_build_snapshot_higher_is_better_roles(rl: Policy) -> None:
    history = make_history(
        {"eval/safe_success": [0.1, 0.5, 0.3], "eval/collision_rate": [0.5, 0.1, 0.3]}, every=10
    )
    snap = build_snapshot("r", rl, history, {})
    assert snap.series["safe_success"].best == 0.5
    assert snap.series["collision"].best == 0.1


def test_stepless_inputs(lm: Policy) -> None:
    # Metrics logged without step= reach the snapshot numbered by arrival: 0, 1, 2 ...
    history = make_history({"loss": decay(30, 3.0, 1.0), "val_loss": decay(6, 3.2, 1.2)}, start=0)
    snap = build_snapshot("r", lm, history, {})
    assert snap.step == 29
    assert snap.series["train_loss"].first_step == 0
    assert snap.series["val_loss"].n == 6
    assert eval_steps(lm, history) == [0, 1, 2, 3, 4, 5]
    assert "gap" in snap.signals
    # Every point at step 0 (no numbering at all) still builds, with no trend.
    flat_steps = {"loss": [(0, 3.0), (0, 2.0), (0, 1.0)]}
    snap0 = build_snapshot("r", lm, flat_steps, {})
    assert snap0.step == 0 and snap0.series["train_loss"].slope == 0.0


def test_snapshot_of_unmapped_metrics_keeps_the_step(lm: Policy) -> None:
    snap = build_snapshot("r", lm, {"accuracy": [(5, 0.1), (40, 0.3)]}, {"lr": 0.1})
    assert snap.series == {}
    assert snap.step == 40


# --------------------------------------------------------------------------- measured effects


def test_measured_effects_for_applied_records(lm: Policy) -> None:
    history = make_history(
        {"train/loss": ramp(10, 3.0, 1.2), "eval_loss": [3.0, 2.5, 2.3, 2.4, 2.2]}, every={"train/loss": 10, "eval_loss": 20}
    )
    records = [
        make_record(1, 40, changes={"lr": (1e-3, 5e-4)}, applied_step=45),
        make_record(2, 60, status=Status.REJECTED, changes={"dropout": (0.0, 0.9)}),
        make_record(3, 80, action=Action.ROLLBACK, applied_step=82),
    ]
    effects = build_snapshot("r", lm, history, {}, records, recent=3).recent
    assert [e.seq for e in effects] == [1, 3]
    # Evaluations at 60, 80 and 100 came after #1 took effect (45); only 100 after #3 (82).
    assert [e.evals_since for e in effects] == [3, 1]
    first = effects[0]
    assert first.applied_step == 45
    assert first.changes["lr"].new == 5e-4
    assert first.before_after["val_loss"] == (2.5, 2.2)
    assert first.before_after["train_loss"] == (pytest.approx(3.0 - 0.2 * 3), pytest.approx(1.2))
    # Only the newest `recent` ones are kept.
    assert [e.seq for e in build_snapshot("r", lm, history, {}, records, recent=1).recent] == [3]


def test_measured_effects_skip_metrics_logged_after_the_decision(lm: Policy) -> None:
    history = {"train/loss": [(10, 2.0), (20, 1.5)], "eval_loss": [(50, 1.8)]}
    effects = build_snapshot("r", lm, history, {}, [make_record(1, 20, applied_step=20)]).recent
    assert set(effects[0].before_after) == {"train_loss"}


def test_named_roles_are_not_swallowed_by_a_pattern() -> None:
    # lm maps loss_components to "loss/*"; a job logging loss/train and loss/val means train and val.
    roles = resolve_roles(load_policy("lm"), ["loss/train", "loss/val", "loss/aux"])
    assert roles["train_loss"] == "loss/train" and roles["val_loss"] == "loss/val"
    assert [r for r in roles if r.startswith("loss_components")] == ["loss_components[loss/aux]"]


def test_a_missing_evaluation_metric_is_explained() -> None:
    lm = load_policy("lm")
    note = missing_role_note(lm, ["trn/xent", "dev/xent", "atm/lr"])
    assert note.startswith("no metric for val_loss (policy lm looks for: val_loss, val/loss,")
    assert "the run logs: dev/xent, trn/xent." in note and "atm/lr" not in note
    assert "--policy FILE" in note
    assert missing_role_note(lm, ["train_loss", "val_loss"]) == ""
    assert missing_role_note(lm, []) == ""  # nothing logged yet: too early to say anything


def test_a_run_that_logs_only_the_listeners_values_is_explained() -> None:
    # Seen in a new user's SB3 script: SB3's logger writes to stdout only, so the run held atm/* alone.
    note = missing_role_note(load_policy("rl-ppo"), ["atm/lr", "atm/ent_coef"])
    assert note.startswith("the run logs no metrics of its own") and "Stable-Baselines3" in note


def test_confidence_intervals_come_from_the_runs_own_scatter() -> None:
    line = [(10 * i, 2.0 - 0.01 * i) for i in range(8)]
    change, ci = fitted_change_ci(line)
    assert change == pytest.approx(-0.07) and ci == pytest.approx(0.0, abs=1e-12)  # no scatter, no doubt
    wobbly = [(s, v + (0.02 if i % 2 else -0.02)) for i, (s, v) in enumerate(line)]
    change, ci = fitted_change_ci(wobbly)
    assert change == pytest.approx(-0.07, abs=0.02) and ci > abs(change)  # the trend is within the noise
    assert fitted_change_ci(line[:2])[1] == math.inf  # two points show no scatter to judge by
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)  # t(2) = 4.303


def test_gap_signals_read_the_window_of_evaluations() -> None:
    lm = load_policy("lm")
    val = [3.0, 2.6, 2.3, 2.1, 2.0, 1.95, 1.92, 1.9]
    steady = build_snapshot("r", lm, {"train_loss": [(i * 50, v - 0.2) for i, v in enumerate(val, 1)],
                                      "val_loss": [(i * 50, v) for i, v in enumerate(val, 1)]}, {}).signals
    assert steady["gap_mean"] == pytest.approx(0.2 / 1.9) and steady["gap_trend"] == pytest.approx(0.0, abs=1e-9)
    apart = build_snapshot("r", lm, {"train_loss": [(i * 50, v - 0.1 * i) for i, v in enumerate(val, 1)],
                                     "val_loss": [(i * 50, v) for i, v in enumerate(val, 1)]}, {}).signals
    assert apart["gap_trend"] == pytest.approx(0.7 / 1.9) and apart["gap_trend_ci"] == pytest.approx(0.0, abs=1e-9)
