"""Reconcile: merge the daemon's decision log with what is on the run (updates the log missed, acks
that arrived, runs that ended), and tell the daemon's own updates and records from anyone else's. Pure.

Only what is signed with the watcher's key is its own: the backend passes on only signed updates and
acks (``RunView``), and :func:`own_records` keeps only the signed records of the decision log. A tag
or file written by another client therefore never becomes one of the watcher's decisions, never
settles one, and cannot make it step back as if another watcher managed the run.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

from atm.adapters.base import RunView, names_run
from atm.schema import Ack, DecisionRecord, Status, Update
from atm.signing import SigningKey, verify
from atm.watcher.poll import run_step

#: Reason prefix of an update the run ended before applying.
EXPIRED = "expired"
#: Record statuses whose update was published on the run.
PUBLISHED = (Status.PENDING, Status.APPLIED, Status.FAILED, Status.UNDONE)


def reconcile(records: Sequence[DecisionRecord], view: RunView) -> tuple[list[DecisionRecord], bool]:
    """Merge the decision log with what is on the run: updates the log missed, acks that arrived.

    Pure. Returns the merged records (sorted by seq) and whether anything changed.
    """
    by_seq = {r.seq: r.model_copy() for r in records}
    changed = False
    for seq, update in view.updates.items():
        if seq not in by_seq:
            # Published, then the daemon died before writing its log: rebuild the record from the update.
            by_seq[seq] = _record_from_update(update)
            changed = True
        elif by_seq[seq].status == Status.AWAITING_APPROVAL and update.created_at == by_seq[seq].decided_at:
            # Approved and published, then the daemon died before writing its log.
            by_seq[seq].status = Status.PENDING
            by_seq[seq].approval = by_seq[seq].approval or "approved (published before the log was written)"
            changed = True
    ended = view.status != "RUNNING"
    for seq, rec in by_seq.items():
        ack = view.acks.get(seq)
        late = rec.status == Status.STALE and rec.reason.startswith(EXPIRED)
        if ack is not None and (rec.status == Status.PENDING or late):
            if late:
                rec.reason = "acknowledged after the run ended"
            _settle(rec, ack)
            changed = True
        elif ack is not None and ack.status == "undone" and rec.status == Status.APPLIED:
            # Applied, then the job set it back (its own scheduler or config code): the record says so.
            _settle(rec, ack)
            changed = True
        elif ack is None and ended and rec.status == Status.PENDING:
            # The job finished before it reached the next apply point; a late ack still settles it.
            rec.status = Status.STALE
            rec.reason = f"{EXPIRED}: the run ended ({view.status}) before the job applied it"
            changed = True
        if rec.status == Status.APPLIED and rec.effective_step is None and rec.applied_at is not None:
            # A decision taken on a point past the job's steps (another client's, since left out by the
            # backend) took effect where the job is: floored at its own step, it never took effect, and its
            # cooldowns held every later decision for good.
            floor, job = rec.step, run_step(view)
            if floor > job:  # the job's own step when it applied the change
                floor = max((s for t, s in view.timeline if t <= rec.applied_at and s <= job), default=0)
            rec.effective_step = step_after(view.timeline, rec.applied_at, floor=floor)
            changed |= rec.effective_step is not None
    return [by_seq[s] for s in sorted(by_seq)], changed


def own_records(
    records: Sequence[DecisionRecord], key: SigningKey | None, *, key_problem: str = "", run_id: str | None = None
) -> tuple[list[DecisionRecord], list[str]]:
    """The decision log's records signed with ``key`` (the watcher's own) and, when ``run_id`` is given,
    naming that run; and why each other is not. Pure.

    A record without a signature (a log written before atm signed its records, or by another client)
    is refused like a forged one: taken as the watcher's own, it could hold a decision "pending" for
    good or use up the budgets, and so lock the watcher out. So is a signed one of another run: every
    run of one key signs alike, and another run's stop copied onto this one would end its management.
    Refusing costs only the memory of older decisions: cooldowns and budgets count from the first
    signed record.
    """
    kept: list[DecisionRecord] = []
    refused: list[str] = []
    for r in records:
        check = verify(r, key, key_problem=key_problem, here="this watcher")
        if not check:
            refused.append(check.reason)
        elif run_id and not names_run(r.run_id, run_id):
            refused.append(f"decision record #{r.seq} is for run {r.run_id}, not this one: a copy from another run")
        else:
            kept.append(r)
    return kept, refused


def unpublished_acks(records: Sequence[DecisionRecord], view: RunView) -> list[int]:
    """Numbers of the signed acks on the run that answer no update the watcher published. Pure.

    Ignored (an ack only ever settles the watcher's own published update); the daemon reports each once.
    """
    published = set(view.updates) | {r.seq for r in records if r.status in PUBLISHED}
    return sorted(seq for seq in view.acks if seq not in published)


def foreign_update(records: Sequence[DecisionRecord], updates: Mapping[int, Update], seen_before: bool) -> Update | None:
    """An update on the run that this daemon did not publish, if any. Pure.

    ``updates`` are the signed ones (``RunView.updates``): one of them that is not this daemon's is
    another watcher's holding the same key. One with a number this daemon used for a different
    decision (another daemon overwrote it, or published it while this one held it for approval), or,
    once the daemon has read the run before, one with a number it never used. On the first read, such
    updates are this daemon's own from before a restart (the log may have missed them).
    """
    mine = {r.seq: r for r in records}
    for seq in sorted(updates):
        update, rec = updates[seq], mine.get(seq)
        if rec is None:
            if seen_before:
                return update
        elif rec.status in (*PUBLISHED, Status.AWAITING_APPROVAL) and update.created_at != rec.decided_at:
            return update
    return None


def step_after(timeline: Sequence[tuple[float, int]], when: float, floor: int = 0) -> int | None:
    """The lowest step, at least ``floor``, among the points the job logged at or after wall time
    ``when`` (its own clock): where a change it applied at ``when`` first shows in its metrics.

    ``floor`` is the decision's step: a change cannot take effect before the step it was decided on,
    so lower steps logged later (a summary value logged without ``step=``) are not where it shows.
    None when nothing was logged since. Pure. ``timeline`` is (time, step), oldest first.
    """
    i = bisect.bisect_left(timeline, (when, -math.inf))
    return min((s for _, s in timeline[i:] if s >= floor), default=None)


def _record_from_update(u: Update) -> DecisionRecord:
    return DecisionRecord(
        run_id=u.run_id, seq=u.seq, step=u.step, status=Status.PENDING, source=u.source, diagnosis=u.diagnosis,
        changes=u.changes, action=u.action, rationale=u.rationale, decided_at=u.created_at,
        reason="recovered from the run's update tag",
    )


def _settle(rec: DecisionRecord, ack: Ack) -> None:
    # "rejected": the job refused it whole (its signature or a limit), so nothing of it is in force.
    rec.status = {"applied": Status.APPLIED, "rejected": Status.REJECTED, "undone": Status.UNDONE}.get(
        ack.status, Status.FAILED)
    if ack.status != "rejected":
        rec.applied_step = ack.applied_step
        rec.applied_at = ack.applied_at
        rec.applied_values = dict(ack.values)
    if ack.error:
        who = {"rejected": "the job refused it", "undone": "the job undid it"}.get(ack.status, "listener")
        rec.reason = (rec.reason + "; " if rec.reason else "") + f"{who}: {ack.error}"
