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
