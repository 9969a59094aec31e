"""Poll: what one read of a run says about it, before any decision (its step, whether it is idle,
and what the user should be told once: knobs the policy does not control, values out of bounds,
metrics the policy expects and the run does not log). Pure functions of the run's view."""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from atm.adapters.base import RunView
from atm.policies import Policy
from atm.schema import fmt
from atm.watcher.snapshot import MISSING_METRIC_AFTER, missing_role_note

#: Seconds a listener may be attached to a run that logs no metric of its own before the daemon says so.
SILENT_JOB_S = 120.0
#: Knobs every torch optimizer offers, which policies rarely control: not worth a warning.
OPTIMIZER_EXTRAS = frozenset({"momentum", "beta1", "beta2"})


def run_step(view: RunView) -> int:
    """The run's latest logged step, not counting the listener's own ``atm/*`` metrics."""
    return max((pts[-1][0] for k, pts in view.history.items() if pts and not k.startswith("atm/")), default=0)


def logged_steps(view: RunView) -> int:
    """How many points the run's own busiest metric has (the listener's ``atm/*`` not counted)."""
    return max((len(pts) for k, pts in view.history.items() if not k.startswith("atm/")), default=0)


def is_idle(view: RunView, now: float, idle_minutes: float) -> bool:
    """Whether a run still marked running has logged nothing for ``idle_minutes``: a job killed by a
    signal stays RUNNING in MLflow forever."""
    return view.last_metric_time > 0 and now - view.last_metric_time > idle_minutes * 60


def unmanaged_knobs_note(policy: Policy, knobs: Sequence[str]) -> str:
    """Non-empty when the job registered knobs the policy does not control (often a typo on one side),
    naming the policy's parameter each most likely meant. Pure."""
    loose = [k for k in sorted(knobs) if k not in policy.params and k not in OPTIMIZER_EXTRAS]
    if not loose:
        return ""
    hints = []
    for k in loose:
        near = difflib.get_close_matches(k, [p for p in policy.params if p not in knobs], n=1, cutoff=0.75)
        hints.append(f"{k} (the policy has {near[0]!r}: a typo?)" if near else k)
    return (f"the job's knobs {', '.join(hints)} are not parameters of policy {policy.name}, so the manager never "
            f"changes them; it controls {', '.join(sorted(policy.params))}")


def listener_notes(policy: Policy, view: RunView) -> list[str]:
    """What to tell the user, once, when a listener is first seen: knobs the policy does not control,
    and values already outside the policy's bounds."""
    if view.listener is None:
        return []
    notes = []
    note = unmanaged_knobs_note(policy, view.listener.knobs)
    if note:
        notes.append(note)
    for name, value in sorted(view.listener.values.items()):
        rule = policy.params.get(name)
        if rule is not None and not rule.min <= value <= rule.max:
            notes.append(f"{name} is {fmt(value)}, outside the policy's [{fmt(rule.min)}, {fmt(rule.max)}]; a move "
                         "on it lands inside those bounds, however far that is")
    return notes


def metric_notes_due(view: RunView, now: float) -> bool:
    """Whether enough of the run is in to say which metrics it lacks: ``MISSING_METRIC_AFTER`` points,
    or a listener attached for ``SILENT_JOB_S`` to a job that logs nothing of its own (an SB3 script
    whose logger writes only to stdout never reaches that many points)."""
    own = logged_steps(view)
    silent = own == 0 and view.listener is not None and now - view.listener.started_at >= SILENT_JOB_S
    return own >= MISSING_METRIC_AFTER or silent


def metric_notes(policy: Policy, view: RunView) -> list[str]:
    """Metrics the policy expects and the run does not log, and a run with no listener to act through."""
    notes = []
    note = missing_role_note(policy, list(view.history))
    if note:
        notes.append(note)
    if view.listener is None and view.status == "RUNNING":
        notes.append("it logs metrics, but no listener has attached, so nothing can be changed; "
                     "call atm.listen(...) in the training script once its run has started")
    return notes
