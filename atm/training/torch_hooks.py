"""PyTorch appliers: optimizer parameter groups (and the LR scheduler on top of them), dropout."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from atm.training.listener import Knob

log = logging.getLogger("atm.listener")

#: Param-group keys that hold a learning rate which a scheduler may read back later.
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
#: Scheduler attributes (lists, one per group) that it computes the lr from.
_SCHEDULER_LRS = ("base_lrs", "max_lrs", "min_lrs")


def optimizer_knobs(optimizer: Any, scheduler: Any = None, no_decay: Sequence[int] = ()) -> dict[str, Knob]:
    """Knobs for every hyperparameter the optimizer's groups carry: lr, weight_decay, momentum, betas.

    A change is applied to every parameter group as a ratio of group 0's value, so groups with
    different learning rates (a backbone at lr/10) keep their proportions. Learning-rate changes
    scale the lrs a scheduler may read back from the param groups (``initial_lr``, OneCycleLR's
    ``max_lr`` and ``min_lr``) and, given the scheduler, its own base values (``base_lrs``, ``eta_min``)
    so that LambdaLR, CyclicLR, warm restarts and SequentialLR's next schedule do not silently undo
    them. Without the scheduler, an lr change is read back when the lr next moves, and a change that
    was undone is said in the job's log with its cause and fix, and the change is acknowledged as
    ``undone`` (PyTorch keeps no reference from an optimizer to its schedulers, so none can be found
    to scale).

    ``no_decay``: indices of param groups whose weight decay stays as it is (biases, norms,
    embeddings). Without it a group at 0 is left alone while another group has a weight decay; when
    every group starts at 0 none can be told apart, and a change sets them all.

    Raises:
        ValueError: a ``no_decay`` index that is not a param group of the optimizer, or all of them.
    """
    fixed = frozenset(no_decay)
    bad = sorted(i for i in fixed if not 0 <= i < len(optimizer.param_groups))
    if bad:
        raise ValueError(f"atm.listen(no_decay={sorted(fixed)}): the optimizer has param groups "
                         f"0..{len(optimizer.param_groups) - 1}, not {bad}")
    if fixed and len(fixed) == len(optimizer.param_groups):
        raise ValueError(f"atm.listen(no_decay={sorted(fixed)}) names every param group, so no weight decay would "
                         "ever change: freeze it in the policy instead (frozen: [weight_decay])")
    # Read the groups at each use: optimizer.load_state_dict() (a rollback) replaces the list.
    def groups() -> list[dict[str, Any]]:
        return optimizer.param_groups

    knobs: dict[str, Knob] = {}
    scheduled = scheduler is None and _has_scheduler(optimizer)
    if scheduled:
        # Measured for each scheduler named, in tests/training/test_scheduler_warning.py. OneCycleLR reads
        # its lrs from the param groups (initial_lr, max_lr, min_lr), which scale_lr scales: it keeps a change.
        log.warning(
            "atm: an LR scheduler is attached to this optimizer and was not given to atm; pass it, "
            "atm.listen(optimizer, scheduler=sched), so that an lr change scales the schedule itself. Without it, "
            "LambdaLR (the Hugging Face warm-up schedules too), CyclicLR and CosineAnnealingWarmRestarts undo a "
            "change at their next step, SequentialLR at its next milestone, and a CosineAnnealingLR with eta_min "
            "above 0 lets it fade as it anneals; OneCycleLR, CosineAnnealingLR, StepLR, ExponentialLR, LinearLR, "
            "PolynomialLR and the others that compute from the lr in force keep it"
        )

    def scale_lr(value: float) -> None:
        before = float(groups()[0]["lr"])
        ratio = _ratio(float(value), before)
        for g in groups():
            for key in _LR_KEYS:
                if isinstance(g.get(key), (int, float)):
                    g[key] = g[key] * ratio
        for sched in _nested(scheduler):
            for attr in _SCHEDULER_LRS:
                vals = getattr(sched, attr, None)
                if isinstance(vals, list):
                    setattr(sched, attr, [v * ratio for v in vals])
            # Cosine schedules anneal towards eta_min: scaled too, or the change fades out as they anneal.
            if isinstance(getattr(sched, "eta_min", None), (int, float)):
                sched.eta_min = sched.eta_min * ratio
            # ReduceLROnPlateau keeps its own floor per group.
            if isinstance(getattr(sched, "min_lrs", None), list) and hasattr(sched, "_last_lr"):
                sched._last_lr = [g["lr"] for g in groups()]

    # The listener reads a change back when the lr next moves (atm.training.listener.undone); this knob
    # knows the likely cause of an undone lr change.
    knobs["lr"] = Knob(get=lambda: float(groups()[0]["lr"]), set=scale_lr,
                       undo_note=lambda b, a, n: undone_note(b, a, n, scheduler is None and _has_scheduler(optimizer)),
                       read_back=scheduler is None, scheduled=lambda: scheduler is not None or _has_scheduler(optimizer))
    def decayed() -> list[dict[str, Any]]:
        return [g for i, g in enumerate(groups()) if i not in fixed]

    for key in ("weight_decay", "momentum"):
        if key in groups()[0]:
            which = decayed if key == "weight_decay" else groups
            knobs[key] = Knob(get=_getter(which, key), set=_group_setter(which, key),
                              l2=key == "weight_decay" and l2_weight_decay(optimizer))
    if "betas" in groups()[0]:
        for i, name in enumerate(("beta1", "beta2")):
            knobs[name] = Knob(get=lambda i=i: float(groups()[0]["betas"][i]), set=_beta_setter(groups, i))
    return knobs


#: Optimizers whose ``weight_decay`` is decoupled from the gradient (applied to the weights directly).
_DECOUPLED = ("AdamW", "Lion", "Adafactor", "LAMB", "Lamb")


def l2_weight_decay(optimizer: Any) -> bool:
    """Whether the optimizer adds its ``weight_decay`` to the gradient, an L2 penalty (torch.optim.SGD,
    Adam, RMSprop, Adagrad, and NAdam or RAdam unless ``decoupled_weight_decay=True``), rather than
    decaying the weights apart from it (AdamW). An L2 penalty passes through the optimizer's scaling:
    under Adam, 0.05 shrinks each weight by up to the lr every step once the loss's gradient is small,
    where AdamW's 0.05 shrinks it by lr x 0.05. Unknown optimizers count as decoupled (as before)."""
    if any(g.get("decoupled_weight_decay") for g in optimizer.param_groups):
        return False
    names = {c.__name__ for c in type(optimizer).__mro__}
    if names & set(_DECOUPLED):
        return False
    import torch

    coupled = tuple(c for c in (getattr(torch.optim, n, None) for n in
                                ("SGD", "Adam", "RMSprop", "Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD"))
                    if c is not None)
    return isinstance(optimizer, coupled)  # AdamW, an Adam subclass, was answered by its name above


