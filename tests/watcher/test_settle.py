"""Settling an answer: when the run has moved too far for it (the pure deadline test)."""

from __future__ import annotations

import pytest

from atm.policies import DecisionContext, Window
from atm.watcher.settle import out_of_time


def ctx_at(step: int, evals: list[int]) -> DecisionContext:
    return DecisionContext(step=step, params={}, eval_steps=evals)


@pytest.mark.parametrize(("now", "evals", "expected"), [
    (200, [100, 200], False),            # nothing logged since the snapshot
    (230, [200, 210, 220, 230], False),  # three evaluations of four
    (240, [200, 210, 220, 230, 240], True),
    (260, [200, 210, 220, 230, 240, 250, 260], True),
])
def test_an_answer_is_out_of_time_once_the_run_moved_past_the_window(now: int, evals: list[int], expected: bool) -> None:
    assert out_of_time(ctx_at(now, evals), 200, Window(evals=4)) is expected


def test_steps_and_evaluations_must_both_have_passed() -> None:
    window = Window(evals=2, steps=100)
    assert not out_of_time(ctx_at(230, [200, 210, 220, 230]), 200, window)  # 3 evaluations, 30 steps
    assert out_of_time(ctx_at(300, [200, 300]), 200, Window(steps=100))
    assert out_of_time(ctx_at(300, [200, 250, 300]), 200, window)


def test_an_empty_window_is_no_deadline() -> None:
    assert not out_of_time(ctx_at(10_000, list(range(200, 10_001, 10))), 200, Window())


def test_a_proposer_slower_than_the_runs_stale_window_is_outpaced() -> None:
    from atm.watcher.settle import outpaced

    evals = [(100, 10.0), (120, 10.5), (140, 11.0), (160, 11.5)]  # an evaluation every 0.5 s
    why = outpaced([4.0, 3.5, 4.2], evals, Window(evals=4))
    assert "3.9 s" not in why and "4.0 s" in why and "2.0 s" in why and "4 evaluations" in why
    assert outpaced([1.5, 1.9], evals, Window(evals=4)) == ""  # answers within the 2 s the run allows
    assert outpaced([1.5], evals, Window(evals=4, steps=400)) == ""  # 400 steps take 10 s: both must pass
    assert "400 steps" in outpaced([12.0], evals, Window(evals=4, steps=400))


def test_pace_that_cannot_be_told_yet_never_outpaces() -> None:
    from atm.watcher.settle import outpaced

    evals = [(100, 10.0), (120, 10.5), (140, 11.0)]
    assert outpaced([], evals, Window(evals=4)) == ""  # no answer timed yet
    assert outpaced([30.0], evals[:2], Window(evals=4)) == ""  # too few evaluations placed in time
    assert outpaced([30.0], evals, Window()) == ""  # no window: no deadline
    assert outpaced([30.0], [(100, 10.0), (120, 10.0), (140, 10.0)], Window(evals=4)) == ""  # one clock tick
    # The median of the last five: one slow first answer (the model loading) does not decide alone.
    assert outpaced([30.0, 1.0, 1.2, 0.9], evals, Window(evals=4)) == ""
