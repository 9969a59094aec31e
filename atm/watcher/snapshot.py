"""Snapshot building: pure functions from metric history to a :class:`TelemetrySnapshot`.

No I/O here. The daemon hands in what the backend read; tests hand in lists.
"""

from __future__ import annotations

import bisect
import fnmatch
import math
from collections.abc import Mapping, Sequence

from atm.policies import Policy
from atm.schema import Action, DecisionRecord, Effect, SeriesStats, Status, TelemetrySnapshot

Points = Sequence[tuple[int, float]]

#: Roles where a larger value is better; every other role is better smaller (losses, collisions).
HIGHER_IS_BETTER = frozenset({"return", "success", "safe_success", "explained_variance", "entropy", "action_std"})

#: Roles whose non-finite values mean the run diverged.
WATCHED_FOR_NONFINITE = frozenset({"train_loss", "val_loss", "loss_components", "grad_norm", "return", "value_loss"})

#: Roles only a reinforcement-learning run logs.
RL_ROLES = frozenset({"return", "success", "safe_success", "collision"})

#: Points in the trailing window used for slopes and spreads. Counted in points, not steps,
#: so the statistics mean the same thing whether a script logs every step or every epoch.
WINDOW = 8
TRAIL = 8
EMA_ALPHA = 0.3


def resolve_roles(policy: Policy, keys: Sequence[str]) -> dict[str, str]:
    """Map each policy role to the metric key it reads (first candidate present wins).

    A candidate ending in ``*`` matches every key with that prefix; those roles map as
    ``role[key]`` so that several components (``loss/*``) stay apart.
    """
    present = set(keys)
    out: dict[str, str] = {}
    for role, candidates in policy.metrics.items():
        for cand in candidates:
            if not _is_pattern(cand) and cand in present:
                out[role] = cand
                break
    # Patterns take what no named role claimed: `loss/*` must not swallow `loss/val`.
    claimed = set(out.values())
    for role, candidates in policy.metrics.items():
        for cand in filter(_is_pattern, candidates):
            for k in sorted(fnmatch.filter(keys, cand)):
                if k not in claimed:
                    out[f"{role}[{k}]"] = k
    return out


def missing_role_note(policy: Policy, keys: Sequence[str]) -> str:
    """Non-empty when the policy's evaluation metric is not among ``keys``: what was looked for,
    what the run logs, and how to map it. Pure."""
    role = policy.limits.eval_metric
    logged = sorted(k for k in keys if not k.startswith("atm/"))
    if not logged and keys:
        return (
            "the run logs no metrics of its own, only the listener's atm/*; atm decides on what the job logs "
            "(losses, returns): log them to this run. Stable-Baselines3's logger does not write to MLflow or "
            "W&B by itself: see the README's Stable-Baselines3 paragraph"
        )
    if not logged or role in resolve_roles(policy, logged):
        return ""
    wanted = ", ".join(policy.metrics.get(role, [])) or "nothing (the policy has no such role)"
    shown = ", ".join(logged[:12]) + (f" and {len(logged) - 12} more" if len(logged) > 12 else "")
    return (
        f"no metric for {role} (policy {policy.name} looks for: {wanted}); the run logs: {shown}. "
        f"If one of these is it, map it in a policy file (metrics: {{{role}: [NAME]}}) and pass --policy FILE "
        f"(`atm policy show {policy.name}` prints one to start from)"
    )


def _is_pattern(candidate: str) -> bool:
    return any(ch in candidate for ch in "*?[")


def is_rl(snapshot: TelemetrySnapshot) -> bool:
    """Whether the run is reinforcement learning (it logs returns, success or collisions)."""
    return any(role.split("[", 1)[0] in RL_ROLES for role in snapshot.series)


def smoothed(values: Sequence[float]) -> float:
    """Exponential moving average (``EMA_ALPHA``) of ``values``, oldest first, started at the first."""
    return running_ema(values)[-1]


def running_ema(values: Sequence[float]) -> list[float]:
    """The exponential moving average after each of ``values`` (see :func:`smoothed`)."""
    out = [values[0]]
    for v in values[1:]:
        out.append(EMA_ALPHA * v + (1 - EMA_ALPHA) * out[-1])
    return out


#: Values this large are a blow-up, not a measurement: treated as non-finite (a tracker may also store
#: inf as the largest float), and squaring them in the statistics would overflow.
OVERFLOW = 1e100


