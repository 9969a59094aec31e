"""A change the job itself sets back (an LR scheduler atm was not given, code that re-applies a
config) is read back, said in the job's log, and acknowledged as ``undone`` with the cause and fix.

Shaped after the MLP script that took atm with ``atm.listen(optimizer)`` and a warm-up ``LambdaLR``
it did not pass: the change was undone at the next ``scheduler.step()`` while the history said
"applied". Real torch optimizers and schedulers; the tracker side is ``FakeChannel``.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import atm
from atm.testing import FakeChannel, wait_for
from atm.training.listener import undone


def job(make_scheduler):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, make_scheduler(opt)


def step(model, opt, sched) -> float:
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    used = opt.param_groups[0]["lr"]
    sched.step()
    return used


def run_with_a_cut_at_step_3(make_scheduler, caplog, pass_scheduler: bool, ch: FakeChannel | None = None) -> list[float]:
    model, opt, sched = job(make_scheduler)
    ch = ch if ch is not None else FakeChannel()
    with caplog.at_level(logging.WARNING, logger="atm.listener"):
        lst = atm.listen(opt, scheduler=sched if pass_scheduler else None, channel=ch, poll_interval=0.01)
        try:
            used = [step(model, opt, sched) for _ in range(3)]
            now = opt.param_groups[0]["lr"]
            ch.publish(1, lr=(now, now / 2))
            wait_for(lambda: lst._pending)
            used += [step(model, opt, sched) for _ in range(4)]
        finally:
            lst.close()
    return used


def warm_up(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100))


def cosine(opt):
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)


def test_a_lambda_schedule_it_was_not_given_undoes_the_change_and_the_log_says_how_to_fix_it(caplog) -> None:
    ch = FakeChannel()
    used = run_with_a_cut_at_step_3(warm_up, caplog, pass_scheduler=False, ch=ch)
    # Step 4 ran at the halved lr; LambdaLR then recomputed the lr from its own base: undone at step 5.
    assert used[3] == pytest.approx(1e-3 * 4 / 100 / 2)
    assert used[4] == pytest.approx(1e-3 * 5 / 100)
    notes = [r.getMessage() for r in caplog.records if "was undone" in r.getMessage()]
    assert len(notes) == 1, [r.getMessage() for r in caplog.records]
    assert "atm.listen(optimizer, scheduler=sched)" in notes[0] and "LambdaLR" in notes[0]
    # The ack says it too, over the "applied" one, so the watcher's history shows "undone", not "applied".
    ack = ch.acks[1]
    assert ack.status == "undone" and ack.applied_step == 4
    assert "LambdaLR" in ack.error and ack.values["lr"] == pytest.approx(1e-3 * 5 / 100)


def test_the_same_schedule_passed_keeps_the_change_and_says_nothing(caplog) -> None:
    ch = FakeChannel()
    used = run_with_a_cut_at_step_3(warm_up, caplog, pass_scheduler=True, ch=ch)
    assert ch.acks[1].status == "applied" and not ch.acks[1].error
    assert used[3:] == pytest.approx([1e-3 * s / 100 / 2 for s in range(4, 8)])
    assert not [r for r in caplog.records if "was undone" in r.getMessage()]


def test_cosine_annealing_not_given_keeps_the_change_at_its_next_steps(caplog) -> None:
    # CosineAnnealingLR computes each lr from the last one, so a change it was not given holds (with
    # eta_min above 0 it fades as the schedule anneals; given the scheduler, atm scales eta_min too).
    plain = run_with_a_cut_at_step_3(cosine, caplog, pass_scheduler=True)
    caplog.clear()
    blind = run_with_a_cut_at_step_3(cosine, caplog, pass_scheduler=False)
    assert blind == pytest.approx(plain)
    assert not [r for r in caplog.records if "was undone" in r.getMessage()]


def test_code_that_sets_the_lr_itself_is_named_as_the_cause(caplog) -> None:
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ch = FakeChannel()
    with caplog.at_level(logging.WARNING, logger="atm.listener"):
        lst = atm.listen(opt, channel=ch, poll_interval=0.01)
        try:
            ch.publish(1, lr=(0.1, 0.05))
            wait_for(lambda: lst._pending)
            for _ in range(3):
                opt.param_groups[0]["lr"] = 0.1  # a trainer re-applying its config every update
                model(torch.randn(2, 4)).sum().backward()
                opt.step()
        finally:
            lst.close()
    (note,) = [r.getMessage() for r in caplog.records if "was undone" in r.getMessage()]
    assert "sets the lr itself" in note and "atm.attr(config, 'lr')" in note
    assert ch.acks[1].status == "undone" and "sets the lr itself" in ch.acks[1].error


class Recipe:
    """A custom trainer's recipe, re-applied to its optimizer every update."""

    def __init__(self) -> None:
        self.lr = 0.1
        self.dropout = 0.0


