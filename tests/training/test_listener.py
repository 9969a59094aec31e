"""The listener: applies at the right point, in order, once; never raises into training.

Uses real torch optimizers and schedulers; the tracker side is an in-memory fake channel
(``atm.testing.FakeChannel``), since what is tested here is the listener's own logic.
"""

from __future__ import annotations

import copy

import time

import pytest
import torch
import torch.nn as nn

import atm
from atm.schema import Ack, Action
from atm.testing import FakeChannel, wait_for
from atm.training.listener import Listener


def make_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    return model, opt


def train_step(model, opt):
    opt.zero_grad()
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()


def test_update_lands_at_next_optimizer_step_not_before():
    model, opt = make_model()
    ch = FakeChannel()
    lst = atm.listen(opt, knobs={"dropout": atm.dropout(model)}, channel=ch, poll_interval=0.01)
    try:
        train_step(model, opt)
        ch.publish(1, lr=(1e-3, 5e-4), dropout=(0.0, 0.1))
        wait_for(lambda: lst._pending)
        # Received, but not applied until the training thread steps.
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
        train_step(model, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
        assert model[1].p == pytest.approx(0.1)
        assert [u.seq for u in lst.applied] == [1]
        wait_for(lambda: 1 in ch.acks)
        ack = ch.acks[1]
        assert ack.status == "applied" and ack.applied_step == 2
        assert ack.values == {"lr": pytest.approx(5e-4), "dropout": pytest.approx(0.1)}
        wait_for(lambda: any("lr" in m and s == 2 for m, s in ch.metrics))
    finally:
        lst.close()


def test_updates_apply_in_seq_order_once_even_if_fetched_twice():
    model, opt = make_model()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        ch.publish(2, lr=(5e-4, 2.5e-4))
        ch.publish(1, lr=(1e-3, 5e-4))
        wait_for(lambda: len(lst._pending) == 2)
        train_step(model, opt)
        assert [u.seq for u in lst.applied] == [1, 2]
        assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
        # A duplicate delivery of an applied seq is ignored.
        lst._pending.append(ch.updates[1])
        train_step(model, opt)
        assert [u.seq for u in lst.applied] == [1, 2]
    finally:
        lst.close()


def test_restarted_listener_resumes_after_acked_updates():
    model, opt = make_model()
    ch = FakeChannel()
    ch.publish(1, lr=(1e-3, 5e-4))
    ch.ack(Ack(run_id="run-1", seq=1, status="applied", applied_step=5, values={"lr": 5e-4}))  # signed, as a listener's
    ch.publish(2, weight_decay=(0.0, 0.01))
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        wait_for(lambda: lst._pending)
        train_step(model, opt)
        # Seq 1 was applied by the earlier process: only seq 2 lands here.
        assert [u.seq for u in lst.applied] == [2]
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.01)
    finally:
        lst.close()


def test_manual_mode_applies_only_at_apply_pending():
    model, opt = make_model()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, apply="manual", poll_interval=0.01)
    try:
        ch.publish(1, lr=(1e-3, 2e-3))
        wait_for(lambda: lst._pending)
        train_step(model, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
        done = lst.apply_pending(step=42)
        assert [u.seq for u in done] == [1]
        assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)
        wait_for(lambda: 1 in ch.acks)
        assert ch.acks[1].applied_step == 42
    finally:
        lst.close()


def test_recipe_knobs_without_optimizer_apply_from_the_listener_thread():
    class Recipe:
        actor_lr = 3e-4
        ent_coef = 0.01

    recipe = Recipe()
    ch = FakeChannel()
    lst = atm.listen(knobs={"actor_lr": atm.attr(recipe, "actor_lr"), "ent_coef": atm.attr(recipe, "ent_coef")},
                     channel=ch, poll_interval=0.01)
    try:
        wait_for(lambda: ch.infos)
        assert ch.infos[0].values == {"actor_lr": pytest.approx(3e-4), "ent_coef": pytest.approx(0.01)}
        ch.publish(1, actor_lr=(3e-4, 6e-4))
        wait_for(lambda: 1 in ch.acks)
        assert recipe.actor_lr == pytest.approx(6e-4)
    finally:
        lst.close()


