"""The snapshot as it was built before telemetry was folded incrementally: from the whole history,
on every call. Kept as the oracle that the incremental :class:`atm.watcher.snapshot.RunTelemetry`
must agree with (for series shorter than its thinning cap and its ring of recent points)."""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Mapping, Sequence

from atm.policies import Policy
from atm.schema import Action, DecisionRecord, Effect, SeriesStats, Status, TelemetrySnapshot
from atm.watcher.snapshot import (
    HIGHER_IS_BETTER,
    TRAIL,
    WATCHED_FOR_NONFINITE,
    WINDOW,
    Points,
    _eval_steps,
    _usable,
    fitted_change,
    gap_window_signals,
    lost_progress,

    resolve_roles,
    running_ema,
    slope,
    smoothed,
    trail,
    window_improvement,
)

def series_stats(key: str, points: Points, higher_is_better: bool = False) -> SeriesStats | None:
    """Windowed statistics of one series (points sorted by step). ``None`` for an empty series."""
    if not points:
        return None
    pts = sorted(points, key=lambda p: p[0])
    finite = [(s, v) for s, v in pts if _usable(v)]
    # Only the trailing window: a NaN the run has since recovered from (after a rollback, say)
    # must not read as divergence for the rest of the run.
    nonfinite = any(not _usable(v) for _, v in pts[-WINDOW:])
    last_step, latest = pts[-1]
    if not finite:
        return SeriesStats(
            key=key, n=len(pts), first_step=pts[0][0], last_step=last_step, latest=latest, ema=latest,
            slope=0.0, window_mean=latest, window_std=0.0, best=latest, best_step=last_step,
            steps_since_best=0, min=latest, max=latest, nonfinite=True, trail=[],
        )
    ema = smoothed([v for _, v in finite])
    window = finite[-WINDOW:]
    mean = sum(v for _, v in window) / len(window)
    std = math.sqrt(sum((v - mean) ** 2 for _, v in window) / len(window))
    pick = max if higher_is_better else min
    best_step, best = pick(finite, key=lambda p: p[1])
    # Ties: the earliest step that reached the best value.
    best_step = next(s for s, v in finite if v == best)
    return SeriesStats(
        key=key,
        n=len(pts),
        first_step=pts[0][0],
        last_step=last_step,
        latest=latest,
        ema=ema,
        slope=slope(window) * 1000.0,
        window_mean=mean,
        window_std=std,
        best=best,
        best_step=best_step,
        steps_since_best=last_step - best_step,
        min=min(v for _, v in finite),
        max=max(v for _, v in finite),
        nonfinite=nonfinite,
        trail=trail(finite, TRAIL),
    )

def value_at(points: Points, step: int) -> float | None:
    """The last value logged at or before ``step``."""
    best = None
    for s, v in points:
        if s <= step:
            best = v
        else:
            break
    return best

def reference_snapshot(
    run_id: str,
    policy: Policy,
    history: Mapping[str, Points],
    params: Mapping[str, float],
    records: Sequence[DecisionRecord] = (),
    run_name: str = "",
    now: float | None = None,
    recent: int = 3,
) -> TelemetrySnapshot:
    """Rebuild the snapshot a proposer sees from metric history (key -> sorted (step, value))."""
    roles = resolve_roles(policy, list(history))
    series: dict[str, SeriesStats] = {}
    for role, key in roles.items():
        base = role.split("[", 1)[0]
        st = series_stats(key, history[key], higher_is_better=base in HIGHER_IS_BETTER)
        if st is not None:
            series[role] = st
    step = max((s.last_step for s in series.values()), default=0)
    if not series:
        step = max((int(pts[-1][0]) for pts in history.values() if pts), default=0)
    restarts = [r.effective_step for r in records
                if r.status == Status.APPLIED and r.action == Action.ROLLBACK and r.effective_step is not None]
    dropout_moves = [r.effective_step for r in records
                     if r.status == Status.APPLIED and "dropout" in r.changes and r.effective_step is not None]
    signals = derive_signals(series, {roles[r]: history[roles[r]] for r in roles}, max(restarts, default=None),
                             max(restarts + dropout_moves, default=None))
    effects = measured_effects(records, history, roles, recent, _eval_steps(policy, roles, history))
    kw = {} if now is None else {"taken_at": now}
    return TelemetrySnapshot(
        run_id=run_id,
        run_name=run_name,
        step=step,
        series=series,
        signals=signals,
        params=dict(params),
        recent=effects,
        applied=dict(Counter(r.diagnosis.value for r in records if r.status == Status.APPLIED)),
        **kw,
    )

