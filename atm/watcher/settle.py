"""Settle: turn a proposer's answer into a decision record, re-checked against the run as it is now.

The run kept training while the proposer thought, so the answer is re-checked here: a fallback is
re-asked on the fresh run, values a scheduler moved meanwhile are rebased, a late answer is kept only
when the run still shows the same problem, and the policy has the last word. Pure but for the
fallback proposer it may call (the rules: microseconds, no I/O).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from atm.adapters.base import RunView
from atm.policies import DecisionContext, Policy, Window, check
from atm.schema import DecisionRecord, Proposal, Status, TelemetrySnapshot
from atm.watcher.decide import decision_context, decision_inputs, rebase, still_current
from atm.watcher.proposer import Proposer, ProposalResult
from atm.watcher.reconcile import EXPIRED
from atm.watcher.rules import Thresholds, diagnose
from atm.watcher.snapshot import RunTelemetry


@dataclass
class Settled:
    """What became of one answer."""

    #: The proposal as answered (its diagnosis is what the status line shows).
    proposal: Proposal
    #: The snapshot the answer is for: the one asked, or for a fallback the run re-read at settling.
    asked: TelemetrySnapshot
    source: str
    #: The run's step when the answer was settled.
    now_step: int
    #: None when the answer was "no change" (logged, not recorded).
    record: DecisionRecord | None


def out_of_time(ctx_now: DecisionContext, asked_step: int, stale_after: Window) -> bool:
    """Whether an answer to the snapshot taken at ``asked_step`` comes too late now: the run, as
    ``ctx_now`` sees it, moved past ``stale_after`` since. An empty window never passes: no deadline.

    The same test makes a settled answer stale and makes the daemon stop waiting for a slow proposer,
    so that the rules decide while their answer can still apply. Pure.
    """
    return bool(stale_after.steps or stale_after.evals) and ctx_now.passed(asked_step, stale_after)


def outpaced(latencies: Sequence[float], evals: Sequence[tuple[int, float]], stale_after: Window) -> str:
    """Why an answer from a proposer whose recent answers took ``latencies`` seconds would come
    after the run passed ``stale_after``, the run's recent evaluations being ``evals`` ((step, wall
    time), oldest first); empty when it would come in time, or when that cannot be told yet (no
    answer timed, fewer than three evaluations placed in time, no window). Pure.

    Asking anyway costs a decision: it waits for the deadline and then the rules decide on a run
    that moved on. The typical answer is the median of the last five; the run's pace is its recent
    one, so a run that slows down (longer evaluations, a second job on the machine) gets the
    proposer back.
    """
    if not latencies or not (stale_after.evals or stale_after.steps) or len(evals) < 3:
        return ""
    (s0, t0), (s1, t1) = evals[0], evals[-1]
    if t1 <= t0 or s1 <= s0:
        return ""
    typical = statistics.median(latencies[-5:])
    per_eval, per_step = (t1 - t0) / (len(evals) - 1), (t1 - t0) / (s1 - s0)
    # Both parts of a window must pass for it to have passed: the answer is late past the longer one.
    budget = max(stale_after.evals * per_eval, stale_after.steps * per_step)
    if typical <= budget:
        return ""
    return (f"its answers take {typical:.1f} s (median of the last {min(len(latencies), 5)}); the run passes "
            f"limits.stale_after ({stale_after.describe()}) in {budget:.1f} s at its recent pace")


def settle(
    result: ProposalResult,
    asked: TelemetrySnapshot,
    view: RunView,
    records: list[DecisionRecord],
    policy: Policy,
    *,
    seq: int,
    now: float,
    dry_run: bool,
    fallback: Proposer,
    telemetry: RunTelemetry | None = None,
) -> Settled:
    """The record for ``result``, the answer to ``asked``, numbered ``seq``, as of the run's ``view``
    (and its ``telemetry``, when the caller keeps one)."""
    telemetry = telemetry or RunTelemetry(policy)
    snap = asked
    if result.source == "fallback" and view.status == "RUNNING":
        # The rules answered for the run as it was before the failed call, which may have taken the
        # whole timeout (and retries): that answer would be stale. They take microseconds: ask again
        # on the run as it is now.
        snap, ctx_fresh, offer_fresh = decision_inputs(policy, view, records, now=now, dry_run=dry_run,
                                                       telemetry=telemetry)
        again = fallback.propose(snap, policy, ctx_fresh, offer_fresh)
        again.audit = {**{k: v for k, v in result.audit.items() if k not in again.audit}, **again.audit,
                       "first_asked_at_step": asked.step}
        again.source = "fallback"
        result = again
    proposal = result.proposal
    params = dict(view.listener.values) if view.listener else snap.params
    ctx_now = decision_context(policy, view, records, params, dry_run=dry_run, telemetry=telemetry)
    if proposal.is_noop:
        return Settled(proposal, snap, result.source, ctx_now.step, None)
    stale = out_of_time(ctx_now, snap.step, policy.limits.stale_after)
    late_note = ""
    if stale and view.status == "RUNNING":
        # The answer is late, but the question may still stand: a slow model on a fast job would
        # otherwise never act. It is kept when the run, read now, shows the same problem.
        now_snap = telemetry.snapshot(view.run_id, params, records, run_name=view.name)
        now_diag, _ = diagnose(now_snap, Thresholds.from_policy(policy))
        if still_current(proposal.diagnosis, now_diag):
            stale = False
            late_note = f"decided on step {snap.step}; at step {ctx_now.step} the run still shows {now_diag.value}; "
    moved = rebase(proposal.changes, snap.params, params, policy)
    if moved != proposal.changes:
        # The job moved these values (a scheduler) while the proposer thought: the decided moves
        # are checked, recorded and sent as applied to the values in force, as the listener would.
        proposal = proposal.model_copy(update={"changes": moved})
    verdict = check(proposal, policy, ctx_now)
    if view.status != "RUNNING":
        # Nothing would ever apply it: the job is gone.
        status, reason = Status.STALE, f"{EXPIRED}: the run ended ({view.status}) while deciding"
    elif stale:
        status, reason = Status.STALE, f"stale: the run moved from step {snap.step} to {ctx_now.step} while deciding"
    elif verdict.accepted:
        status, reason = (Status.DRY_RUN if dry_run else Status.PENDING), late_note + verdict.reason
    else:
        status, reason = Status.REJECTED, late_note + verdict.reason
    # Changes are recorded against the values in force now, which is what the job will replace.
    carried = status in (Status.PENDING, Status.DRY_RUN)
    record = DecisionRecord(
        run_id=view.run_id, seq=seq, step=snap.step, status=status, source=result.source,
        diagnosis=proposal.diagnosis, changes=verdict.changes if carried else {},
        action=verdict.action if carried else None,
        rationale=proposal.rationale, expected_outcome=proposal.expected_outcome, watch_next=proposal.watch_next,
        reason=reason, dropped=verdict.dropped, proposal=proposal, snapshot=snap, decided_at=now,
        audit=result.audit, reverts=proposal.reverts if carried else None, problem=proposal.problem,
    )
    return Settled(proposal, snap, result.source, ctx_now.step, record)
