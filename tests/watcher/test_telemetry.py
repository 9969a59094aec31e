"""Incremental telemetry: folding a run's points poll by poll gives the snapshot of the whole history."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atm.adapters.base import HistoryTrimmed, PointSeries, release_history
from atm.policies import Policy, load_policy
from atm.schema import Action, Status
from atm.testing import make_record
from atm.watcher.snapshot import RunTelemetry, SeriesState, build_snapshot, series_stats
from _reference_snapshot import reference_snapshot

LM = load_policy("lm")
RL = load_policy("rl-ppo")

values = st.one_of(
    st.floats(min_value=-5, max_value=50, allow_nan=False, width=32),
    st.sampled_from([float("nan"), float("inf"), 1e300]),
)


@st.composite
def histories(draw: st.DrawFn, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """A run's metrics: each key logged every few steps (sometimes twice at one step), finite values
    mostly, a blow-up now and then."""
    out = {}
    for key in keys:
        every = draw(st.integers(1, 7))
        n = draw(st.integers(0, 60))
        step = draw(st.integers(0, 5))
        pts = []
        for _ in range(n):
            step += draw(st.sampled_from([0, every, every, every]))
            v = draw(st.one_of(values, values, values, st.floats(0.5, 3.0)))
            pts.append((step, float(v)))
        out[key] = pts
    return out


@st.composite
def splits(draw: st.DrawFn, history: dict[str, list[tuple[int, float]]]) -> list[dict[str, int]]:
    """Poll by poll, how many points of each key the tracker shows: each key grows on its own clock."""
    polls = draw(st.integers(1, 6))
    cuts = {k: sorted(draw(st.lists(st.integers(0, len(p)), min_size=polls - 1, max_size=polls - 1))) + [len(p)]
            for k, p in history.items()}
    return [{k: cuts[k][i] for k in history} for i in range(polls)]


#: A policy and the metric keys a run logs for it.
POLICIES_AND_KEYS = st.sampled_from([
    (LM, ("train_loss", "val_loss", "grad_norm", "loss/aux", "loss/main")),
    (RL, ("rollout/ep_rew_mean", "eval/safe_success", "eval/collision_rate", "train/entropy_loss")),
])

RECORDS = [
    make_record(1, 30, changes={"lr": (1e-3, 5e-4)}, applied_step=32, effective_step=35),
    make_record(2, 60, status=Status.REJECTED),
    make_record(3, 90, action=Action.ROLLBACK, applied_step=95, effective_step=96),
    # Dropout acts on the train loss alone: the gap's window starts again here.
    make_record(4, 120, changes={"dropout": (0.1, 0.05)}, applied_step=121, effective_step=123),
]


def folded(policy: Policy, history: dict, cuts: list[dict[str, int]], **kw: int) -> RunTelemetry:
    telemetry = RunTelemetry(policy, **kw)
    for cut in cuts:
        # Keys appear when their first point does, as a tracker lists them.
        telemetry.fold({k: pts[: cut[k]] for k, pts in history.items() if cut[k]})
    return telemetry


def snap(telemetry: RunTelemetry) -> str:
    # As JSON: NaN and inf compare equal there (as "NaN", "Infinity"), as they do not as floats.
    return telemetry.snapshot("r", {"lr": 1e-3}, RECORDS, now=0.0).model_dump_json()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_split_into_polls_gives_the_snapshot_of_the_whole_history(data: st.DataObject) -> None:
    policy, keys = data.draw(POLICIES_AND_KEYS)
    history = data.draw(histories(keys))
    cuts = data.draw(splits(history))
    # A small thinning cap, so that thinning happens in these short series too.
    whole = folded(policy, history, [{k: len(p) for k, p in history.items()}], thin_cap=8)
    assert snap(folded(policy, history, cuts, thin_cap=8)) == snap(whole)
    # As the daemon folds: the backend's points released after each poll change nothing.
    assert snap(released_folds(policy, history, cuts, keep=data.draw(st.integers(1, 4)))) == snap(whole)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_the_snapshot_is_the_one_the_whole_history_always_gave(data: st.DataObject) -> None:
    # Against the former whole-history computation, for series within the thinning cap.
    policy, keys = data.draw(POLICIES_AND_KEYS)
    history = data.draw(histories(keys))
    history = {k: p for k, p in history.items() if p}
    cuts = data.draw(splits(history))
    got = snap(folded(policy, history, cuts))
    want = reference_snapshot("r", policy, history, {"lr": 1e-3}, RECORDS, now=0.0).model_dump_json()
    assert got == want


def released_folds(policy: Policy, history: dict, cuts: list[dict[str, int]], keep: int) -> RunTelemetry:
    """As the daemon folds: one PointSeries per key that grows poll by poll, released after each fold."""
    telemetry = RunTelemetry(policy, thin_cap=8)
    held: dict[str, PointSeries] = {}
    for cut in cuts:
        for k, pts in history.items():
            if cut[k]:
                series = held.setdefault(k, PointSeries())
                series.extend(pts[len(series): cut[k]])
        telemetry.fold(held)
        release_history(held, keep)
    return telemetry


def test_a_released_series_keeps_its_length_head_and_newest_points() -> None:
    series = PointSeries((s, float(s)) for s in range(100))
    series.release(10)
    assert len(series) == 100 and series.dropped == 90 and len(series.steps) == 10
    assert series[0] == (0, 0.0) and series[-1] == (99, 99.0) and series[95] == (95, 95.0)
    assert series[95:] == [(s, float(s)) for s in range(95, 100)] and series[100:] == []
    with pytest.raises(HistoryTrimmed):
        series[50]
    with pytest.raises(HistoryTrimmed):
        series[80:]
    with pytest.raises(HistoryTrimmed):
        list(series)
    series.release(10)  # nothing more to let go until it holds twice as many
    assert series.dropped == 90
    series.extend((s, 0.0) for s in range(100, 105))
    series.release(10)
    assert series.dropped == 90 and len(series) == 105
    series.extend((s, 0.0) for s in range(105, 115))
    series.release(10)
    assert series.dropped == 105 and len(series) == 115 and series[105] == (105, 0.0) and series[0] == (0, 0.0)


def test_a_series_rewritten_after_its_points_were_released_asks_for_a_new_read() -> None:
    # A resumed job logs old steps again: the telemetry must refold the series from its start,
    # which a released series cannot give. It says so rather than fold a tail as if it were whole.
    series = {"train_loss": PointSeries((s, 3.0 - s / 100) for s in range(1, 141))}
    telemetry = RunTelemetry(LM)
    telemetry.fold(series)
    release_history(series, 8)
    series["train_loss"].extend([(100, 2.5)])  # appended out of order, as an arrival-order tracker shows it
    with pytest.raises(HistoryTrimmed):
        telemetry.fold(series)


def test_an_evaluation_series_that_appears_late_needs_no_released_train_points() -> None:
    train = [(s, 3.0 - s / 1000) for s in range(1, 3001)]
    val = [(s, 2.5 - s / 2000) for s in range(1000, 3001, 500)]
    held = {"train_loss": PointSeries(train[:2000])}
    telemetry = RunTelemetry(LM)
    telemetry.fold(held)
    release_history(held, 16)
    held["train_loss"].extend(train[2000:])
    held["val_loss"] = PointSeries(val)
    telemetry.fold(held)
    whole = folded(LM, {"train_loss": train, "val_loss": val}, [{"train_loss": 3000, "val_loss": len(val)}])
    assert snap(telemetry) == snap(whole)


def test_a_rewritten_series_is_folded_again() -> None:
    # A job resumed from its step-100 checkpoint logs steps 101.. again: the backend rewrites the series.
    first = {"train_loss": [(s, 3.0 - s / 100) for s in range(1, 141)], "val_loss": [(s, 2.0) for s in range(20, 141, 20)]}
    resumed = {"train_loss": [(s, 3.0 - s / 100) for s in range(1, 101)] + [(s, 2.5) for s in range(101, 161)],
               "val_loss": [(s, 2.0) for s in range(20, 101, 20)] + [(s, 1.5) for s in range(120, 161, 20)]}
    telemetry = RunTelemetry(LM)
    telemetry.fold(first)
    telemetry.fold(resumed)
    assert snap(telemetry) == snap(folded(LM, resumed, [{k: len(p) for k, p in resumed.items()}]))
    assert telemetry.series()["train_loss"].latest == 2.5


def test_a_poll_with_nothing_new_changes_nothing() -> None:
    history = {"train_loss": [(s, 1.0 / s) for s in range(1, 50)], "val_loss": [(10, 0.5), (40, 0.4)]}
    telemetry = RunTelemetry(LM)
    assert telemetry.fold(history) is True
    before = snap(telemetry)
    assert telemetry.fold(history) is False
    assert snap(telemetry) == before


def test_memory_per_series_is_bounded_but_for_the_evaluation_steps() -> None:
    state = SeriesState("train_loss", thin_cap=64, recent=128)
    for s in range(100_000):
        state.add(s, math.sin(s / 1000))
    assert len(state.thin) <= 64 and len(state.recent) == 128 and len(state.window) == 8
    assert len(state.recent.steps) <= 160 and state.recent[0] == (100_000 - 128, math.sin(99.872))
    assert list(state.recent)[-1] == (99_999, math.sin(99.999)) and state.recent[-2][0] == 99_998
    assert len(state.steps) == 100_000 and state.steps.itemsize == 8
    untracked = SeriesState("grad_norm", track_steps=False)
    for s in range(1000):
        untracked.add(s, 1.0)
    assert len(untracked.steps) == 0 and untracked.n == 1000
    # Thinned points are every k-th point, k a power of two, starting from the first.
    stride = state.thin[1][0] - state.thin[0][0]
    assert state.thin[0][0] == 0 and stride & (stride - 1) == 0
    assert all(b[0] - a[0] == stride for a, b in zip(state.thin, state.thin[1:]))


def test_the_trail_of_a_long_series_spans_it_and_ends_with_the_latest() -> None:
    pts = [(s, 10.0 - s / 10_000) for s in range(100_000)]
    st_ = series_stats("x", pts)
    assert st_ is not None
    assert st_.trail[0] == (0, 10.0) and st_.trail[-1] == pts[-1]
    assert len(st_.trail) == 8


def test_an_old_step_is_read_from_the_thinned_points() -> None:
    state = SeriesState("x", thin_cap=16, recent=10)
    for s in range(1000):
        state.add(s, float(s))
    assert state.value_at(995) == 995.0  # within the recent points: exact
    old = state.value_at(300)
    assert old is not None and 300 - 64 <= old <= 300  # before them: the thinned point at or before it


def test_build_snapshot_sorts_what_it_is_given() -> None:
    pts = [(30, 1.0), (10, 3.0), (20, 2.0)]
    assert build_snapshot("r", LM, {"train_loss": pts}, {}).series["train_loss"].trail == sorted(pts)


@pytest.mark.parametrize("policy", [LM, RL])
def test_eval_steps_count_the_evaluation_metric(policy: Policy) -> None:
    key = "val_loss" if policy is LM else "eval/safe_success"
    history = {key: [(s, 0.5) for s in range(100, 1001, 100)]}
    telemetry = RunTelemetry(policy)
    telemetry.fold(history)
    assert list(telemetry.eval_steps()) == list(range(100, 1001, 100))


def test_points_folded_out_of_order_read_as_the_series_in_step_order() -> None:
    # A tracker that keeps arrival order (W&B rows) can hand over a point older than ones already folded.
    early = {"train_loss": [(1, 3.0), (2, 2.5), (4, 2.0)]}
    late = {"train_loss": [(1, 3.0), (2, 2.5), (4, 2.0), (3, 2.2), (5, 1.9)]}
    telemetry = RunTelemetry(LM)
    telemetry.fold(early)
    telemetry.fold(late)
    assert snap(telemetry) == snap(folded(LM, {"train_loss": sorted(late["train_loss"])}, [{"train_loss": 5}]))


def test_a_backend_series_in_compact_arrays_folds_like_a_list() -> None:
    from atm.adapters.base import PointSeries

    pts = [(s, 1.0 / (s + 1)) for s in range(500)]
    compact = RunTelemetry(LM)
    compact.fold({"train_loss": PointSeries(pts[:300])})
    compact.fold({"train_loss": PointSeries(pts)})
    assert snap(compact) == snap(folded(LM, {"train_loss": pts}, [{"train_loss": 500}]))
    series = PointSeries(pts)
    assert series[3] == (3, 0.25) and series[-1] == pts[-1] and series[10:12] == pts[10:12] and series == pts
