"""Poll: what one read of a run says about it, before any decision (its step, whether it is idle,
and what the user should be told once: knobs the policy does not control, values out of bounds,
metrics the policy expects and the run does not log). Pure functions of the run's view."""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from atm.adapters.base import RunView, metric_keys
from atm.policies import AUX_ROLES, L2_FROM_ZERO_MAX, L2_MAX_FACTOR, Policy
from atm.schema import fmt
from atm.watcher.snapshot import MISSING_METRIC_AFTER, judge_by_return, missing_role_note, resolve_roles

#: Seconds a listener may be attached to a run that logs no metric of its own before the daemon says so.
SILENT_JOB_S = 120.0
#: Knobs every torch optimizer offers, which policies rarely control: not worth a warning.
OPTIMIZER_EXTRAS = frozenset({"momentum", "beta1", "beta2"})
#: The words metric names use for each word of a role's name, to guess which logged key a role the
#: policy cannot find is (``dev/xent`` for ``val_loss``). A word not listed stands for itself.
ROLE_WORDS: dict[str, frozenset[str]] = {
    "val": frozenset({"val", "valid", "validation", "eval", "evaluation", "dev", "test", "holdout", "heldout"}),
    "train": frozenset({"train", "trn", "training", "tr"}),
    "loss": frozenset({"loss", "xent", "ce", "nll", "crossentropy", "cross_entropy", "perplexity", "ppl"}),
    "return": frozenset({"return", "returns", "reward", "rew", "rewards", "score"}),
    "success": frozenset({"success", "successes", "solved"}),
}


def run_step(view: RunView) -> int:
    """The run's latest logged step, not counting the listener's own ``atm/*`` metrics."""
    return max((pts[-1][0] for k, pts in view.history.items() if pts and not k.startswith("atm/")), default=0)


def logged_steps(view: RunView) -> int:
    """How many points the run's own busiest metric has (the listener's ``atm/*`` not counted)."""
    return max((len(pts) for k, pts in view.history.items() if not k.startswith("atm/")), default=0)


def keys_to_read(policy: Policy, keys: Sequence[str]) -> frozenset[str]:
    """The metric keys a poll reads of a run that has ``keys``: those the policy maps. The roles resolved
    from these alone are those resolved from every key (a key no role reads decides no role's key), so
    the telemetry folded from them is the same. A run none of whose keys maps gets its first key read
    (sorted), so that its step and its number of points are known (the status line, when to say which
    metrics it lacks). The listener's ``atm/*`` keys are read anyway; a role of the run's settings
    (``lr``) is read only beside one of its progress. Pure."""
    roles = resolve_roles(policy, keys)
    if any(role not in AUX_ROLES for role in roles):
        return frozenset(roles.values())
    own = sorted(k for k in keys if not k.startswith("atm/"))
    return frozenset(own[:1])


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
    for name in view.listener.l2_knobs:
        if name in policy.params:
            notes.append(f"{name} is an L2 penalty in this job's optimizer (added to the gradient, as torch.optim.Adam and "
                         "SGD do), where the policy's values suit decoupled weight decay (AdamW): the manager moves it "
                         f"by at most {fmt(L2_MAX_FACTOR)}x, and from 0 to no more than {fmt(L2_FROM_ZERO_MAX)}. For decoupled decay use "
                         "torch.optim.AdamW")
    for name, value in sorted(view.listener.values.items()):
        rule = policy.params.get(name)
        if name == "lr" and value == 0:
            # A warm-up schedule's first step (the Hugging Face ones start at 0), not a chosen lr.
            continue
        if rule is not None and not rule.min <= value <= rule.max:
            notes.append(f"{name} is {fmt(value)}, outside the policy's [{fmt(rule.min)}, {fmt(rule.max)}]; a move "
                         "on it lands inside those bounds, however far that is")
    return notes


def guess_key(role: str, keys: Sequence[str]) -> str | None:
    """The logged key that most likely is ``role`` under another name: every word of the role (split at
    ``_``) is among the key's words, read through :data:`ROLE_WORDS`; None when no key is. Pure."""
    wanted = [ROLE_WORDS.get(w, frozenset({w})) for w in role.split("_")]
    hits = [k for k in sorted(keys)
            if all(words & set(re.split(r"[^a-z0-9]+", k.lower())) for words in wanted)]
    return min(hits, key=len) if hits else None