def test_failing_setter_and_unknown_knob_are_acked_as_failed_without_raising():
    model, opt = make_model()

    def broken(_v: float) -> None:
        raise RuntimeError("boom")

    ch = FakeChannel()
    with pytest.warns(UserWarning, match="no getter"):
        lst = atm.listen(opt, knobs={"aux": broken}, channel=ch, poll_interval=0.01)
    try:
        ch.publish(1, aux=(1.0, 2.0), nonexistent=(1.0, 2.0))
        wait_for(lambda: lst._pending)
        train_step(model, opt)  # must not raise
        wait_for(lambda: 1 in ch.acks)
        assert ch.acks[1].status == "failed"
        assert "boom" in ch.acks[1].error and "nonexistent: this job has no such knob" in ch.acks[1].error
    finally:
        lst.close()


def test_tracker_outage_never_reaches_training_and_acks_are_retried():
    model, opt = make_model()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        ch.publish(1, lr=(1e-3, 5e-4))
        wait_for(lambda: lst._pending)
        ch.fail = True
        for _ in range(3):
            train_step(model, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
        time.sleep(0.05)
        assert 1 not in ch.acks  # could not be written while down ...
        ch.fail = False
        wait_for(lambda: 1 in ch.acks)  # ... and arrives once the tracker is back
    finally:
        lst.close()


def test_stop_and_rollback_actions():
    model, opt = make_model()
    calls = []
    ch = FakeChannel()
    lst = atm.listen(opt, actions={"rollback": lambda: calls.append("rollback")}, channel=ch, poll_interval=0.01)
    try:
        ch.publish(1, action=Action.ROLLBACK)
        ch.publish(2, action=Action.STOP)
        wait_for(lambda: len(lst._pending) == 2)
        train_step(model, opt)
        assert calls == ["rollback"]
        assert lst.stop_requested
        wait_for(lambda: 2 in ch.acks)
        assert ch.acks[1].status == "applied" and ch.acks[2].status == "applied"
    finally:
        lst.close()


def test_a_stop_is_said_in_the_jobs_console_without_any_logging_set_up(caplog):
    # A warning, which Python shows by default: a Trainer run ended at step 1030 of 1250 with no word.
    model, opt = make_model()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        with caplog.at_level("INFO", logger="atm.listener"):
            ch.publish(1, lr=(1e-3, 5e-4))
            ch.publish(2, action=Action.STOP)
            wait_for(lambda: len(lst._pending) == 2)
            train_step(model, opt)
            wait_for(lambda: 2 in ch.acks)
        levels = {r.getMessage().split(":")[0]: r.levelname for r in caplog.records if "atm update" in r.getMessage()}
        assert levels["atm update #1 applied at step 1"] == "INFO"
        stop = [r for r in caplog.records if "asked this job to stop" in r.getMessage()]
        assert len(stop) == 1 and stop[0].levelname == "WARNING" and "#2 at step 1" in stop[0].getMessage()
    finally:
        lst.close()


def test_lr_change_survives_a_lambda_scheduler_and_keeps_group_ratios():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    ch = FakeChannel()
    lst = atm.listen(opt, scheduler=sched, channel=ch, poll_interval=0.01)
    try:
        ch.publish(1, lr=(0.1, 0.05))
        wait_for(lambda: lst._pending)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()  # LambdaLR recomputes lr from base_lrs: the change must survive it
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.005])
    finally:
        lst.close()


def test_warns_about_a_scheduler_it_was_not_given(caplog):
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0)
    with caplog.at_level("WARNING", logger="atm.listener"):
        atm.listen(opt, channel=FakeChannel(), poll_interval=0.01).close()
    assert any("scheduler=sched" in r.getMessage() for r in caplog.records)


