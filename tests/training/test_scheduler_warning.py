"""The warning for a scheduler not given to ``atm.listen`` names the schedulers that undo an lr change
without ``scheduler=``, and no other: each one is run here, for real, with and without the change.

A user's OneCycleLR kept a halving made without ``scheduler=`` (atm scales the ``initial_lr``,
``max_lr`` and ``min_lr`` it reads from the param groups) while the warning listed it among the
schedulers that would undo it.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import atm
from atm.testing import FakeChannel, wait_for

S = torch.optim.lr_scheduler
CHANGE_AT, STEPS = 5, 20

#: name in the warning, the scheduler, what it does to a halving made without scheduler=.
CASES = [
    ("LambdaLR", lambda o: S.LambdaLR(o, lambda s: 1.0 / (1 + s)), "undone"),
    ("CyclicLR", lambda o: S.CyclicLR(o, base_lr=1e-4, max_lr=1e-2, step_size_up=4), "undone"),
    ("CosineAnnealingWarmRestarts", lambda o: S.CosineAnnealingWarmRestarts(o, T_0=6), "undone"),
    # Warm-up then cosine, the change made during the warm-up: undone at the milestone.
    ("SequentialLR", lambda o: S.SequentialLR(o, [S.LinearLR(o, start_factor=0.2, total_iters=8),
                                                  S.CosineAnnealingLR(o, T_max=40)], milestones=[8]), "undone"),
    ("CosineAnnealingLR with eta_min above 0", lambda o: S.CosineAnnealingLR(o, T_max=20, eta_min=1e-3), "fades"),
    ("OneCycleLR", lambda o: S.OneCycleLR(o, max_lr=1e-2, total_steps=30), "kept"),
    ("CosineAnnealingLR", lambda o: S.CosineAnnealingLR(o, T_max=40), "kept"),
    ("StepLR", lambda o: S.StepLR(o, step_size=3, gamma=0.5), "kept"),
    ("ExponentialLR", lambda o: S.ExponentialLR(o, gamma=0.9), "kept"),
    ("LinearLR", lambda o: S.LinearLR(o, start_factor=0.2, total_iters=10), "kept"),
    ("PolynomialLR", lambda o: S.PolynomialLR(o, total_iters=30, power=2.0), "kept"),
]


def lrs(make, halve: bool, caplog) -> list[float]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sched = make(opt)
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01) if halve else None
    out = []
    try:
        for i in range(STEPS):
            if lst is not None and i == CHANGE_AT:
                now = opt.param_groups[0]["lr"]
                ch.publish(1, lr=(now, now / 2))
                wait_for(lambda: lst._pending)
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()
            out.append(opt.param_groups[0]["lr"])
            sched.step()
    finally:
        if lst is not None:
            lst.close()
    return out


@pytest.mark.parametrize("name, make, expected", CASES, ids=[c[0] for c in CASES])
def test_the_warning_names_exactly_the_schedulers_that_undo_a_change(name, make, expected, caplog) -> None:
    plain = lrs(make, halve=False, caplog=caplog)
    with caplog.at_level(logging.WARNING, logger="atm.listener"):
        halved = lrs(make, halve=True, caplog=caplog)
    ratios = [h / p for h, p in zip(halved[CHANGE_AT:], plain[CHANGE_AT:]) if p > 0]
    assert ratios[0] == pytest.approx(0.5)
    observed = ("kept" if ratios == pytest.approx([0.5] * len(ratios)) else
                "undone" if any(r == pytest.approx(1.0) for r in ratios) else "fades")
    assert observed == expected, ratios
    (warning,) = [r.getMessage() for r in caplog.records if "is attached to this optimizer" in r.getMessage()]
    undoing, _, keeping = warning.partition("Without it, ")[2].partition("; ")
    if expected == "kept":
        assert name in keeping and name not in undoing.replace("a CosineAnnealingLR with eta_min above 0", ""), warning
    else:
        assert name in undoing, warning