def unmapped_roles(policy: Policy, keys: Sequence[str]) -> dict[str, str | None]:
    """Roles no logged key maps, each with the key that likely is it: the evaluation metric always
    (with None when no key looks like it), any other role only when a key looks like it. Pure."""
    logged = [k for k in keys if not k.startswith("atm/")]
    roles = resolve_roles(policy, logged)
    taken = set(roles.values())
    free = [k for k in logged if k not in taken]
    out: dict[str, str | None] = {}
    eval_role = policy.limits.eval_metric
    for role in [eval_role, *(r for r in policy.metrics if r != eval_role)]:
        if role in roles or any(r.startswith(f"{role}[") for r in roles):
            continue
        guess = guess_key(role, free)
        if guess is not None or role == eval_role:
            out[role] = guess
            if guess is not None:
                free.remove(guess)
    return out if eval_role in out else {}


def mapping_line(policy: Policy, unmapped: dict[str, str | None]) -> str:
    """The one policy line that maps ``unmapped`` (a role without a guess gets a placeholder), for a file
    that starts ``extends: <policy>``. Pure."""
    items = ", ".join(f"{role}: [{key or 'YOUR_METRIC'}]" for role, key in unmapped.items())
    return f"metrics: {{{items}}}"


def unmapped_status(policy: Policy, view: RunView) -> str:
    """For the status line, from the first poll that shows the run's keys: which roles no key maps when
    the evaluation metric is one of them (the manager would else look "healthy" on a run it cannot
    judge), and the policy line that maps them; "" otherwise. Pure."""
    keys = metric_keys(view)
    if not any(not k.startswith("atm/") for k in keys):
        return ""
    unmapped = unmapped_roles(policy, keys)
    if not unmapped:
        return ""
    line = f"policy file: extends: {policy.name}, {mapping_line(policy, unmapped)}"
    eval_role = policy.limits.eval_metric
    if unmapped.get(eval_role) is None:
        advice = judge_by_return(policy, resolve_roles(policy, [k for k in keys if not k.startswith("atm/")]))
        if advice:
            return f"unmapped: {eval_role}: {advice}"
        # Nothing looks like it: most often the first evaluation has not come yet (seen: a job at step 20
        # told to write a policy file for the eval_loss the preset maps, 5 steps before it logged it).
        known = policy.metrics.get(eval_role, [])
        names = ", ".join(known[:3]) + (", ..." if len(known) > 3 else "")
        return (f"unmapped: {', '.join(unmapped)}: no key like {eval_role} logged yet (the policy reads {names}); "
                f"if the job logs it under another name: {line}")
    return f"unmapped: {', '.join(unmapped)} ({line})"


def metric_notes_due(view: RunView, now: float, policy: Policy | None = None) -> bool:
    """Whether enough of the run is in to say which metrics it lacks: at once when a logged key looks
    like the policy's evaluation metric under another name (``dev/xent``), else ``MISSING_METRIC_AFTER``
    points (its first evaluation may not have come yet), or a listener attached for ``SILENT_JOB_S`` to a
    job that logs nothing of its own (an SB3 script whose logger writes only to stdout never reaches
    that many points)."""
    if policy is not None and policy.limits.eval_metric in (named := unmapped_roles(policy, metric_keys(view))):
        if named[policy.limits.eval_metric] is not None:
            return True
    own = logged_steps(view)
    silent = own == 0 and view.listener is not None and now - view.listener.started_at >= SILENT_JOB_S
    return own >= MISSING_METRIC_AFTER or silent


def missing_metric_note(policy: Policy, keys: Sequence[str]) -> str:
    """:func:`~atm.watcher.snapshot.missing_role_note`, ending with the one policy line that maps the
    roles no key maps (with the keys that likely are them). Pure."""
    note = missing_role_note(policy, keys)
    unmapped = unmapped_roles(policy, keys)
    if note and unmapped:
        note += (f". The one line that maps {', '.join(unmapped)}, in a file that starts with `extends: "
                 f"{policy.name}`: {mapping_line(policy, unmapped)}")
    return note


def metric_notes(policy: Policy, view: RunView) -> list[str]:
    """Metrics the policy expects and the run does not log, and a run with no listener to act through."""
    notes = []
    note = missing_metric_note(policy, metric_keys(view))
    if note:
        notes.append(note)
    if view.listener is None and view.status == "RUNNING":
        notes.append("it logs metrics, but no listener has attached, so nothing can be changed; "
                     "call atm.listen(...) in the training script once its run has started")
    return notes