def derive_signals(
    series: Mapping[str, SeriesStats], by_key: Mapping[str, Points], restarted_at: int | None = None,
    gaps_from: int | None = None,
) -> dict[str, float | bool]:
    """Named signals the rules read and the LLM is shown: gaps, flags, ratios.

    ``restarted_at``: the step from which the run went on from a restored checkpoint (the latest
    rollback), if any; trends are read from there, not across the jump.
    """
    if gaps_from is None:
        gaps_from = restarted_at
    sig: dict[str, float | bool] = {}
    # Only losses, gradients and goals count: SB3 logs explained_variance as NaN whenever returns are constant.
    sig["nonfinite"] = any(s.nonfinite for r, s in series.items() if r.split("[", 1)[0] in WATCHED_FOR_NONFINITE)
    train, val = series.get("train_loss"), series.get("val_loss")
    gaps: list[tuple[int, float]] = []
    if train and val:
        train_pts = by_key[train.key]
        val_pts = [p for p in by_key[val.key] if _usable(p[1])]
        for s, v in val_pts:
            t = value_at(train_pts, s)
            if t is not None and _usable(t):
                gaps.append((s, v - t))
        if gaps:
            sig["gap"] = gaps[-1][1]
            # Widening is judged from the val best on when there is enough of it: a window reaching back
            # past a rollback's drop would read the drop as a narrowing gap.
            since_best = [g for g in gaps if g[0] >= val.best_step]
            sig["gap_slope"] = slope((since_best if len(since_best) >= 3 else gaps)[-WINDOW:]) * 1000.0
            sig["gap_ratio"] = val.latest / train.ema if train.ema > 0 else float("inf")
            sig["gap_at_best"] = next((g for s, g in gaps if s == val.best_step), gaps[0][1])
    primary = val or train
    if primary is not None and primary.n >= 3 and not primary.nonfinite:
        # Rise of the latest value over the best one, relative to the best.
        scale = max(abs(primary.best), 1e-8)
        sig["rise_over_best"] = (primary.latest - primary.best) / scale
        window = [(st, v) for st, v in by_key[primary.key] if _usable(v)][-WINDOW:]
        if restarted_at is not None:
            # A fit across a rollback's jump reads the restore as a trend (a "plateau" seen right after it).
            window = [(st, v) for st, v in window if st >= restarted_at]
        # Relative improvement across the trailing window by a least-squares fit (positive: still
        # getting better); a fit, not the two end points, so one noisy evaluation does not decide it.
        # Fewer than 3 points since a rollback tell no trend yet.
        if len(window) >= 3:
            sig["window_improvement"], ci = window_improvement(window)
            if math.isfinite(ci):
                sig["window_improvement_ci"] = ci
        if train and val:
            tail = gaps[-WINDOW:]
            if gaps_from is not None:
                tail = [(st, g) for st, g in tail if st >= gaps_from]
            vals = [(st, v) for st, v in by_key[val.key] if _usable(v)][-WINDOW:]
            sig.update(gap_window_signals(tail, scale, vals))
    if train is not None and train.n >= 3 and not train.nonfinite:
        # Share of all progress made so far that was lost again: 0 at the best, 1 back at the worst.
        # Relative to the range, not to the best value, so a loss near 0 wobbling is not "divergence";
        # of the smoothed curve, so a job logging one noisy mini-batch's loss is not "divergence" either.
        usable = [(st, v) for st, v in by_key[train.key] if _usable(v)]
        ema = running_ema([v for _, v in usable])
        worst = max(ema)
        if restarted_at is not None:
            # From the restore on: the smoothed curve started afresh there, its best, and the run's worst.
            usable = [(st, v) for st, v in usable if st >= restarted_at]
            ema = running_ema([v for _, v in usable]) if usable else []
            worst = max([worst, *ema])
        if len(ema) >= (3 if restarted_at is not None else 1):
            best = min(ema)
            sig.update(lost_progress(ema[-1], best, usable[ema.index(best)][0], worst))
    goal = series.get("safe_success") or series.get("success") or series.get("return")
    if goal is not None and not goal.nonfinite and goal.key in by_key:
        window = [v for _, v in by_key[goal.key] if _usable(v)][-WINDOW:]
        # Absolute gain across the trailing window (success rates are already on a 0-1 scale), of the
        # smoothed value: one lucky evaluation (0.00, 0.00, 0.08 on a few dozen episodes) is not
        # progress enough to stop pushing a stalled run, nor one unlucky one a regression.
        sig["goal_window_gain"] = smoothed(window) - window[0]
    ret = series.get("return")
    if ret is not None and not ret.nonfinite and ret.key in by_key:
        # Returns are noisy and in the task's units: the mean of the last 3 evaluations, and how far it is
        # below the best such mean. (An EMA lags too far behind on evaluations a few dozen apart.)
        finite = [(st, v) for st, v in by_key[ret.key] if _usable(v)]
        vals = [v for _, v in finite]
        means = [sum(last) / len(last) for last in (vals[max(0, i - 2): i + 1] for i in range(len(vals)))]
        sig["return_recent"] = means[-1]
        sig["return_recent_best"] = max(means)
        sig["return_recent_drop"] = max(means) - means[-1]
        recent = vals[-WINDOW:]
        if len(recent) >= 3:
            # One evaluation's noise: the median absolute difference of successive values, as a standard deviation.
            diffs = sorted(abs(b - a) for a, b in zip(recent, recent[1:]))
            mid = len(diffs) // 2
            median = diffs[mid] if len(diffs) % 2 else (diffs[mid - 1] + diffs[mid]) / 2
            sig["return_noise"] = median / (0.6745 * math.sqrt(2))
        # Progress across the trailing window by a least-squares fit: noisy end points decide nothing.
        sig["return_window_gain"] = fitted_change(finite[-WINDOW:])
        # Evaluations in a row (within the window) that ended exactly where the latest did.
        sig["return_held"] = float(next((i for i, v in enumerate(reversed(recent))
                                         if not math.isclose(v, recent[-1], rel_tol=1e-9, abs_tol=1e-12)), len(recent)))
    lr = series.get("lr")
    if lr is not None and lr.n >= 3:
        w = [(st, v) for st, v in by_key[lr.key] if _usable(v)][-WINDOW:]
        sig["lr_window_rise"] = w[-1][1] / w[0][1] - 1.0 if w[0][1] > 0 else 0.0
        sig["lr_window_from"] = float(w[0][0])
    gn = series.get("grad_norm")
    if gn is not None and gn.window_mean > 0:
        sig["grad_norm_ratio"] = gn.latest / gn.window_mean
    comps = {r: s for r, s in series.items() if r.startswith("loss_components[")}
    if len(comps) >= 2:
        vals = [abs(s.ema) for s in comps.values()]
        sig["loss_component_ratio"] = max(vals) / max(min(vals), 1e-12)
    return sig

