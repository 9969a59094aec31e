"""Judge: what each applied change did to the metric the policy optimises, against the run's own trend.

A change is judged once ``limits.settle`` evaluations were logged after it took effect: their mean
against the line fitted through the evaluations before it (projected to the same steps), with the
run's own spread around that line as the noise. Better than projected beyond the noise is
``helped``; worse than projected beyond the noise, and worse than where the run was, is ``hurt``
(a curve that merely flattens, as healthy ones do, is not hurt by whatever came before);
anything between is ``neutral``. Pure functions; the daemon records the outcome on the decision.

Each change is judged on its own evaluations only: the window after it ends where the run's next
applied change took effect, and the line before it starts at the latest restore (rollback) before it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from atm.schema import Action, DecisionRecord, EffectLabel, Outcome, Status, fmt
from atm.watcher.snapshot import slope

#: Evaluations before a change that the trend is fitted through, and the fewest that project anything.
PRE_EVALS = 6
MIN_PRE = 3
#: The noise is at least this share of the level: a curve smooth to the last digit would otherwise
#: call any wobble an effect.
NOISE_FLOOR = 0.005
#: How many standard errors a difference must reach to count. High: a wrong "hurt" sets back a good
#: change, a wrong "helped" repeats a useless one; a late judgement costs less than either.
Z = 3.0


def overtaken_by(record: DecisionRecord, records: Sequence[DecisionRecord]) -> DecisionRecord | None:
    """The first later applied change that took effect after ``record`` did (a stop with no changes is
    none: it changes nothing the job trains with), if any. Pure."""
    start = record.effective_step
    if start is None:
        return None
    later = [r for r in records if r.seq > record.seq and r.status == Status.APPLIED and r.effective_step is not None
             and r.effective_step >= start and (r.changes or r.action not in (None, Action.STOP))]
    return min(later, key=lambda r: (r.effective_step, r.seq), default=None)


def restored_at(record: DecisionRecord, records: Sequence[DecisionRecord]) -> int | None:
    """The step the latest applied rollback before ``record`` took effect at, if any. Pure."""
    start = record.effective_step
    if start is None:
        return None
    return max((r.effective_step for r in records if r.seq < record.seq and r.status == Status.APPLIED
                and r.action == Action.ROLLBACK and r.effective_step is not None and r.effective_step <= start),
               default=None)


def measure(
    record: DecisionRecord,
    points: Sequence[tuple[int, float]],
    *,
    metric: str,
    higher_is_better: bool,
    evals: int,
    ended: bool = False,
    records: Sequence[DecisionRecord] = (),
) -> Outcome | None:
    """The outcome of ``record``'s change on ``points`` (the metric's (step, value), sorted by step),
    or None while fewer than ``evals`` evaluations came after it and the run goes on.

    ``records``: the run's decisions (``record`` among them or not). The evaluations after the next
    applied change took effect are that change's, not this one's; those before the latest rollback
    before this change are of a model the rollback replaced.

    Raises nothing: a change that cannot be judged gets ``unknown`` with the reason.
    """
    start = record.effective_step
    if record.action == Action.STOP and not record.changes:
        # A stop ends training: there is no "after" to measure. A job that trained on got no effect
        # either (it does not act on stop); reading its later points as the stop's effect said "neutral".
        if start is not None and any(s > start for s, _ in points):
            return Outcome(label=EffectLabel.UNKNOWN, metric=metric,
                           note="the job trained on after the stop (it does not read listener.stop_requested)")
        return Outcome(label=EffectLabel.UNKNOWN, metric=metric, note="training ended here, as asked") if ended else None
    if start is None:
        return Outcome(label=EffectLabel.UNKNOWN, metric=metric, note="it never showed in the run's metrics") if ended else None
    restore = restored_at(record, records)
    # The line before is fitted through the restored model's evaluations only: across a restore's jump
    # it reads the jump as a trend (a cross-entropy "projected" at -0.14 after a rollback).
    before = [(s, v) for s, v in points if s < start and (restore is None or s >= restore)][-PRE_EVALS:]
    nxt = overtaken_by(record, records)
    end = nxt.effective_step if nxt is not None and nxt.effective_step is not None else math.inf
    after = [(s, v) for s, v in points if start <= s < end][:evals]
    if len(after) < evals:
        # Cut short by the next change as by the end of the run, and read alike: fewer evaluations than
        # the policy's settle window judge nothing (``unknown``), rather than a label on a smaller sample.
        if nxt is not None:
            return Outcome(label=EffectLabel.UNKNOWN, metric=metric, evals=len(after),
                           note=f"#{nxt.seq} took effect {len(after)} of {evals} evaluations after it")
        if not ended:
            return None
        return Outcome(label=EffectLabel.UNKNOWN, metric=metric, evals=len(after),
                       note=f"the run ended {len(after)} of {evals} evaluations after it")
    if any(not math.isfinite(v) for _, v in after) and all(math.isfinite(v) for _, v in before):
        return Outcome(label=EffectLabel.HURT, metric=metric, evals=len(after),
                       note="non-finite values after it, none before")
    before = [(s, v) for s, v in before if math.isfinite(v)]
    after = [(s, v) for s, v in after if math.isfinite(v)]
    if len(before) < MIN_PRE or not after:
        return Outcome(label=EffectLabel.UNKNOWN, metric=metric, evals=len(after),
                       note=f"{len(before)} evaluations before it" + (f" since the rollback at step {restore}" if restore is not None else "")
                            + ": too few to project a trend from")
    b = slope(before)
    mx = sum(s for s, _ in before) / len(before)
    my = sum(v for _, v in before) / len(before)
    residuals = [v - (my + b * (s - mx)) for s, v in before]
    spread = math.sqrt(sum(r * r for r in residuals) / max(len(before) - 2, 1))
    # Point-to-point jitter too: a line through a few points can fit them better than the run's noise.
    jitter = math.sqrt(sum((v2 - v1) ** 2 for (_, v1), (_, v2) in zip(before, before[1:])) / (2 * (len(before) - 1)))
    level = sum(v for _, v in before[-3:]) / len(before[-3:])
    noise = max(spread, jitter, NOISE_FLOOR * abs(level), 1e-12)
    line = [my + b * (s - mx) for s, _ in after]
    if min(line) < 0 <= min(v for _, v in before + after):
        # A metric that never went below 0 (a loss, a rate) projected below it: the run was falling
        # faster than a line can follow for long. Clamped to 0, any value measured would read as worse
        # than projected; such a projection judges nothing.
        return Outcome(label=EffectLabel.UNKNOWN, metric=metric, evals=len(after), before=level,
                       note=f"the trend before it (slope {fmt(b * 1000.0)} per 1k steps) projects {metric} below 0: "
                            "too steep to extrapolate")
    projected = sum(line) / len(after)
    measured = sum(v for _, v in after) / len(after)
    sign = 1.0 if higher_is_better else -1.0
    vs_trend, vs_level = sign * (measured - projected), sign * (measured - level)
    # The standard error of the mean after against the line extrapolated to it: the new points' own
    # noise, the line's level, and its slope carried from the middle of the points before.
    sxx = sum((s - mx) ** 2 for s, _ in before)
    reach = sum(s for s, _ in after) / len(after) - mx
    margin = Z * noise * math.sqrt(1 / len(after) + 1 / len(before) + (reach * reach / sxx if sxx > 0 else 0.0))
    if vs_trend > margin:
        label = EffectLabel.HELPED
    elif vs_trend < -margin and vs_level < 0:
        label = EffectLabel.HURT
    else:
        label = EffectLabel.NEUTRAL
    return Outcome(label=label, metric=metric, evals=len(after), before=level, projected=projected,
                   measured=measured, noise=noise, slope_before=b * 1000.0,
                   slope_after=slope(after) * 1000.0 if len(after) >= 2 else math.nan)


def judge(
    records: Sequence[DecisionRecord],
    points: Sequence[tuple[int, float]],
    *,
    metric: str,
    higher_is_better: bool,
    evals: int,
    ended: bool = False,
) -> tuple[list[DecisionRecord], list[int]]:
    """The records with an outcome for every applied change that can now be judged, and the numbers
    of those judged just now. Pure: the records given are not changed."""
    out, judged = [], []
    for rec in records:
        if rec.status == Status.APPLIED and rec.effect is None and (rec.changes or rec.action is not None):
            outcome = measure(rec, points, metric=metric, higher_is_better=higher_is_better, evals=evals, ended=ended,
                              records=records)
            if outcome is not None:
                rec = rec.model_copy(update={"effect": outcome})
                judged.append(rec.seq)
        out.append(rec)
    return out, judged


def hurt_unanswered(records: Sequence[DecisionRecord]) -> DecisionRecord | None:
    """The latest applied change measured ``hurt`` that no later decision reverted, if any."""
    answered = {r.reverts for r in records if r.reverts is not None and r.status in (Status.PENDING, Status.APPLIED)}
    for rec in reversed(records):
        if rec.status != Status.APPLIED or rec.effect is None:
            continue
        if rec.effect.label == EffectLabel.HURT and rec.seq not in answered and rec.reverts is None:
            return rec
        return None  # only the latest judged change is answered: an older one was overtaken by it
    return None
