"""Reconcile: merge the daemon's decision log with what is on the run (updates the log missed, acks
that arrived, runs that ended), and tell the daemon's own updates from anyone else's. Pure."""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

from atm.adapters.base import RunView
from atm.schema import Ack, DecisionRecord, Status, Update

#: Reason prefix of an update the run ended before applying.
EXPIRED = "expired"
#: Record statuses whose update was published on the run.
PUBLISHED = (Status.PENDING, Status.APPLIED, Status.FAILED)


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
    ended = view.status != "RUNNING"
    for seq, rec in by_seq.items():
        ack = view.acks.get(seq)
        late = rec.status == Status.STALE and rec.reason.startswith(EXPIRED)
        if ack is not None and (rec.status == Status.PENDING or late):
            if late:
                rec.reason = "acknowledged after the run ended"
            _settle(rec, ack)
            changed = True
        elif ack is None and ended and rec.status == Status.PENDING:
            # The job finished before it reached the next apply point; a late ack still settles it.
            rec.status = Status.STALE
            rec.reason = f"{EXPIRED}: the run ended ({view.status}) before the job applied it"
            changed = True
        if rec.status == Status.APPLIED and rec.effective_step is None and rec.applied_at is not None:
            rec.effective_step = step_after(view.timeline, rec.applied_at, floor=rec.step)
            changed |= rec.effective_step is not None
    return [by_seq[s] for s in sorted(by_seq)], changed


def foreign_update(records: Sequence[DecisionRecord], updates: Mapping[int, Update], seen_before: bool) -> Update | None:
    """An update on the run that this daemon did not publish, if any. Pure.

    One with a number this daemon used for a different decision (another daemon overwrote it), or,
    once the daemon has read the run before, one with a number it never used. On the first read, such
    updates are this daemon's own from before a restart (the log may have missed them).
    """
    mine = {r.seq: r for r in records}
    for seq in sorted(updates):
        update, rec = updates[seq], mine.get(seq)
        if rec is None:
            if seen_before:
                return update
        elif rec.status in PUBLISHED and update.created_at != rec.decided_at:
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
    rec.status = Status.APPLIED if ack.status == "applied" else Status.FAILED
    rec.applied_step = ack.applied_step
    rec.applied_at = ack.applied_at
    rec.applied_values = dict(ack.values)
    if ack.error:
        rec.reason = (rec.reason + "; " if rec.reason else "") + f"listener: {ack.error}"