def test_weight_decay_keeps_no_decay_groups_at_zero():
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.1}, {"params": [model.bias], "weight_decay": 0.0}], lr=1e-3)
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        ch.publish(1, weight_decay=(0.1, 0.2))
        wait_for(lambda: lst._pending)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.2, 0.0])
    finally:
        lst.close()


@pytest.mark.parametrize("no_decay, expected", [((), [0.05, 0.05]), ((1,), [0.05, 0.0])])
def test_when_every_group_starts_at_zero_weight_decay_no_decay_says_which_groups_stay(no_decay, expected):
    # Seen in a user's job: both groups at 0 (the no-decay one for biases and embeddings), and a weight
    # decay change reached both; there is no telling them apart unless the job says which.
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW([{"params": [model.weight], "weight_decay": 0.0}, {"params": [model.bias], "weight_decay": 0.0}], lr=1e-3)
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01, no_decay=no_decay)
    try:
        ch.publish(1, weight_decay=(0.0, 0.05))
        wait_for(lambda: lst._pending)
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx(expected)
    finally:
        lst.close()
    with pytest.raises(ValueError, match=r"no_decay=\[2\]\): the optimizer has param groups 0..1, not \[2\]"):
        atm.listen(opt, channel=FakeChannel(), no_decay=[2])
    with pytest.raises(ValueError, match="names every param group"):
        atm.listen(opt, channel=FakeChannel(), no_decay=[0, 1])


def test_no_run_warns_once_and_does_nothing(monkeypatch):
    import atm.training.api as api

    monkeypatch.setattr(api, "_warned_no_run", False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    model, opt = make_model()
    with pytest.warns(UserWarning, match="no tracking run"):
        lst = atm.listen(opt, backend="wandb")
    assert not lst.attached
    train_step(model, opt)
    assert lst.apply_pending() == []
    lst.close()


def test_rejects_bad_arguments_with_clear_messages():
    with pytest.raises(TypeError, match="don't know how to control"):
        atm.listen(object(), channel=FakeChannel())
    with pytest.raises(ValueError, match="apply must be"):
        Listener(FakeChannel(), {}, apply="sometimes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="knob 'x'"):
        atm.listen(knobs={"x": 3}, channel=FakeChannel())


def test_changes_reach_the_optimizer_after_it_loaded_a_state_dict():
    # load_state_dict() replaces optimizer.param_groups: the knobs must follow the new list.
    model, opt = make_model()
    saved = opt.state_dict()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        opt.load_state_dict(saved)
        ch.publish(1, lr=(1e-3, 5e-4), weight_decay=(0.0, 0.1))
        wait_for(lambda: lst._pending)
        train_step(model, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1)
    finally:
        lst.close()


def test_a_rollback_that_restores_the_optimizer_keeps_the_changes_that_came_with_it():
    model, opt = make_model()
    best = opt.state_dict()  # lr 1e-3, weight decay 0
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01, actions={"rollback": lambda: opt.load_state_dict(best)})
    try:
        ch.publish(1, action=Action.ROLLBACK, lr=(1e-3, 5e-4), weight_decay=(0.0, 0.1))
        wait_for(lambda: lst._pending)
        train_step(model, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-4)
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(0.1)
        wait_for(lambda: 1 in ch.acks)
        assert ch.acks[1].status == "applied" and ch.acks[1].values["lr"] == pytest.approx(5e-4)
    finally:
        lst.close()


def test_a_rollback_done_later_in_the_loop_keeps_the_changes_with_keep_hyperparameters():
    # The handler only sets a flag; the loop restores model, optimizer and scheduler at its top, after
    # the listener applied the lr cut that came with the rollback. A plain load_state_dict undoes it.
    model, opt = make_model()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=100)
    best = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
            "sched": copy.deepcopy(sched.state_dict())}
    wanted = []
    ch = FakeChannel()
    lst = atm.listen(opt, scheduler=sched, channel=ch, poll_interval=0.01, actions={"rollback": lambda: wanted.append(1)})

    def restore() -> None:
        model.load_state_dict(best["model"])
        opt.load_state_dict(copy.deepcopy(best["opt"]))
        sched.load_state_dict(best["sched"])

    try:
        for _ in range(3):
            train_step(model, opt)
            sched.step()
        ch.publish(1, action=Action.ROLLBACK, lr=(opt.param_groups[0]["lr"], opt.param_groups[0]["lr"] / 2))
        wait_for(lambda: lst._pending)
        train_step(model, opt)  # applies the update: the flag is set, the lr halved
        assert wanted
        halved_max = opt.param_groups[0]["max_lr"]
        assert halved_max == pytest.approx(5e-4)
        with atm.keep_hyperparameters(opt, sched):
            restore()
        assert opt.param_groups[0]["max_lr"] == pytest.approx(halved_max)
        assert all(torch.equal(p, best["model"][k]) for k, p in model.state_dict().items())  # the weights did come back
        sched.step()
        assert opt.param_groups[0]["lr"] <= 5e-4  # the schedule goes on from the halved peak
        restore()  # without it, the checkpoint's peak comes back
        assert opt.param_groups[0]["max_lr"] == pytest.approx(1e-3)
    finally:
        lst.close()


