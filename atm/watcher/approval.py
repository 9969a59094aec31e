"""Approval: decisions held until a person answers (``limits.approval: required``, ``atm-watch --approve``).

An accepted decision is recorded as ``awaiting-approval`` and published to the job only once a
person approves it. The answer arrives on the run, read by the backend into ``RunView.approvals``:

- signed, by ``atm approve`` / ``atm reject`` (holding the watcher's key): taken whenever it comes,
  while the decision is still fresh;
- unsigned, a tag added in the tracker's UI (``atm.approve`` = ``<seq>``): anyone who can write the
  run can add one, so it is taken only when this watcher first saw it after the decision was made
  (a tag written in advance for the next number approves nothing) and while the decision is fresh.

A decision is fresh while the run has trained less than ``limits.approval_window`` past the
evaluation it was decided on (an empty window: always); after that, or once the run ended, it expires. A
rejection wins over an approval. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from atm.policies import DecisionContext, Window
from atm.schema import Approval, DecisionRecord, Status


@dataclass(frozen=True)
class Answer:
    """What became of one decision held for approval."""

    seq: int
    #: ``pending`` (approved: publish it now), ``rejected`` or ``expired``.
    status: Status
    #: Who answered and how, or why it expired: the record's ``approval``.
    approval: str


def sighting(a: Approval) -> str:
    """The name under which the watcher remembers when it first saw an answer."""
    return f"{a.decision} #{a.seq} {'signed ' + str(a.signature)[:16] if a.signature else a.by}"


def describe(a: Approval) -> str:
    """``approved by alice@gpu1 (atm approve, signed)``; ``rejected by tag atm.reject (tracker UI, unsigned)``."""
    verb = "approved" if a.decision == "approve" else "rejected"
    how = f"{a.by} (atm {a.decision}, signed)" if a.signature else a.by
    return f"{verb} by {how}" + (f": {a.note}" if a.note else "")


def answers(
    records: Sequence[DecisionRecord],
    approvals: Sequence[Approval],
    *,
    seen_at: Mapping[str, float],
    ctx: DecisionContext,
    window: Window,
    ended: str | None = None,
) -> list[Answer]:
    """The answers to the records awaiting approval that are settled now. Pure.

    Args:
        records: the run's decisions; only ``awaiting-approval`` ones are answered.
        approvals: the answers on the run (``RunView.approvals``: signed with the key, or unsigned).
        seen_at: :func:`sighting` -> when this watcher first saw that answer (its own clock, as
            ``decided_at``); an unsigned answer not in it counts as seen now, i.e. not in advance.
        ctx: the run as it is now (its step and evaluations), to tell whether a decision is fresh.
        window: ``limits.approval_window``.
        ended: the run's status when it is no longer running (nothing could apply the change then).
    """
    out: list[Answer] = []
    for rec in records:
        if rec.status != Status.AWAITING_APPROVAL:
            continue
        if ended is not None:
            out.append(Answer(rec.seq, Status.EXPIRED, f"expired: the run ended ({ended}) before anyone approved it"))
            continue
        valid = [a for a in approvals if a.seq == rec.seq and _in_time(a, rec, seen_at)]
        fresh = not (window.evals or window.steps) or not ctx.passed(rec.step, window)
        reject = next((a for a in valid if a.decision == "reject"), None)
        approve = next((a for a in valid if a.decision == "approve"), None)
        if reject is not None:
            out.append(Answer(rec.seq, Status.REJECTED, describe(reject)))
        elif not fresh:
            why = "approved too late" if approve is not None else "no answer"
            out.append(Answer(rec.seq, Status.EXPIRED, f"expired: {why} while the run trained {window.describe()} past step "
                                                        f"{rec.step} (limits.approval_window); the run has moved on"))
        elif approve is not None:
            out.append(Answer(rec.seq, Status.PENDING, describe(approve)))
    return out


def early(records: Sequence[DecisionRecord], approvals: Sequence[Approval], seen_at: Mapping[str, float]) -> list[Approval]:
    """Unsigned answers to a decision awaiting approval that were on the run before it was made. Pure.

    They are not taken (one written in advance for the next number must not approve it); the
    watcher says so, so that a person who meant it adds the tag again.
    """
    waiting = {r.seq: r for r in records if r.status == Status.AWAITING_APPROVAL}
    return [a for a in approvals if a.seq in waiting and not _in_time(a, waiting[a.seq], seen_at)]


def _in_time(a: Approval, rec: DecisionRecord, seen_at: Mapping[str, float]) -> bool:
    if a.signature:
        return True
    seen = seen_at.get(sighting(a))
    return seen is None or seen >= rec.decided_at


__all__ = ["Answer", "answers", "describe", "early", "sighting"]