def measured_effects(
    records: Sequence[DecisionRecord],
    history: Mapping[str, Points],
    roles: Mapping[str, str],
    recent: int,
    evals: Sequence[int] = (),
) -> list[Effect]:
    """Before/after values of the watched metrics for the last ``recent`` applied interventions, and
    how many evaluations (steps in ``evals``, sorted) were logged since each took effect."""
    applied = [r for r in records if r.status == Status.APPLIED][-recent:]
    out = []
    watch = [r for r in ("val_loss", "train_loss", "safe_success", "success", "collision", "return") if r in roles]
    # Loss components too: whether a loss-weight change moved their balance is the test of that remedy.
    watch += sorted(r for r in roles if r.startswith("loss_components["))
    for rec in applied:
        ba: dict[str, tuple[float, float]] = {}
        for role in watch:
            pts = history[roles[role]]
            before = value_at(pts, rec.step)
            if before is not None and pts:
                ba[role] = (before, pts[-1][1])
        since = None if rec.effective_step is None else len(evals) - bisect.bisect_left(evals, rec.effective_step)
        out.append(Effect(seq=rec.seq, applied_step=rec.effective_step, changes=rec.changes, diagnosis=rec.diagnosis,
                          action=rec.action, before_after=ba, evals_since=since))
    return out