def test_an_lr_cut_that_comes_with_a_rollback_cuts_the_lr_the_job_had_not_the_restored_one():
    # The checkpoint was taken at lr 1e-3; the job has since gone to 5e-4; the manager halves 5e-4 and
    # rolls back. Halving what the restore brought back (1e-3) would leave the lr where it was.
    model, opt = make_model()
    best = copy.deepcopy(opt.state_dict())  # lr 1e-3
    opt.param_groups[0]["lr"] = 5e-4
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01, actions={"rollback": lambda: opt.load_state_dict(copy.deepcopy(best))})
    try:
        ch.publish(1, action=Action.ROLLBACK, lr=(5e-4, 2.5e-4))
        wait_for(lambda: lst._pending)
        train_step(model, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    finally:
        lst.close()


def test_an_lr_cut_decided_on_an_older_value_still_cuts_the_lr_in_force():
    # The manager read lr 1e-3 and halved it; by the time the job applies it, its scheduler has
    # decayed the lr to 1e-4. Setting 5e-4 would raise it fivefold; halving what is in force is the move.
    model, opt = make_model()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 if s >= 1 else 1.0)
    ch = FakeChannel()
    lst = atm.listen(opt, scheduler=sched, channel=ch, poll_interval=0.01)
    try:
        train_step(model, opt)
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
        ch.publish(1, lr=(1e-3, 5e-4))
        wait_for(lambda: lst._pending)
        train_step(model, opt)
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-5)
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-5)  # the schedule's base was halved too
    finally:
        lst.close()


def test_values_moved_by_a_scheduler_are_announced_again(monkeypatch):
    import atm.training.listener as listener_mod

    monkeypatch.setattr(listener_mod, "VALUES_REFRESH_S", 0.0)
    model, opt = make_model()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        wait_for(lambda: ch.infos)
        assert ch.infos[-1].values["lr"] == pytest.approx(1e-3)
        opt.param_groups[0]["lr"] = 2e-4  # what a scheduler does at every step
        wait_for(lambda: ch.infos[-1].values["lr"] == pytest.approx(2e-4))
        # The atm/lr chart gets the moved value too, not only the values at interventions.
        assert any(values.get("lr") == pytest.approx(2e-4) for values, _ in ch.metrics), ch.metrics
    finally:
        lst.close()


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "ExponentialLR": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=20, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=6, eta_min=1e-4),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=30),
    "LinearLR": lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=10),
    "PolynomialLR": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=20, power=2.0),
    # Warm-up then cosine to an absolute floor: the cosine child's eta_min must be scaled too (seen in a
    # user's job: a cut below the floor was undone as the schedule annealed).
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(o, [
        torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=3),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=5e-4)], milestones=[3]),
    "ChainedScheduler": lambda o: torch.optim.lr_scheduler.ChainedScheduler([
        torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95),
        torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=5e-4)]),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_an_lr_change_scales_the_whole_schedule_from_then_on(name):
    # Two identical jobs; in one the lr is halved at step 5. Every later lr must be half the other's.
    runs = []
    for managed in (False, True):
        model, opt = make_model()
        sched = SCHEDULERS[name](opt)
        ch = FakeChannel()
        lst = atm.listen(opt, scheduler=sched, channel=ch, poll_interval=0.01) if managed else None
        lrs = []
        for step in range(20):
            if managed and step == 5:
                now = opt.param_groups[0]["lr"]
                ch.publish(1, lr=(now, now / 2))
                wait_for(lambda: lst._pending)
            train_step(model, opt)  # a change arriving now applies before this step
            lrs.append(opt.param_groups[0]["lr"])
            sched.step()
        if lst is not None:
            lst.close()
        runs.append(lrs)
    plain, halved = runs
    assert halved[:5] == pytest.approx(plain[:5])
    assert [h / p for h, p in zip(halved[5:], plain[5:])] == pytest.approx([0.5] * 15)