def _nested(scheduler: Any) -> list[Any]:
    """The scheduler and those it runs (SequentialLR's and ChainedScheduler's ``_schedulers``, at any
    depth): a warm-up then cosine schedule is a SequentialLR whose cosine child anneals towards its own
    ``eta_min``, which would undo an lr cut if only the parent were scaled (seen in a user's job)."""
    if scheduler is None:
        return []
    out, todo = [], [scheduler]
    while todo:
        s = todo.pop(0)
        if any(s is seen for seen in out):
            continue
        out.append(s)
        todo += [c for c in getattr(s, "_schedulers", None) or [] if c is not None]
    return out


def _has_scheduler(optimizer: Any) -> bool:
    """Whether an LR scheduler was made on this optimizer. PyTorch's schedulers keep a reference to the
    optimizer but not the other way round; they do leave ``initial_lr`` in every param group and wrap
    ``optimizer.step`` (the wrapper holds only a weak reference to the optimizer, not the scheduler)."""
    return bool(getattr(optimizer.step, "_wrapped_by_lr_sched", False)) or any(
        "initial_lr" in g for g in optimizer.param_groups
    )


def undone_note(before: float, after: float, now: float, scheduled: bool) -> str:
    """What undid an lr change and how to fix it, for the job's log. Pure."""
    head = f"the lr change {before:.4g} -> {after:.4g} was undone (the lr is {now:.4g} again). "
    if scheduled:
        return head + (
            "An LR scheduler made on this optimizer was not given to atm: LambdaLR (and the HF warm-up "
            "schedules built on it), CyclicLR and warm restarts recompute the lr from their own base values at "
            "every step, SequentialLR at each milestone. Pass it, atm.listen(optimizer, scheduler=sched), so a "
            "change scales the schedule itself."
        )
    return head + (
        "Something in the job sets the lr itself (code that writes param_groups' lr from a config at every "
        "update, or a restore of the optimizer's state): point the knob at what that code reads, "
        "knobs={'lr': atm.attr(config, 'lr')} without the optimizer, or restore inside atm.keep_hyperparameters."
    )