def test_any_knob_set_back_by_the_job_is_acknowledged_undone_and_one_that_moves_on_is_not() -> None:
    recipe, config = Recipe(), {"lr": 0.1, "dropout": 0.0}
    ch = FakeChannel()
    lst = atm.listen(knobs={"lr": atm.attr(recipe, "lr"), "dropout": atm.attr(recipe, "dropout")},
                     channel=ch, apply="manual", poll_interval=0.01)
    try:
        ch.publish(1, lr=(0.1, 0.05), dropout=(0.0, 0.1))
        wait_for(lambda: lst._pending)
        assert [u.seq for u in lst.apply_pending(step=1)] == [1]
        wait_for(lambda: 1 in ch.acks)
        assert ch.acks[1].status == "applied"
        # The job's own code: dropout rebuilt from its config (undone), the lr decayed from the value set (held).
        recipe.dropout = config["dropout"]
        recipe.lr = recipe.lr * 0.9
        lst.apply_pending(step=2)
        wait_for(lambda: ch.acks[1].status == "undone")
        ack = ch.acks[1]
        assert "dropout 0 -> 0.1 was undone" in ack.error and "lr 0.1 -> 0.05" not in ack.error
        assert ack.values == pytest.approx({"lr": 0.05, "dropout": 0.0})
        assert ack.applied_step == 1
        assert lst._held == {}
    finally:
        lst.close()


@pytest.mark.parametrize(
    "before, after, now, expected",
    [(1.0, 0.5, 1.0, True), (1.0, 0.5, 0.5, False), (1.0, 0.5, 0.49, False), (1.0, 0.5, 1.02, True),
     (1.0, 2.0, 1.9, False), (1.0, 2.0, 0.98, True)],
)
def test_undone_is_judged_on_a_log_scale(before: float, after: float, now: float, expected: bool) -> None:
    assert undone(before, after, now) is expected


@pytest.mark.parametrize("before, after, now, expected", [(0.0, 0.1, 0.0, True), (0.0, 0.1, 0.09, False), (0.1, 0.0, 0.1, True)])
def test_undone_from_or_to_zero_is_judged_on_a_linear_scale(before: float, after: float, now: float, expected: bool) -> None:
    assert undone(before, after, now) is expected


def test_a_steep_warm_up_it_was_given_is_not_taken_for_an_undo(caplog) -> None:
    # The lr doubles each step of this warm-up: right after a halving, the schedule's own next move takes
    # the lr back to the value before the cut. atm scaled the schedule it was given, so the cut held.
    def doubling(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 2.0 ** min(s, 10) / 1024)

    ch = FakeChannel()
    used = run_with_a_cut_at_step_3(doubling, caplog, pass_scheduler=True, ch=ch)
    assert used[4] == pytest.approx(used[3] * 2) and used[3] == pytest.approx(1e-3 * 2.0 ** 3 / 1024 / 2)
    assert ch.acks[1].status == "applied" and not [r for r in caplog.records if "was undone" in r.getMessage()]