def _usable(v: float) -> bool:
    return math.isfinite(v) and abs(v) < OVERFLOW


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


def fitted_change(points: Points) -> float:
    """How much a least-squares line through ``points`` moves from their first step to their last."""
    return slope(points) * (points[-1][0] - points[0][0]) if points else 0.0


def slope(points: Points) -> float:
    """Least-squares slope (value per step); 0 for fewer than two distinct steps."""
    if len(points) < 2:
        return 0.0
    xs = [float(s) for s, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def trail(points: Points, n: int) -> list[tuple[int, float]]:
    """``n`` points spread evenly over the series, always ending with the latest."""
    if len(points) <= n:
        return [(int(s), float(v)) for s, v in points]
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [(int(points[i][0]), float(points[i][1])) for i in idx]


def value_at(points: Points, step: int) -> float | None:
    """The last value logged at or before ``step``."""
    best = None
    for s, v in points:
        if s <= step:
            best = v
        else:
            break
    return best


#: Distinct steps a run logs before a missing evaluation metric is taken to be missing for good (a
#: run that evaluates per epoch logs its first evaluation well after its first training metrics).
MISSING_METRIC_AFTER = 20


def eval_steps(policy: Policy, history: Mapping[str, Points]) -> list[int]:
    """Steps at which the policy's ``eval_metric`` was logged (what ``Window.evals`` counts).

    A job that never logs the evaluation metric (only a training loss, say) counts the points of
    its first mapped metric instead, so windows in evaluations still pass; but only once it has
    logged ``MISSING_METRIC_AFTER`` of them. Before that its first evaluation may simply not have
    come yet, and a handful of mini-batch losses would pass a warm-up of a few "evaluations".
    """
    return _eval_steps(policy, resolve_roles(policy, list(history)), history)


def _eval_steps(policy: Policy, roles: Mapping[str, str], history: Mapping[str, Points]) -> list[int]:
    """:func:`eval_steps` with the run's roles already resolved."""
    key = roles.get(policy.limits.eval_metric)
    if key is None:
        key = next(iter(roles.values()), None)
        if key is None or len(history[key]) < MISSING_METRIC_AFTER:
            return []
    return sorted({int(s) for s, _ in history[key]})


def build_snapshot(
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
    signals = derive_signals(series, {roles[r]: history[roles[r]] for r in roles}, max(restarts, default=None))
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
        **kw,
    )


def derive_signals(
    series: Mapping[str, SeriesStats], by_key: Mapping[str, Points], restarted_at: int | None = None
) -> dict[str, float | bool]:
    """Named signals the rules read and the LLM is shown: gaps, flags, ratios.

    ``restarted_at``: the step from which the run went on from a restored checkpoint (the latest
    rollback), if any; trends are read from there, not across the jump.
    """
    sig: dict[str, float | bool] = {}
    # Only losses, gradients and goals count: SB3 logs explained_variance as NaN whenever returns are constant.
    sig["nonfinite"] = any(s.nonfinite for r, s in series.items() if r.split("[", 1)[0] in WATCHED_FOR_NONFINITE)
    train, val = series.get("train_loss"), series.get("val_loss")
    if train and val:
        train_pts = by_key[train.key]
        val_pts = [p for p in by_key[val.key] if _usable(p[1])]
        gaps = []
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
            sig["window_improvement"] = -fitted_change(window) / scale
    if train is not None and train.n >= 3 and not train.nonfinite:
        # Share of all progress made so far that was lost again: 0 at the best, 1 back at the worst.
        # Relative to the range, not to the best value, so a loss near 0 wobbling is not "divergence";
        # of the smoothed curve, so a job logging one noisy mini-batch's loss is not "divergence" either.
        usable = [(st, v) for st, v in by_key[train.key] if _usable(v)]
        ema = running_ema([v for _, v in usable])
        best, worst = min(ema), max(ema)
        sig["train_lost_progress"] = (ema[-1] - best) / max(worst - best, 1e-8)
        sig["train_smoothed_best_step"] = usable[ema.index(best)][0]
        sig["train_smoothed"], sig["train_smoothed_best"], sig["train_smoothed_worst"] = ema[-1], best, worst
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
        # Progress across the trailing window by a least-squares fit: noisy end points decide nothing.
        sig["return_window_gain"] = fitted_change(finite[-WINDOW:])
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