def test_a_stop_is_on_the_run_before_the_job_gets_to_finish_it():
    # The job breaks out of its loop at once and finishes its run (wandb.finish()): the stop's ack and
    # its record must already be written by then, not on the listener's next cycle.
    model, opt = make_model()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=60.0)
    try:
        ch.publish(1, action=Action.STOP)
        lst._wake.set()
        wait_for(lambda: lst._pending)
        train_step(model, opt)
        assert lst.stop_requested and 1 in ch.acks  # no waiting: written in the training thread
    finally:
        lst.close()


def test_a_run_id_the_tracker_does_not_know_is_said_so(caplog):
    from atm.adapters.base import RunNotFound

    class UnknownRun(FakeChannel):
        """Fake channel of a run the tracker does not have (a mistyped run_id)."""

        def fetch(self, after_seq: int):
            raise RunNotFound("run 'abc' not found (fake)")

    model, opt = make_model()
    with caplog.at_level("WARNING", logger="atm.listener"):
        lst = atm.listen(opt, channel=UnknownRun(run_id="abc"), poll_interval=0.01)
        try:
            wait_for(lambda: any("has no run" in r.getMessage() for r in caplog.records))
            train_step(model, opt)  # training goes on
        finally:
            lst.close()
    msg = next(r.getMessage() for r in caplog.records if "has no run" in r.getMessage())
    assert "'abc'" in msg and "check the run_id" in msg and "not reachable" not in msg


@pytest.mark.parametrize("make, l2", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), True),
    (lambda p: torch.optim.Adam(p, lr=1e-3), True),
    (lambda p: torch.optim.RMSprop(p, lr=1e-3), True),
    (lambda p: torch.optim.AdamW(p, lr=1e-3), False),
    (lambda p: torch.optim.NAdam(p, lr=1e-3, decoupled_weight_decay=True), False),
])
def test_the_listener_says_which_weight_decay_is_an_l2_penalty(make, l2) -> None:
    # The manager offers a weight decay from 0 only at L2 scale to these (atm.policies.l2_choices).
    model = nn.Linear(3, 1)
    ch = FakeChannel()
    lst = atm.listen(make(model.parameters()), channel=ch, poll_interval=0.01)
    try:
        wait_for(lambda: ch.infos)
        assert "weight_decay" in ch.infos[0].knobs
        assert ch.infos[0].l2_knobs == (["weight_decay"] if l2 else [])
    finally:
        lst.close()


def test_the_listener_says_when_a_schedule_moves_the_lr() -> None:
    # The rules do not read a scheduled lr logged once as a constant one (lr_too_low).
    for sched in (None, "given", "attached"):
        model = nn.Linear(3, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        s = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, (e + 1) / 30)) if sched else None
        ch = FakeChannel()
        lst = atm.listen(opt, scheduler=s if sched == "given" else None, channel=ch, poll_interval=0.01)
        try:
            wait_for(lambda: ch.infos)
            assert ch.infos[0].scheduled_knobs == ([] if sched is None else ["lr"]), sched
        finally:
            lst.close()
