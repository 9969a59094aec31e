"""The deterministic policy validator: pure functions from (proposal, policy, context) to a verdict.

Whatever a proposer says, only what passes :func:`check` reaches a training job. The same
:func:`choices` that the validator accepts is what the LLM is offered, so the model is never
shown a move the validator would refuse for its value.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from atm.policies._schema import ActionRule, ParamRule, Policy, Window
from atm.schema import Action, Change, DecisionRecord, Diagnosis, Proposal, Status, Verdict, fmt

#: Decisions that count against cooldowns and budgets: they reached (or would reach) the job; one
#: held for a person's approval counts until it is rejected or expires.
#: A dry run counts its own previews too, so that it shows the manager's pace; a live daemon
#: does not count an earlier dry run's, which never reached the job.
#: One the job undid counts too: it was applied, and moving the parameter again soon would be undone alike.
COUNTED = (Status.APPLIED, Status.PENDING, Status.AWAITING_APPROVAL, Status.UNDONE)
COUNTED_DRY = (*COUNTED, Status.DRY_RUN)

_REL_TOL = 1e-6


@dataclass(frozen=True)
class DecisionContext:
    """What the validator needs to know about the run, besides the proposal."""

    step: int
    #: Current parameter values as the job last reported them.
    params: dict[str, float]
    #: Earlier decisions for this run, any status, in seq order.
    history: Sequence[DecisionRecord] = ()
    #: Sorted steps at which the policy's ``eval_metric`` was logged.
    eval_steps: Sequence[int] = field(default_factory=tuple)
    #: Deciding for a dry run: its own previews count as interventions.
    dry_run: bool = False

    def evals_between(self, start: int, end: int) -> int:
        """Evaluations logged in the half-open span (start, end]."""
        return bisect.bisect_right(self.eval_steps, end) - bisect.bisect_right(self.eval_steps, start)

    def passed(self, since: int, window: Window) -> bool:
        """Whether ``window`` has fully passed between step ``since`` and now."""
        return self.step - since >= window.steps and self.evals_between(since, self.step) >= window.evals

    def reached(self, window: Window) -> bool:
        """Whether the run is at least ``window`` into training.

        Unlike ``passed(0, window)``, an evaluation logged at step 0 counts: metrics logged
        without ``step=`` are numbered from 0, and their first point is an evaluation too.
        """
        return self.step >= window.steps and bisect.bisect_right(self.eval_steps, self.step) >= window.evals

    def counted(self) -> list[DecisionRecord]:
        return [r for r in self.history if r.status in (COUNTED_DRY if self.dry_run else COUNTED)]


def choices(rule: ParamRule, current: float) -> list[float]:
    """The new values allowed for a parameter now at ``current``, sorted, excluding no-ops.

    Multiplier moves are clamped to [min, max]; a move that changes nothing after clamping,
    or that exceeds ``max_relative_change``, is not a choice.
    """
    raw = [min(max(current * m, rule.min), rule.max) for m in rule.multipliers] + list(rule.values)
    out: list[float] = []
    for v in raw:
        if rule.integer:
            v = float(round(v))
            if not rule.min <= v <= rule.max:
                continue
        if _same(v, current):
            continue
        if rule.max_relative_change is not None and current != 0:
            if abs(v - current) / abs(current) > rule.max_relative_change + _REL_TOL:
                continue
        if not any(_same(v, o) for o in out):
            out.append(v)
    return sorted(out)


def undo_value(change: Change, applied: float | None, now: float) -> float:
    """The value that undoes ``change`` (decided ``old -> new``, ``applied`` as the job reported it right
    after, None if unknown) of a parameter now at ``now``. Pure.

    The change, not what the job did since: when the value has moved since the change took effect (an
    LR scheduler anneals it, a warm-up raises it), the change's factor ``old / new`` applied to the
    value now; setting ``old`` as such would undo the schedule too (an lr annealed to 0.00052 set back
    to the 0.0666 of before a halving made early in the run, 128 times over). When it has not moved
    (within 1%, as :func:`atm.schema.in_force` reads it), ``old`` as it was. A change from or to 0 has
    no factor: ``old`` as it was.
    """
    at = change.new if applied is None else applied
    if change.old > 0 and change.new > 0 and now > 0 and not math.isclose(now, at, rel_tol=0.01):
        return now * change.old / change.new
    return change.old


def revert_value(name: str, rule: ParamRule, ctx: DecisionContext) -> float | None:
    """The value that undoes the latest applied change of ``name`` (see :func:`undo_value`), when it is
    not the value in force: always a move the policy allows, whatever the multipliers, so that a
    change measured to hurt can be undone. None when that value is outside the policy's bounds (a
    warm-up took the lr near its maximum since a halving: doubling it would pass the maximum)."""
    for rec in reversed(ctx.history):
        if rec.status == Status.APPLIED and name in rec.changes:
            current = ctx.params.get(name)
            if current is None:
                return None
            back = undo_value(rec.changes[name], rec.applied_values.get(name), current)
            if rule.integer:
                back = float(round(back))
            if _same(back, current) or not rule.min <= back <= rule.max:
                return None
            return back
    return None


def allowed_values(name: str, rule: ParamRule, ctx: DecisionContext) -> list[float]:
    """:func:`choices` from the value in force, plus setting back the latest applied change."""
    opts = choices(rule, ctx.params[name])
    back = revert_value(name, rule, ctx)
    if back is not None and not any(_same(back, o) for o in opts):
        opts = sorted([*opts, back])
    return opts


def unsettled(ctx: DecisionContext, diagnosis: object, window: Window) -> DecisionRecord | None:
    """The latest applied change for ``diagnosis`` while it is still being measured (its effect not
    judged, and fewer than ``window`` evaluations since it took effect), if any: another remedy for
    the same problem waits for its effect (``limits.settle``)."""
    if not (window.evals or window.steps):
        return None
    for rec in reversed(ctx.history):
        if rec.status == Status.APPLIED and rec.diagnosis == diagnosis:
            if rec.effect is not None:
                return None
            if rec.effective_step is None:
                return rec
            return None if ctx.passed(rec.effective_step - 1, window) else rec
    return None


def max_factor(rule: ParamRule) -> float | None:
    """The most one move of this parameter may multiply or divide it by: its largest multiplier.

    It travels in the signed update so the listener can refuse anything larger (see
    :func:`atm.schema.in_force`). None for a parameter moved only by set-values.
    """
    return max((max(m, 1 / m) for m in rule.multipliers), default=None)


def available_choices(policy: Policy, ctx: DecisionContext) -> dict[str, list[float]]:
    """Parameter -> allowed new values right now (cooldowns and budgets applied).

    Parameters the job has not reported, or that have no allowed move, are left out.
    """
    if _global_block(policy, ctx) is not None:
        return {}
    out: dict[str, list[float]] = {}
    for name in policy.controllable():
        if name not in ctx.params:
            continue
        rule = policy.params[name]
        if _param_block(name, rule, ctx) is not None:
            continue
        opts = allowed_values(name, rule, ctx)
        if opts:
            out[name] = opts
    return out


#: The largest weight decay offered from 0 to a knob the job's optimizer applies as an L2 penalty.
L2_FROM_ZERO_MAX = 1e-3
#: ... and from a value above 0, the largest factor it may be multiplied by.
L2_MAX_FACTOR = 2.0


def l2_choices(choices: Mapping[str, list[float]], params: Mapping[str, float],
               l2_knobs: Sequence[str]) -> dict[str, list[float]]:
    """The offer's values without the ones too large for a weight decay that is an L2 penalty
    (:attr:`atm.schema.ListenerInfo.l2_knobs`): from 0, none above :data:`L2_FROM_ZERO_MAX`; from a
    value, none above :data:`L2_MAX_FACTOR` times it. Pure.

    A policy's weight decay values (the lm preset's 0.01, 0.05, 0.1) are decoupled decay's (AdamW).
    Added to the gradient under Adam they pass through its normalisation: seen on a digits MLP under
    torch.optim.Adam, weight decay 0 -> 0.05 (with the lr halved and a rollback) took val loss from
    0.08 to 0.94 in three epochs, measured hurt; under SGD with momentum at lr 0.25, the same."""
    out = dict(choices)
    for name in l2_knobs:
        if name not in out or name not in params:
            continue
        now = params[name]
        cap = L2_FROM_ZERO_MAX if now == 0 else L2_MAX_FACTOR * now
        kept = [v for v in out[name] if v <= cap * (1 + 1e-9)]
        if kept:
            out[name] = kept
        else:
            del out[name]
    return out


def available_actions(policy: Policy, ctx: DecisionContext) -> list[Action]:
    if _global_block(policy, ctx) is not None:
        return []
    return [a for a, rule in policy.actions.items() if _action_block(a, rule, ctx) is None]


def check(proposal: Proposal, policy: Policy, ctx: DecisionContext) -> Verdict:
    """Validate a proposal against the policy. Pure: no I/O, no clock.

    Changes are judged one by one; the verdict accepts the ones that pass (up to
    ``limits.max_changes``, in the proposal's order) and names why each other one was dropped.
    The proposal is accepted when at least one change or the action survives.
    """
    if proposal.is_noop:
        return Verdict(accepted=False, reason="no change proposed")
    block = _global_block(policy, ctx) or _settle_block(proposal, policy, ctx)
    if block is not None:
        dropped = {p: block for p in proposal.changes}
        if proposal.action is not None:
            dropped[proposal.action.value] = block
        return Verdict(accepted=False, reason=block, dropped=dropped)

    accepted: dict[str, Change] = {}
    dropped: dict[str, str] = {}
    for name, new in proposal.changes.items():
        why = _change_block(name, new, policy, ctx)
        moved = {_group(n, policy) for n in accepted}
        if why is None and _group(name, policy) not in moved and len(moved) >= policy.limits.max_changes:
            why = f"at most {policy.limits.max_changes} parameters (or groups) may change at once"
        if why is not None:
            dropped[name] = why
            continue
        rule = policy.params[name]
        accepted[name] = Change(
            old=ctx.params[name], new=float(round(new)) if rule.integer else float(new),
            max_factor=max_factor(rule), min=rule.min,
        )

    action = proposal.action
    if action is not None:
        rule = policy.actions.get(action)
        why = f"action {action.value!r} is not allowed by this policy" if rule is None else _action_block(action, rule, ctx)
        if why is not None:
            dropped[action.value] = why
            action = None

    if not accepted and action is None:
        reason = "; ".join(f"{k}: {v}" for k, v in dropped.items())
        return Verdict(accepted=False, reason=f"rejected: {reason}", dropped=dropped)
    what = [f"{k} {fmt(c.old)} -> {fmt(c.new)}" for k, c in accepted.items()]
    if action is not None:
        what.append(action.value)
    reason = "within policy: " + ", ".join(what)
    if dropped:
        reason += "; dropped " + "; ".join(f"{k}: {v}" for k, v in dropped.items())
    return Verdict(accepted=True, reason=reason, changes=accepted, action=action, dropped=dropped)


# --------------------------------------------------------------------------- the rules themselves


def blocked(policy: Policy, ctx: DecisionContext) -> str | None:
    """Why no move at all may be made now (warm-up, the run's budget, the cooldown between any two
    interventions), or None. What the daemon's status and ``atm explain`` show while it waits."""
    return _global_block(policy, ctx)


def _global_block(policy: Policy, ctx: DecisionContext) -> str | None:
    lim = policy.limits
    if not ctx.reached(lim.warmup):
        why = f"warm-up: no intervention before {lim.warmup.describe()} (now at step {ctx.step}"
        evals = bisect.bisect_right(ctx.eval_steps, ctx.step)
        if lim.warmup.steps and ctx.step * 10 < lim.warmup.steps and evals >= max(lim.warmup.evals, 3):
            # A job that logs one step per update or epoch never reaches a warm-up in environment or
            # optimizer steps: say so, with the line that fixes it.
            return (f"{why}, after {evals} evaluations). If this run logs one step per update or epoch, "
                    f"count the warm-up in evaluations: limits: {{warmup: {{evals: {max(lim.warmup.evals, 2)}}}}}")
        return why + ")"
    counted = ctx.counted()
    stop = next((r for r in counted if r.action == Action.STOP), None)
    if stop is not None:
        # The manager judged that training should end. A job that goes on anyway (it never reads
        # listener.stop_requested) is the user's call; tuning it further contradicts that judgement,
        # and drove lr to its floor on such a job.
        if stop.status != Status.APPLIED:
            return f"stopped: the job was asked to stop at step {stop.step} (#{stop.seq})"
        return (f"stopped: the job was asked to stop at step {_at(stop)} (#{stop.seq}) and acknowledged it; if it "
                "keeps training, it does not act on stop (check listener.stop_requested in its loop, or remove stop "
                "from the policy's actions): nothing more is changed on this run")
    if lim.max_interventions is not None and len(counted) >= lim.max_interventions:
        return f"budget: the run already had {len(counted)} of {lim.max_interventions} interventions"
    if counted and not ctx.passed(counted[-1].counts_from(ctx.step), lim.cooldown):
        return f"cooldown: last intervention at step {_at(counted[-1])}, wait {lim.cooldown.describe()}"
    return None


def _group(name: str, policy: Policy) -> str:
    """The group a parameter moves with (members of one group count as one change), or itself."""
    rule = policy.params.get(name)
    return rule.group if rule is not None and rule.group else name


def _settle_block(proposal: Proposal, policy: Policy, ctx: DecisionContext) -> str | None:
    """A second remedy for a problem whose first is still being measured waits; not for divergence,
    where speed wins, nor for setting back a change measured to hurt."""
    if proposal.reverts is not None or proposal.diagnosis == Diagnosis.DIVERGENCE:
        return None
    waiting = unsettled(ctx, proposal.diagnosis, policy.limits.settle)
    if waiting is None:
        return None
    since = "" if waiting.effective_step is None else (
        f", {ctx.evals_between(waiting.effective_step - 1, ctx.step)} evaluation(s) since it took effect")
    return (f"settle: #{waiting.seq} for {proposal.diagnosis.value} is still being measured "
            f"(wait {policy.limits.settle.describe()}{since})")


def _param_block(name: str, rule: ParamRule, ctx: DecisionContext) -> str | None:
    mine = [r for r in ctx.counted() if name in r.changes]
    if mine and mine[-1].status == Status.UNDONE:
        # The job sets it back itself (a scheduler it did not give atm, a config it re-applies): another
        # move would be undone alike, so none is made on this run; the record says the fix.
        return f"the job undid the last change of {name} (#{mine[-1].seq}); fix the job as atm history says"
    if mine and not ctx.passed(mine[-1].counts_from(ctx.step), rule.cooldown):
        return f"cooldown: {name} last changed at step {_at(mine[-1])}, wait {rule.cooldown.describe()}"
    if rule.budget is not None and rule.budget_window is not None:
        recent = [r for r in mine if not ctx.passed(r.step, rule.budget_window)]
        if len(recent) >= rule.budget:
            return f"budget: {name} changed {len(recent)} times within {rule.budget_window.describe()} (limit {rule.budget})"
    return None


def _change_block(name: str, new: float, policy: Policy, ctx: DecisionContext) -> str | None:
    rule = policy.params.get(name)
    if rule is None:
        return f"not a parameter of this policy (allowed: {', '.join(policy.controllable()) or 'none'})"
    if name in policy.frozen:
        return "frozen by the policy"
    if name not in ctx.params:
        return "the job has not registered this parameter (pass it to atm.listen)"
    if not math.isfinite(new):
        return f"value {new} is not a finite number"
    if not rule.min <= new <= rule.max:
        return f"{fmt(new)} is outside [{fmt(rule.min)}, {fmt(rule.max)}]"
    current = ctx.params[name]
    if _same(new, current):
        return "no effect: already at that value"
    opts = allowed_values(name, rule, ctx)
    if not any(_same(new, o) for o in opts):
        if rule.max_relative_change is not None and current != 0:
            rel = abs(new - current) / abs(current)
            if rel > rule.max_relative_change + _REL_TOL:
                return (
                    f"{fmt(new)} changes {name} by {rel:.0%} of {fmt(current)}; max_relative_change allows "
                    f"{rule.max_relative_change:.0%} (allowed: {', '.join(fmt(o) for o in opts) or 'none'})"
                )
        return f"{fmt(new)} is not an allowed move from {fmt(current)} (allowed: {', '.join(fmt(o) for o in opts) or 'none'})"
    return _param_block(name, rule, ctx)


def _action_block(action: Action, rule: ActionRule, ctx: DecisionContext) -> str | None:
    if not ctx.reached(rule.not_before):
        return f"{action.value} not before {rule.not_before.describe()}"
    mine = [r for r in ctx.counted() if r.action == action]
    if mine and not ctx.passed(mine[-1].counts_from(ctx.step), rule.cooldown):
        return f"cooldown: {action.value} last at step {_at(mine[-1])}, wait {rule.cooldown.describe()}"
    return None


def _at(rec: DecisionRecord) -> str:
    if rec.status != Status.APPLIED or rec.effective_step == rec.step + 1:
        return str(rec.step)
    if rec.effective_step is None:
        return f"{rec.step} (applied, nothing logged since)"
    return f"{rec.step} (in effect from step {rec.effective_step})"


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_REL_TOL, abs_tol=1e-12)


