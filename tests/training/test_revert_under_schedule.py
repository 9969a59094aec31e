"""An lr change set back under a CosineAnnealingLR the job passed to atm: the schedule goes on as if
the change had never been made. Real torch optimizer and scheduler, through the listener's hooks;
the tracker side is ``FakeChannel``, the decision the validator's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import atm
from atm.policies import DecisionContext, available_choices, check, load_policy
from atm.schema import Diagnosis, EffectLabel, Outcome, TelemetrySnapshot
from atm.signing import sign
from atm.testing import FakeChannel, make_record, wait_for
from atm.watcher.proposer import Offer
from atm.watcher.rules import revert_proposal

LM = load_policy("lm")
STEPS, HALVED_AT, REVERTED_AT = 200, 20, 190  # the revert at 95% of the schedule


def job() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)


def step(model: nn.Module, opt: torch.optim.Optimizer, sched) -> float:
    opt.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    used = opt.param_groups[0]["lr"]
    sched.step()
    return used


def test_setting_back_a_halving_late_in_a_cosine_schedule_undoes_only_the_halving() -> None:
    plain = [step(*unmanaged) for unmanaged in [job()] for _ in range(STEPS)]  # the same job, left alone
    model, opt, sched = job()

    ch = FakeChannel()
    lst = atm.listen(opt, scheduler=sched, channel=ch, poll_interval=0.01)
    try:
        used = [step(model, opt, sched) for _ in range(HALVED_AT)]
        now = opt.param_groups[0]["lr"]
        ch.publish(1, lr=(now, now / 2))
        wait_for(lambda: lst._pending)
        used += [step(model, opt, sched) for _ in range(REVERTED_AT - HALVED_AT)]
        assert used[HALVED_AT:] == pytest.approx([p / 2 for p in plain[HALVED_AT:REVERTED_AT]])

        # The halving was measured to hurt: the rules set it back, the validator checks it, the job applies it.
        applied = ch.acks[1]
        rec = make_record(1, HALVED_AT, changes={"lr": (now, now / 2)}, diagnosis=Diagnosis.PLATEAU,
                          applied_step=applied.applied_step)
        rec = rec.model_copy(update={"applied_values": applied.values,
                                     "effect": Outcome(label=EffectLabel.HURT, metric="val_loss")})
        ctx = DecisionContext(step=REVERTED_AT, params={"lr": opt.param_groups[0]["lr"]}, history=[rec],
                              eval_steps=tuple(range(10, REVERTED_AT + 1, 10)))
        proposal = revert_proposal(TelemetrySnapshot(run_id="r", step=REVERTED_AT), ctx,
                                   Offer(choices=available_choices(LM, ctx), actions=[]))
        assert proposal is not None and proposal.reverts == 1
        verdict = check(proposal, LM, ctx)
        assert verdict.accepted, verdict.reason
        update = ch.update(2, step=REVERTED_AT).model_copy(update={"changes": verdict.changes})
        ch.put(sign(update, ch.keys.get()))
        wait_for(lambda: lst._pending)
        used += [step(model, opt, sched) for _ in range(STEPS - REVERTED_AT)]
    finally:
        lst.close()
    assert ch.acks[2].status == "applied", ch.acks[2]
    # From the revert on, the lr is the unmanaged schedule's: the halving undone, the annealing kept.
    assert used[REVERTED_AT:] == pytest.approx(plain[REVERTED_AT:], rel=1e-6)
    assert sched.base_lrs == pytest.approx([0.1])