def _ratio(new: float, old: float) -> float:
    if old == 0:
        raise ValueError("learning rate is 0 in group 0; cannot scale the groups proportionally")
    return new / old


def _reference(groups: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The group whose value stands for the knob: the first non-zero one (no-decay groups sit at 0)."""
    return next((g for g in groups if g[key] != 0), groups[0])


Groups = Callable[[], list[dict[str, Any]]]


def _getter(groups: Groups, key: str) -> Any:
    return lambda: float(_reference(groups(), key)[key])


def _group_setter(groups: Groups, key: str) -> Any:
    def set_all(value: float) -> None:
        old = float(_reference(groups(), key)[key])
        if old == 0:
            # Every group is at 0, so none can be told apart as a deliberate no-decay group.
            for g in groups():
                g[key] = float(value)
            return
        for g in groups():
            if g[key] != 0:  # groups that opted out stay out; the others keep their proportions
                g[key] = g[key] * (float(value) / old)

    return set_all


def _beta_setter(groups: Groups, i: int) -> Any:
    def set_beta(value: float) -> None:
        for g in groups():
            b = list(g["betas"])
            b[i] = float(value)
            g["betas"] = tuple(b)
    return set_beta


@contextlib.contextmanager
def keep_hyperparameters(optimizer: Any, scheduler: Any = None) -> Iterator[None]:
    """Restore a checkpoint inside this block and keep the hyperparameters in force.

    ``optimizer.load_state_dict()`` (and ``scheduler.load_state_dict()``) bring back the checkpoint's
    lr, weight decay and schedule too, silently undoing what the manager changed: a rollback usually
    arrives together with a smaller lr. Weights and optimizer moments come from the checkpoint; every
    param-group setting except ``params`` and, if given, the scheduler's scaled base values stay as
    they were before the block.
    """
    groups = [{k: copy.copy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    scheds = _nested(scheduler)
    kept_lrs = [{a: list(getattr(s, a)) for a in _SCHEDULER_LRS if isinstance(getattr(s, a, None), list)} for s in scheds]
    eta_mins = [getattr(s, "eta_min", None) for s in scheds]
    yield
    if len(optimizer.param_groups) != len(groups):
        log.warning("atm: the restored optimizer has %d param groups, not %d; its hyperparameters were left "
                    "as restored", len(optimizer.param_groups), len(groups))
        return
    for group, kept in zip(optimizer.param_groups, groups):
        group.update(kept)
    for s, lrs, eta_min in zip(scheds, kept_lrs, eta_mins):
        for a, vals in lrs.items():
            setattr(s, a, vals)
        if isinstance(eta_min, (int, float)):
            s.eta_min = eta_min


def dropout_knob(model: Any) -> Knob:
    """A knob that sets ``p`` of every ``nn.Dropout*`` module in ``model`` (and attention dropout of
    ``nn.MultiheadAttention``). ``atm.listen(opt, knobs={"dropout": atm.dropout(model)})``."""
    import torch.nn as nn

    mods = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    attn = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not mods and not attn:
        raise ValueError("the model has no nn.Dropout or nn.MultiheadAttention modules to control")

    def get() -> float:
        return float(mods[0].p if mods else attn[0].dropout)

    def set_p(value: float) -> None:
        for m in mods:
            m.p = float(value)
        for m in attn:
            m.dropout = float(value)

    return Knob(get=get, set=set_p)
