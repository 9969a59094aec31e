"""Decide: everything a proposer is handed for one decision (snapshot, context, offer), built the same
way for a live run, for ``atm explain`` and for runs held in memory (scenarios, worked examples)."""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from atm.adapters.base import RunView
from atm.policies import DecisionContext, Policy, available_actions, available_choices, l2_choices, max_factor
from atm.schema import Action, DecisionRecord, Diagnosis, Status, TelemetrySnapshot, in_force
from atm.watcher.poll import run_step
from atm.watcher.proposer import Offer
from atm.watcher.snapshot import Points, RunTelemetry, build_snapshot, eval_steps


class Situation(BaseModel):
    """What a proposer is handed for one decision."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    snapshot: TelemetrySnapshot
    policy: Policy
    ctx: DecisionContext
    offer: Offer


def decision_context(
    policy: Policy,
    view: RunView,
    records: Sequence[DecisionRecord],
    params: dict[str, float],
    *,
    dry_run: bool = False,
    telemetry: RunTelemetry | None = None,
) -> DecisionContext:
    """The validator's view of a run: its step, evaluations, parameter values and decisions so far.

    With the run's ``telemetry``, the evaluations come from it (folded up to ``view`` first);
    without, from ``view.history`` read whole.
    """
    if telemetry is not None:
        telemetry.fold(view.history)
        # A copy: the proposer reads it on a worker while the run's telemetry takes new points.
        steps: Sequence[int] = array("q", telemetry.eval_steps())
    else:
        steps = eval_steps(policy, view.history)
    return DecisionContext(step=run_step(view), params=params, history=list(records), eval_steps=steps,
                           dry_run=dry_run)


def decision_inputs(
    policy: Policy,
    view: RunView,
    records: Sequence[DecisionRecord],
    now: float | None = None,
    *,
    dry_run: bool = False,
    telemetry: RunTelemetry | None = None,
) -> tuple[TelemetrySnapshot, DecisionContext, Offer]:
    """Everything a proposer is given for a run as it is now: snapshot, context and the offer.

    Used by the daemon before each decision, with the run's ``telemetry`` (only what is new is
    folded in), and by ``atm explain``, which reads the run whole, to show the same thing.
    """
    telemetry = telemetry or RunTelemetry(policy)
    params = dict(view.listener.values) if view.listener else {}
    ctx = decision_context(policy, view, records, params, dry_run=dry_run, telemetry=telemetry)
    snapshot = telemetry.snapshot(view.run_id, params, records, run_name=view.name, now=now)
    if view.listener is not None and "lr" in view.listener.scheduled_knobs:
        snapshot.signals["lr_scheduled"] = True
    allowed = set(view.listener.actions) if view.listener else set()
    if any(r.action == Action.STOP and r.status == Status.APPLIED for r in records):
        # The job was told to stop and goes on: asking again would only use up the budget.
        allowed.discard(Action.STOP.value)
    offer = Offer(
        choices=l2_choices(available_choices(policy, ctx), params, view.listener.l2_knobs if view.listener else ()),
        actions=[a for a in available_actions(policy, ctx) if a.value in allowed],
    )
    return snapshot, ctx, offer


def offline_situation(
    name: str,
    policy: Policy,
    history: Mapping[str, Points],
    params: Mapping[str, float],
    records: Sequence[DecisionRecord] = (),
    run_name: str = "",
) -> Situation:
    """The same for metric history held in memory (key -> sorted (step, value)), taken at time 0.

    Every action the policy allows is offered (a live run offers only those its job registered).
    """
    snap = build_snapshot(name, policy, history, params, records=records, run_name=run_name, now=0.0)
    ctx = DecisionContext(
        step=snap.step, params=dict(params), history=list(records), eval_steps=eval_steps(policy, history)
    )
    offer = Offer(choices=available_choices(policy, ctx), actions=available_actions(policy, ctx))
    return Situation(snapshot=snap, policy=policy, ctx=ctx, offer=offer)


def rebase(changes: dict[str, float], decided: dict[str, float], now: dict[str, float], policy: Policy) -> dict[str, float]:
    """Proposed values re-expressed on the values in force: each change's ratio to the value it was
    decided on, applied to the value now (see :func:`atm.schema.in_force`), within the parameter's
    largest multiplier, the bound the listener holds the change to. Pure."""

    def bound(k: str) -> float | None:
        rule = policy.params.get(k)
        return max_factor(rule) if rule is not None else None

    return {k: in_force(decided[k], v, now[k], bound(k)) if k in decided and k in now else v
            for k, v in changes.items()}


def still_current(decided: Diagnosis, now: Diagnosis) -> bool:
    """Whether a late answer to ``decided`` still answers the run as it is ``now``. Pure."""
    return decided == now and decided not in (Diagnosis.HEALTHY, Diagnosis.INSUFFICIENT_DATA)
