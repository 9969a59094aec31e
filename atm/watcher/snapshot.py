"""Snapshot building: running statistics of a run's metrics, folded in as points arrive.

A :class:`RunTelemetry` keeps, per metric the policy maps, O(1) summaries (count, EMA, best, min,
max, the smoothed curve's extremes) and short rings (the trailing window, the recent points for
looking a value up by step, every k-th point for the trend trail); each poll folds in only the
points that are new, so its cost depends on what is new, not on the run's length. The one
full-length structure is each mapped metric's list of distinct steps (8 bytes a step), which
windows counted in evaluations need. :func:`build_snapshot` folds a whole history at once and
gives the same snapshot as any split of the same points into polls.

No I/O here. The daemon hands in what the backend read; tests hand in lists.
"""

from __future__ import annotations

import bisect
import fnmatch
import itertools
import math
import statistics
from array import array
from collections import Counter, deque
from collections.abc import Mapping, Sequence, Sized

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
#: Points of a series kept for its trend trail: every k-th usable point, k the smallest power of two
#: that keeps at most this many (the trail is spread over them and ends with the latest).
THIN_CAP = 256
#: Recent points of a series kept for looking up its value at a step (the train loss at an
#: evaluation's step, a metric at an intervention's step); older steps read the thinned points.
RECENT = 4096
#: A series value more than this share above the one before it rose (an lr: a warm-up's steps) ...
RISE_TOL = 0.001
#: ... and one more than this share away from it jumped (an lr: a step schedule's or a user's cut, a
#: restart). A cosine's or linear decay's moves, logged whenever the lr moved 1%, are far smaller.
JUMP_TOL = 0.2
#: Evaluations since the lr last rose or jumped (or since a restore, or atm's last change) that a pace
#: is read over: the latest half of them against all of them.
PACE_MIN_EVALS = 6


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


def prefer_moving(roles: Mapping[str, str], policy: Policy, history: Mapping[str, Sized]) -> dict[str, str]:
    """``roles``, but a role read from a key logged once (a job that logs its configured lr at the start)
    is read from the listener's series of it (``atm/lr``, a later candidate of the same role) once that
    has two points or more: a value logged once says nothing of a warm-up or a schedule's cut. Pure."""
    out = dict(roles)
    for role, key in roles.items():
        if key.startswith("atm/") or len(history.get(key, ())) > 1:
            continue
        listener = next((c for c in policy.metrics.get(role, ()) if c.startswith("atm/") and not _is_pattern(c)), None)
        if listener is not None and len(history.get(listener, ())) > 1:
            out[role] = listener
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
    roles = resolve_roles(policy, logged) if logged else {}
    if not logged or role in roles:
        return ""
    advice = judge_by_return(policy, roles)
    if advice:
        return f"no metric for {role}: {advice}, and pass --policy FILE"
    wanted = ", ".join(policy.metrics.get(role, [])) or "nothing (the policy has no such role)"
    shown = ", ".join(logged[:12]) + (f" and {len(logged) - 12} more" if len(logged) > 12 else "")
    return (
        f"no metric for {role} (policy {policy.name} looks for: {wanted}); the run logs: {shown}. "
        f"If one of these is it, map it in a policy file (metrics: {{{role}: [NAME]}}) and pass --policy FILE "
        f"(`atm policy show {policy.name}` prints one to start from)"
    )


def judge_by_return(policy: Policy, roles: Mapping[str, str]) -> str:
    """For a run judged by a success rate it does not log but that logs a return (most gymnasium tasks,
    ``roles`` as :func:`resolve_roles` maps them): how to judge it by its return instead; "" otherwise.
    Mapping a success rate it never logs is not the fix (a trial's user was told to). Pure."""
    role = policy.limits.eval_metric
    if role not in ("safe_success", "success") or role in roles or "return" not in roles:
        return ""
    return (f"the run logs a return ({roles['return']}) and no success rate; judged by its return, a run is "
            f"stalled or done only against the return that solves the task: in a policy file, extends: "
            f"{policy.name}, limits: {{eval_metric: return}}, thresholds: {{solved_return: N}} (CartPole-v1: 475)")


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


#: Knobs that act on the train loss alone (dropout is off at evaluation): a change of one moves the
#: train/val gap at once, so gap evidence from before it says nothing about the new value. Seen: train
#: above val "across the last 8 evaluations under dropout 0.1" when 6 of them were under 0.5.
GAP_KNOBS = ("dropout",)


def restart_steps(records: Sequence[DecisionRecord]) -> tuple[list[int], list[int]]:
    """The steps applied rollbacks took effect at, and those applied changes of a :data:`GAP_KNOBS` knob did. Pure."""
    done = [r for r in records if r.status == Status.APPLIED and r.effective_step is not None]
    return ([r.effective_step for r in done if r.action == Action.ROLLBACK],  # type: ignore[misc]
            [r.effective_step for r in done if any(k in r.changes for k in GAP_KNOBS)])  # type: ignore[misc]


def held_count(values: Sequence[float]) -> int:
    """How many of the last ``values`` equal the last one (to a relative 1e-9). Pure."""
    if not values:
        return 0
    last, n = values[-1], 0
    for v in reversed(values):
        if not math.isclose(v, last, rel_tol=1e-9, abs_tol=1e-12):
            break
        n += 1
    return n


def fitted_start(points: Points) -> float:
    """Where a least-squares line through ``points`` is at their first step (nan for none)."""
    if not points:
        return math.nan
    mx = sum(s for s, _ in points) / len(points)
    my = sum(v for _, v in points) / len(points)
    return my + slope(points) * (points[0][0] - mx)


def window_improvement(points: Points) -> tuple[float, float]:
    """The relative improvement of a loss across ``points`` by a least-squares fit (positive: getting
    better), and the half-width of its 95% confidence interval (inf when there is no scatter to judge
    by). Pure.

    A share of where the line began, not of the best value: after a spike (the first evaluations after
    a restore, a warm-up) the best is far below the window's start, and the fall from 2.35 to 1.05 read
    "107.7% over the window". A loss that never went below 0 is held at 100%: a line through a sharp
    fall that flattens out ends below 0, and no loss loses more than all of itself.
    """
    change, ci = fitted_change_ci(points)
    scale = max(abs(fitted_start(points)), 1e-8)
    improvement = -change / scale
    if improvement > 1 and all(v >= 0 for _, v in points):
        improvement = 1.0
    return improvement, ci / scale


def pace(first: tuple[int, float], latest: Points) -> tuple[float, float, float] | None:
    """How fast a loss fell over ``latest`` (its last points) against how fast it fell on average since
    ``first``, by a least-squares fit through ``latest``; and the relative improvement across ``latest``
    with its 95% confidence interval's half-width (:func:`window_improvement`). None when the loss did
    not fall since ``first``. Pure.

    A loss at a well-chosen step size falls fast and then slows (about 0.1-0.5 by this measure over the
    latest half of a run); one that falls as fast late as early (1 or more) is held back by its step
    size, not by what is left to learn.
    """
    if len(latest) < 3 or latest[-1][0] <= first[0]:
        return None
    now = fitted_start(latest) + fitted_change(latest)  # the fitted line at the latest step
    average = (first[1] - now) / (latest[-1][0] - first[0])
    if average <= 0:
        return None
    improvement, ci = window_improvement(latest)
    return -slope(latest) / average, improvement, ci


def fitted_change(points: Points) -> float:
    """How much a least-squares line through ``points`` moves from their first step to their last."""
    return slope(points) * (points[-1][0] - points[0][0]) if points else 0.0


#: Two-sided 95% quantiles of Student's t for 1-30 degrees of freedom (beyond, the normal's 1.96 plus a
#: small-sample term that is within 0.01 of the table from 30 on).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` degrees of freedom (inf for none)."""
    if df < 1:
        return math.inf
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def fitted_change_ci(points: Points) -> tuple[float, float]:
    """:func:`fitted_change` and the half-width of its 95% confidence interval, from the scatter of
    ``points`` around the line: the run's own noise says how sure the trend is. The half-width is inf
    with fewer than three distinct steps (no scatter to judge by)."""
    change = fitted_change(points)
    n = len(points)
    if n < 3:
        return change, math.inf
    xs = [float(s) for s, _ in points]
    mx = sum(xs) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return change, math.inf
    b = slope(points)
    my = sum(v for _, v in points) / n
    sse = sum((v - (my + b * (x - mx))) ** 2 for x, (_, v) in zip(xs, points))
    se = math.sqrt(sse / (n - 2) / sxx)
    return change, t975(n - 2) * se * (points[-1][0] - points[0][0])


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """The mean of ``values`` and the half-width of its 95% confidence interval (inf for fewer than two)."""
    n = len(values)
    if n == 0:
        return 0.0, math.inf
    m = sum(values) / n
    if n < 2:
        return m, math.inf
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, t975(n - 1) * sd / math.sqrt(n)


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
    """``n`` points spread evenly over ``points``, always ending with the latest."""
    if len(points) <= n:
        return [(int(s), float(v)) for s, v in points]
    idx = sorted({round(i * (len(points) - 1) / (n - 1)) for i in range(n)})
    return [(int(points[i][0]), float(points[i][1])) for i in idx]


def value_at(points: Points, step: int) -> float | None:
    """The last value logged at or before ``step`` (``points`` sorted by step)."""
    i = bisect.bisect_right(points, step, key=lambda p: p[0])
    return points[i - 1][1] if i else None



class Recent(Sequence[tuple[int, float]]):
    """The last ``size`` points of a series, ``(step, value)``, in two typed arrays: 16 bytes a point,
    where a deque of tuples takes about 100 (4,096 points of 3 metrics of 200 runs held 250 MB)."""

    __slots__ = ("size", "steps", "values")

    def __init__(self, size: int) -> None:
        self.size = size
        self.steps = array("q")
        self.values = array("d")

    def append(self, point: tuple[int, float]) -> None:
        self.steps.append(point[0])
        self.values.append(point[1])
        if len(self.steps) > self.size + self.size // 4:  # cut in batches: an array's front moves the rest
            del self.steps[: len(self.steps) - self.size]
            del self.values[: len(self.values) - self.size]

    def _start(self) -> int:
        return max(0, len(self.steps) - self.size)

    def __len__(self) -> int:
        return len(self.steps) - self._start()

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        k = self._start()
        if isinstance(i, slice):
            r = range(k, len(self.steps))[i]
            return [(self.steps[j], self.values[j]) for j in r]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"point {i} of the last {n}")
        j = k + (i + n if i < 0 else i)
        return self.steps[j], self.values[j]

    def __iter__(self):  # type: ignore[no-untyped-def, override]
        k = self._start()
        return zip(self.steps[k:], self.values[k:])

    def since(self, step: int) -> tuple[int, tuple[int, float] | None]:
        """How many of these points are at or after ``step``, and the first usable one of them. O(log n)
        to find them, then as many as are unusable in a row."""
        j = i = bisect.bisect_left(self.steps, step, lo=self._start())
        while j < len(self.steps) and not _usable(self.values[j]):
            j += 1
        return len(self.steps) - i, ((self.steps[j], self.values[j]) if j < len(self.steps) else None)


class SmoothedSince:
    """The smoothed curve (:data:`EMA_ALPHA`) of a series' usable points from step ``since`` on, started
    afresh at the first of them, and its extremes: the train loss as the model restored at ``since``
    has made it, with nothing of the model the restore replaced."""

    __slots__ = ("since", "seen", "n", "ema", "best", "best_step", "worst")

    def __init__(self, since: int) -> None:
        self.since = since
        #: Points of the series (usable or not, before ``since`` or not) looked at so far.
        self.seen = 0
        self.n = 0
        self.ema = self.best = self.worst = math.nan
        self.best_step = 0

    def add(self, step: int, value: float) -> None:
        if step < self.since or not _usable(value):
            return
        if self.n == 0:
            self.ema = self.best = self.worst = value
            self.best_step = step
        else:
            self.ema = EMA_ALPHA * value + (1 - EMA_ALPHA) * self.ema
            if self.ema < self.best:
                self.best, self.best_step = self.ema, step
            self.worst = max(self.worst, self.ema)
        self.n += 1


class SeriesState:
    """Running statistics of one metric series, folded a point at a time in step order.

    Memory is bounded but for ``steps`` (the distinct steps, 8 bytes each, kept only with
    ``track_steps``: the run's evaluation series, whose steps windows counted in evaluations
    need): O(1) summaries, the last ``WINDOW`` usable points, the last ``recent`` points, and at
    most ``thin_cap`` thinned points for the trail.
    """

    def __init__(self, key: str, higher_is_better: bool = False, *, thin_cap: int = THIN_CAP,
                 recent: int = RECENT, track_steps: bool = True) -> None:
        self.key = key
        self.higher_is_better = higher_is_better
        self.thin_cap = thin_cap
        self.n = 0
        self.first_step = 0
        self.last: tuple[int, float] = (0, math.nan)
        #: Whether each of the last WINDOW points (usable or not) was usable.
        self.tail_usable: deque[bool] = deque(maxlen=WINDOW)
        #: The last WINDOW usable points.
        self.window: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        #: The last ``recent`` points, usable or not, for :meth:`value_at`.
        self.recent = Recent(recent)
        self.track_steps = track_steps
        self.steps = array("q")
        self.n_usable = 0
        self.ema = math.nan
        #: Extremes of the smoothed curve, and the first step of its minimum.
        self.ema_min = self.ema_max = math.nan
        self.ema_min_step = 0
        self.best = self.min = self.max = math.nan
        self.best_step = 0
        #: Every ``stride``-th usable point (by usable index), for the trail.
        self.thin: list[tuple[int, float]] = []
        self.stride = 1
        #: The last three usable values and the best of their running means (returns read that way).
        self.last3: deque[float] = deque(maxlen=3)
        self.best_mean3 = -math.inf
        #: The last step whose value rose above the usable value before it (by more than RISE_TOL), and
        #: the last whose value moved from it by more than JUMP_TOL either way: read of the lr series,
        #: the end of a warm-up and a step schedule's (or a user's) cut.
        self.rise_step: int | None = None
        self.jump_step: int | None = None
        self._since: SmoothedSince | None = None

    def add(self, step: int, value: float) -> None:
        step, value = int(step), float(value)
        if self.n == 0:
            self.first_step = step
        if self.track_steps and (not self.steps or step > self.steps[-1]):
            self.steps.append(step)
        self.n += 1
        self.last = (step, value)
        self.recent.append((step, value))
        ok = _usable(value)
        self.tail_usable.append(ok)
        if not ok:
            return
        i = self.n_usable
        self.n_usable += 1
        self.window.append((step, value))
        if i == 0:
            self.ema = self.ema_min = self.ema_max = value
            self.ema_min_step = step
            self.best = self.min = self.max = value
            self.best_step = step
        else:
            prev = self.window[-2][1]
            if value > prev * (1 + RISE_TOL) if prev >= 0 else value > prev * (1 - RISE_TOL):
                self.rise_step = step
            if abs(value - prev) > JUMP_TOL * abs(prev):
                self.jump_step = step
            self.ema = EMA_ALPHA * value + (1 - EMA_ALPHA) * self.ema
            if self.ema < self.ema_min:
                self.ema_min, self.ema_min_step = self.ema, step
            self.ema_max = max(self.ema_max, self.ema)
            if (value > self.best) if self.higher_is_better else (value < self.best):
                self.best, self.best_step = value, step
            self.min, self.max = min(self.min, value), max(self.max, value)
        if i % self.stride == 0:
            self.thin.append((step, value))
            if len(self.thin) > self.thin_cap:
                # Keep every other one: the kept points are exactly every (2 * stride)-th usable point,
                # whatever the split of the series into polls.
                self.thin = self.thin[::2]
                self.stride *= 2
        self.last3.append(value)
        self.best_mean3 = max(self.best_mean3, sum(self.last3) / len(self.last3))

    @property
    def noise(self) -> float:
        """One value's standard deviation around the series' trend, over the window: the median of the
        successive values' absolute differences, scaled (a difference of two values has sd sigma * sqrt(2);
        the median of its absolute value is 0.6745 of that). The median, so that one step (a fall, a
        jump while learning) does not pass for noise; differences, so that a trend does not either.
        nan below 3 values."""
        vals = [v for _, v in self.window]
        if len(vals) < 3:
            return math.nan
        return statistics.median(abs(b - a) for a, b in itertools.pairwise(vals)) / (0.6745 * math.sqrt(2))

    def smoothed_since(self, step: int) -> SmoothedSince:
        """The smoothed curve from ``step`` on (see :class:`SmoothedSince`).

        Kept between calls and advanced by the points added since the last, so that asking at every
        poll costs what is new. Built afresh from the recent points when ``step`` changes (a later
        restore): exact while ``step`` is among the last ``recent`` points, read from those alone beyond.
        """
        since = self._since
        new = self.n - since.seen if since is not None and since.since == step else None
        if since is None or new is None or new > len(self.recent):
            since, new = SmoothedSince(step), len(self.recent)
        for s, v in self.recent[len(self.recent) - new:]:
            since.add(s, v)
        since.seen = self.n
        self._since = since
        return since

    def since(self, step: int) -> tuple[int, tuple[int, float] | None]:
        """How many points were logged at or after ``step``, and the first usable one of them: exact
        within the recent points; before them, the count is of the distinct steps when they are kept
        (else of every point) and the point is the first thinned one at or after ``step``."""
        rec = self.recent
        if rec and step >= rec[0][0]:
            return rec.since(step)
        if self.track_steps and self.steps:
            n = len(self.steps) - bisect.bisect_left(self.steps, step)
        else:
            n = self.n
        return n, next(((s, v) for s, v in self.thin if s >= step), None)

    def value_at(self, step: int) -> float | None:
        """The last value logged at or before ``step``: exact within the recent points, read from the
        thinned points before them."""
        if self.recent and step >= self.recent[0][0]:
            return value_at(self.recent, step)  # type: ignore[arg-type]
        return value_at(self.thin, step)

    def trail(self) -> list[tuple[int, float]]:
        pts = list(self.thin)
        if self.window and pts[-1] != self.window[-1]:
            pts.append(self.window[-1])
        return trail(pts, TRAIL)

    def stats(self) -> SeriesStats | None:
        if self.n == 0:
            return None
        last_step, latest = self.last
        # Only the trailing window: a NaN the run has since recovered from (after a rollback, say)
        # must not read as divergence for the rest of the run.
        nonfinite = not all(self.tail_usable)
        if self.n_usable == 0:
            return SeriesStats(
                key=self.key, n=self.n, first_step=self.first_step, last_step=last_step, latest=latest, ema=latest,
                slope=0.0, window_mean=latest, window_std=0.0, best=latest, best_step=last_step,
                steps_since_best=0, min=latest, max=latest, nonfinite=True, trail=[],
            )
        window = list(self.window)
        mean = sum(v for _, v in window) / len(window)
        std = math.sqrt(sum((v - mean) ** 2 for _, v in window) / len(window))
        return SeriesStats(
            key=self.key, n=self.n, first_step=self.first_step, last_step=last_step, latest=latest, ema=self.ema,
            slope=slope(window) * 1000.0, window_mean=mean, window_std=std, best=self.best,
            best_step=self.best_step, steps_since_best=last_step - self.best_step, min=self.min, max=self.max,
            nonfinite=nonfinite, trail=self.trail(),
        )


def series_stats(key: str, points: Points, higher_is_better: bool = False) -> SeriesStats | None:
    """Windowed statistics of one series held in memory (sorted by step here). ``None`` for an empty series."""
    state = SeriesState(key, higher_is_better)
    for s, v in sorted(points, key=lambda p: p[0]):
        state.add(s, v)
    return state.stats()


class _Gaps:
    """The train/val gap at each evaluation, folded as the two series arrive (merged in step order).

    The gap at an evaluation of step s is val minus the last train value at or before s. It is final
    once the train loss has moved past s; until then it is read at snapshot time from the latest
    train value (no later train point can be at or before s yet).
    """

    def __init__(self, train_key: str, val_key: str) -> None:
        self.keys = (train_key, val_key)
        self.first: tuple[int, float] | None = None
        self.tail: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        #: Gaps at or after the val loss's best evaluation: the last WINDOW, how many, and the one at it.
        self.since_best: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self.n_since_best = 0
        self.at_best: float | None = None
        self.best_step: int | None = None
        #: Evaluations whose train value is not final yet: (step, val).
        self.pending: deque[tuple[int, float]] = deque()

    def on_train(self, train: SeriesState, step: int) -> None:
        """Before ``train`` takes a point at ``step``: evaluations before it are final now."""
        while self.pending and self.pending[0][0] < step:
            s, v = self.pending.popleft()
            self._final(s, v, train.last[1] if train.n else None)

    def on_val(self, train: SeriesState, val: SeriesState, step: int, value: float) -> None:
        """After ``val`` took a point."""
        if val.best_step == step and self.best_step != step and val.n_usable and _usable(value):
            # A new best evaluation: the gaps that count for widening start again from its step (with
            # those of earlier evaluations logged at that same step).
            self.best_step = step
            self.since_best = deque((g for g in self.tail if g[0] >= step), maxlen=WINDOW)
            self.n_since_best = len(self.since_best)
            self.at_best = next((g for s, g in self.since_best if s == step), None)
        if not _usable(value):
            return
        if train.n and train.last[0] > step:
            self._final(step, value, train.value_at(step))
        else:
            self.pending.append((step, value))

    def _final(self, step: int, val: float, train: float | None) -> None:
        if train is None or not _usable(train):
            return
        if self.first is None:
            self.first = (step, val - train)
        self.tail.append((step, val - train))
        if self.best_step is not None and step >= self.best_step:
            self.since_best.append((step, val - train))
            self.n_since_best += 1
            if step == self.best_step and self.at_best is None:
                self.at_best = val - train

    def window(self, train: SeriesState) -> list[tuple[int, float]]:
        """The gaps at the last ``WINDOW`` evaluations, the latest read from the latest train value."""
        t = train.last[1] if train.n else None
        provisional = [(s, v - t) for s, v in self.pending] if t is not None and _usable(t) else []
        return (list(self.tail) + provisional)[-WINDOW:]

    def signals(self, train: SeriesState, val: SeriesState) -> dict[str, float]:
        t = train.last[1] if train.n else None
        provisional = [(s, v - t) for s, v in self.pending] if t is not None and _usable(t) else []
        tail = list(self.tail) + provisional
        if not tail:
            return {}
        since = list(self.since_best) + [g for g in provisional if self.best_step is not None and g[0] >= self.best_step]
        n_since = self.n_since_best + (len(since) - len(self.since_best))
        at_best = self.at_best
        if at_best is None:
            at_best = next((g for s, g in provisional if s == self.best_step), None)
        first = self.first[1] if self.first is not None else provisional[0][1]
        return {
            "gap": tail[-1][1],
            # Widening is judged from the val best on when there is enough of it: a window reaching back
            # past a rollback's drop would read the drop as a narrowing gap.
            "gap_slope": slope((since if n_since >= 3 else tail)[-WINDOW:]) * 1000.0,
            "gap_ratio": val.last[1] / train.ema if train.ema > 0 else float("inf"),
            "gap_at_best": at_best if at_best is not None else first,
        }


def lost_progress(ema: float, best: float, best_step: int, worst: float) -> dict[str, float]:
    """The train-loss signals of its smoothed curve, now at ``ema``, at ``best`` (first reached at
    ``best_step``) and ``worst``: the share of the progress made that was lost again, 0 at the best,
    1 back at the worst. Relative to the range, not to the best value, so a loss near 0 wobbling is not
    "divergence"; of the smoothed curve, so a job logging one noisy mini-batch's loss is not either. Pure."""
    return {"train_lost_progress": (ema - best) / max(worst - best, 1e-8), "train_smoothed_best_step": best_step,
            "train_smoothed": ema, "train_smoothed_best": best, "train_smoothed_worst": worst}


def gap_window_signals(gaps: Points, scale: float, vals: Points = ()) -> dict[str, float]:
    """The train/val gap over the trailing window of evaluations, relative to ``scale`` (the val loss's
    best): its mean and fitted change across the window, each with the half-width of its 95% confidence
    interval; and val loss's own fitted fall over the same steps (of ``vals``, its trailing values).
    Train and val moving apart (the gap widening beyond its noise) is the sign of a model starting to
    memorise, when little of train's fall (val's fall plus the widening) still reaches val; a gap below
    zero throughout (train worse than val) that of a regulariser that costs the training loss more
    than it is worth. Empty with fewer than four gaps (a remedy wants more than a line through three
    points). Pure."""
    if len(gaps) < 4:
        return {}
    mean, mean_ci_ = mean_ci([g for _, g in gaps])
    change, change_ci = fitted_change_ci(gaps)
    if not (math.isfinite(mean_ci_) and math.isfinite(change_ci)):
        return {}
    out = {"gap_mean": mean / scale, "gap_mean_ci": mean_ci_ / scale,
           "gap_trend": change / scale, "gap_trend_ci": change_ci / scale, "gap_evals": float(len(gaps))}
    same = [(s, v) for s, v in vals if s >= gaps[0][0]]
    if len(same) >= 3:
        out["gap_val_fall"] = -fitted_change(same) / scale
    return out


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


class RunTelemetry:
    """A run's telemetry, kept up to date by folding in only the points each poll brings.

    ``fold(history)`` reads each mapped metric's points past the ones already folded; a series that
    did not simply grow (a job resumed from a checkpoint logs its steps again, and the backend
    rewrites it) is refolded from the history given. ``snapshot()`` costs O(metrics x window),
    whatever the run's length (and once after each rollback, the train loss's recent points).
    """

    def __init__(self, policy: Policy, *, thin_cap: int = THIN_CAP, recent: int = RECENT) -> None:
        self.policy = policy
        self._thin_cap, self._recent = thin_cap, recent
        self.roles: dict[str, str] = {}
        self._keys: frozenset[str] = frozenset()
        #: Roles as the keys alone resolve them (before :func:`prefer_moving`).
        self._resolved: dict[str, str] = {}
        self._series: dict[str, SeriesState] = {}
        #: key -> (points folded, first point, last point folded): how a grown series is told from a rewritten one.
        self._folded: dict[str, tuple[int, tuple[int, float], tuple[int, float]]] = {}
        self._gaps: _Gaps | None = None
        #: The latest step of any metric, mapped or not (the run's step before any mapped metric shows).
        self._any_step = 0

    def fold(self, history: Mapping[str, Points]) -> bool:
        """Fold in what is new in ``history`` (key -> points sorted by step, as a backend keeps them).

        Returns whether any mapped metric had new points. Reads only the points past those folded
        before, but for a series that must be folded again from its start (rewritten, out of step
        order, or one whose steps became needed). If its first points were released
        (:meth:`~atm.adapters.base.PointSeries.release`), that raises
        :class:`~atm.adapters.base.HistoryTrimmed` and this telemetry is unusable: read the run anew
        and fold it into a new one.
        """
        keys = frozenset(history)
        if keys != self._keys:
            self._keys, self._resolved = keys, resolve_roles(self.policy, sorted(keys))
        roles = prefer_moving(self._resolved, self.policy, history)
        if roles != self.roles:
            self._remap(roles)
        self._any_step = max((int(pts[-1][0]) for pts in history.values() if pts), default=self._any_step)
        gaps = self._gaps
        new: dict[str, list[tuple[int, float]]] = {}
        for key, state in self._series.items():
            pts = history[key]
            n, first, last = self._folded.get(key, (0, None, None))
            if n and (len(pts) < n or not _same(_point(pts[0]), first) or not _same(_point(pts[n - 1]), last)):
                # Not an append: the backend rewrote the series. Fold it again from the start.
                state = self._series[key] = self._fresh(key)
                if gaps is not None and key in gaps.keys:
                    gaps = self._gaps = None
                n = 0
            if len(pts) > n:
                fresh = [_point(p) for p in pts[n:]]
                if not _in_order(fresh, state.last[0] if state.n else None):
                    # Points older than ones already folded (a tracker that keeps arrival order): the
                    # statistics are of the series in step order, so fold it again, sorted.
                    state = self._series[key] = self._fresh(key)
                    if gaps is not None and key in gaps.keys:
                        gaps = self._gaps = None
                    fresh = sorted((_point(p) for p in pts), key=lambda p: p[0])
                new[key] = fresh
                self._folded[key] = (len(pts), _point(pts[0]), _point(pts[-1]))
        if gaps is None and "train_loss" in self.roles and "val_loss" in self.roles:
            gaps = self._gaps = _Gaps(self.roles["train_loss"], self.roles["val_loss"])
            val_key = gaps.keys[1]
            val = self._series[val_key]
            if val.n:
                # Evaluations folded before the pair was whole have no gaps yet: fold the val series
                # again with them, from its own recent points while they hold it all (the backend may
                # have released them). A train series folded before keeps its statistics: a gap needs
                # only the train value at its evaluation's step, which the train state looks up.
                if val.n <= len(val.recent):
                    whole = list(val.recent) + new.get(val_key, [])
                else:
                    whole = [_point(p) for p in history[val_key]]
                self._series[val_key] = self._fresh(val_key)
                new[val_key] = sorted(whole, key=lambda p: p[0])
        for key, pts in new.items():
            if gaps is not None and key in gaps.keys:
                continue
            state = self._series[key]
            for s, v in pts:
                state.add(s, v)
        if gaps is not None:
            self._fold_pair(gaps, new.get(gaps.keys[0], []), new.get(gaps.keys[1], []))
        return bool(new)

    def _remap(self, roles: dict[str, str]) -> None:
        """Roles changed (a metric appeared): keep the series whose reading did not change, start the
        rest (folded from their start by the caller)."""
        old = {key: role for role, key in self.roles.items()}
        self.roles = roles
        steps_key = self._steps_key()
        kept: dict[str, SeriesState] = {}
        for role, key in roles.items():
            state = self._series.get(key)
            same_reading = key in old and (_base(old[key]) in HIGHER_IS_BETTER) == (_base(role) in HIGHER_IS_BETTER)
            if state is not None and same_reading and (state.track_steps or key != steps_key):
                kept[key] = state
            else:
                kept[key] = self._fresh(key)
                self._folded.pop(key, None)
        if steps_key is not None:
            for key, state in kept.items():
                if key != steps_key and state.track_steps:
                    state.track_steps, state.steps = False, array("q")  # the evaluation metric's steps count now
        self._series = kept
        self._folded = {k: v for k, v in self._folded.items() if k in kept}
        pair = (roles.get("train_loss"), roles.get("val_loss"))
        if self._gaps is not None and self._gaps.keys != pair:
            self._gaps = None

    def _steps_key(self) -> str | None:
        """The series whose distinct steps count as evaluations (see :func:`eval_steps`), once the run
        logs the policy's evaluation metric. Until then every mapped series keeps its steps: which one
        stands in for it depends on the keys the run will have logged by then."""
        return self.roles.get(self.policy.limits.eval_metric)

    def _fresh(self, key: str) -> SeriesState:
        role = next((r for r, k in self.roles.items() if k == key), "")
        return SeriesState(key, _base(role) in HIGHER_IS_BETTER, thin_cap=self._thin_cap, recent=self._recent,
                           track_steps=self._steps_key() in (None, key))

    def _fold_pair(self, gaps: _Gaps, train_new: Sequence[tuple[int, float]],
                   val_new: Sequence[tuple[int, float]]) -> None:
        """Fold new train and val points merged in step order (train first at equal steps: the gap
        at an evaluation reads the train value logged at its step)."""
        train, val = self._series[gaps.keys[0]], self._series[gaps.keys[1]]
        i = j = 0
        while i < len(train_new) or j < len(val_new):
            if j >= len(val_new) or (i < len(train_new) and train_new[i][0] <= val_new[j][0]):
                s, v = train_new[i]
                gaps.on_train(train, s)
                train.add(s, v)
                i += 1
            else:
                s, v = val_new[j]
                val.add(s, v)
                gaps.on_val(train, val, s, v)
                j += 1

    # ------------------------------------------------------------------ reading

    def series(self) -> dict[str, SeriesStats]:
        out = {}
        for role, key in self.roles.items():
            st = self._series[key].stats()
            if st is not None:
                out[role] = st
        return out

    def step(self, series: Mapping[str, SeriesStats] | None = None) -> int:
        """The run's step: the latest of its mapped metrics, or of any metric before one shows."""
        series = self.series() if series is None else series
        return max((s.last_step for s in series.values()), default=0) if series else self._any_step

    def eval_steps(self) -> Sequence[int]:
        """Steps at which the policy's ``eval_metric`` was logged (see :func:`eval_steps`). Not a copy."""
        key = self._steps_key()
        if key is None:
            key = next(iter(self.roles.values()), None)
            if key is None or self._series[key].n < MISSING_METRIC_AFTER:
                return ()
        return self._series[key].steps

    def eval_series(self) -> tuple[str, bool, list[tuple[int, float]]] | None:
        """The metric changes are judged on (the policy's ``eval_metric``, else the first mapped one):
        its key, whether higher is better, and its recent points."""
        role = self.policy.limits.eval_metric
        key = self.roles.get(role)
        if key is None:
            role, key = next(iter(self.roles.items()), (role, None))
        if key is None:
            return None
        state = self._series[key]
        return key, state.higher_is_better, list(state.recent)

    def signals(
        self, series: Mapping[str, SeriesStats], restarted_at: int | None = None, gaps_from: int | None = None,
        changed_at: int | None = None,
    ) -> dict[str, float | bool]:
        """Named signals the rules read and the LLM is shown: gaps, flags, ratios.

        ``restarted_at``: the step from which the run went on from a restored checkpoint (the latest
        rollback), if any; trends and the train loss's progress are read from there, not across the
        jump. ``gaps_from``: the step from which the train/val gap's window is read (a rollback, or a
        change of dropout, which acts on the train loss alone and so moves the gap at once);
        ``restarted_at`` when not given. ``changed_at``: the step atm's latest applied change took
        effect at, from which (or from the lr's last rise or jump, if later) the loss's pace is read.
        """
        if gaps_from is None:
            gaps_from = restarted_at
        sig: dict[str, float | bool] = {}
        # Only losses, gradients and goals count: SB3 logs explained_variance as NaN whenever returns are constant.
        sig["nonfinite"] = any(s.nonfinite for r, s in series.items() if _base(r) in WATCHED_FOR_NONFINITE)
        train, val = series.get("train_loss"), series.get("val_loss")
        if train and val and self._gaps is not None:
            sig.update(self._gaps.signals(self._series[train.key], self._series[val.key]))
        primary = val or train
        if primary is not None and primary.n >= 3 and not primary.nonfinite:
            # Rise of the latest value over the best one, relative to the best.
            scale = max(abs(primary.best), 1e-8)
            sig["rise_over_best"] = (primary.latest - primary.best) / scale
            window = list(self._series[primary.key].window)
            if restarted_at is not None:
                # A fit across a rollback's jump reads the restore as a trend (a "plateau" seen right after it).
                window = [(st, v) for st, v in window if st >= restarted_at]
            # Relative improvement across the trailing window by a least-squares fit (positive: still
            # getting better); a fit, not the two end points, so one noisy evaluation does not decide it.
            # Fewer than 3 points since a rollback tell no trend yet.
            if len(window) >= 3:
                sig["window_improvement"], ci = window_improvement(window)
                # Its 95% confidence interval's half-width, from the scatter around the fit: a slow
                # improvement larger than this is real progress, not a plateau.
                if math.isfinite(ci):
                    sig["window_improvement_ci"] = ci
            sig.update(self._pace_signals(primary, restarted_at, changed_at))
            if train is not None and val is not None and self._gaps is not None:
                gaps = self._gaps.window(self._series[train.key])
                if gaps_from is not None:
                    gaps = [(st, g) for st, g in gaps if st >= gaps_from]
                sig.update(gap_window_signals(gaps, scale, list(self._series[val.key].window)))
        if train is not None and train.n >= 3 and not train.nonfinite:
            t = self._series[train.key]
            if restarted_at is None:
                sig.update(lost_progress(t.ema, t.ema_min, t.ema_min_step, t.ema_max))
            elif (since := t.smoothed_since(restarted_at)).n >= 3:  # fewer since a restore tell no trend yet
                # After a restore the best is the restored model's: going back from the replaced model's
                # 0.002 to the restored one's 0.52 is progress the restore gave back, not divergence. The
                # worst stays the run's (its start, mostly), so that progress is still counted from there:
                # the few points since a restore span so little that their noise would read as a large
                # share of it. A restored model that blows up passes that worst and is divergence as
                # before; non-finite values are divergence whatever this says.
                sig.update(lost_progress(since.ema, since.best, since.best_step, max(t.ema_max, since.worst)))
        goal = series.get("safe_success") or series.get("success") or series.get("return")
        if goal is not None and not goal.nonfinite:
            window_values = [v for _, v in self._series[goal.key].window]
            # Absolute gain across the trailing window (success rates are already on a 0-1 scale), of the
            # smoothed value: one lucky evaluation (0.00, 0.00, 0.08 on a few dozen episodes) is not
            # progress enough to stop pushing a stalled run, nor one unlucky one a regression.
            sig["goal_window_gain"] = smoothed(window_values) - window_values[0]
        ret = series.get("return")
        if ret is not None and not ret.nonfinite:
            # Returns are noisy and in the task's units: the mean of the last 3 evaluations, and how far it is
            # below the best such mean. (An EMA lags too far behind on evaluations a few dozen apart.)
            r = self._series[ret.key]
            recent = sum(r.last3) / len(r.last3)
            sig["return_recent"] = recent
            sig["return_recent_best"] = r.best_mean3
            sig["return_recent_drop"] = r.best_mean3 - recent
            noise = r.noise
            if math.isfinite(noise):
                sig["return_noise"] = noise
            # Progress across the trailing window by a least-squares fit: noisy end points decide nothing.
            sig["return_window_gain"] = fitted_change(list(r.window))
            # How many evaluations in a row ended exactly where the latest did: a return that repeats
            # with no spread at all sits at the task's ceiling (CartPole's 500) or is not being updated.
            sig["return_held"] = float(held_count([v for _, v in r.window]))
        lr = series.get("lr")
        if lr is not None and lr.n >= 3:
            # How far the lr rose across its trailing window, and the step that window starts at: a
            # schedule's warm-up, told apart from atm's own changes by the records after that step.
            w = self._series[lr.key].window
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

    def _pace_signals(self, primary: SeriesStats, restarted_at: int | None, changed_at: int | None) -> dict[str, float]:
        """The primary loss's :func:`pace` since the lr last rose or jumped, the run was restored or atm
        last changed something, whichever is latest: ``pace``, ``pace_improvement`` (with
        ``pace_improvement_ci`` when finite), ``pace_evals`` and ``pace_from``. None without an lr
        series (a warm-up could not be told from the rest) or with fewer than PACE_MIN_EVALS
        evaluations since. Costs O(log n) lookups and the window, whatever the run's length."""
        lr_key = self.roles.get("lr")
        lr = self._series[lr_key] if lr_key is not None else None
        if lr is None or lr.n == 0:
            return {}
        marks = [m for m in (restarted_at, changed_at, lr.rise_step, lr.jump_step) if m is not None]
        start = max(marks, default=0)
        state = self._series[primary.key]
        n, first = state.since(start)
        if n < PACE_MIN_EVALS or first is None:
            return {}
        latest = [(st, v) for st, v in state.window if st >= first[0]][-max(n // 2, 3):]
        read = pace(first, latest)
        if read is None:
            return {}
        p, improvement, ci = read
        out = {"pace": p, "pace_improvement": improvement, "pace_evals": float(n), "pace_from": float(first[0])}
        if math.isfinite(ci):
            out["pace_improvement_ci"] = ci
        return out

    def effects(self, records: Sequence[DecisionRecord], recent: int) -> list[Effect]:
        """Before/after values of the watched metrics for the last ``recent`` applied interventions, and
        how many evaluations were logged since each took effect."""
        applied = [r for r in records if r.status == Status.APPLIED][-recent:]
        watch = [r for r in ("val_loss", "train_loss", "safe_success", "success", "collision", "return") if r in self.roles]
        # Loss components too: whether a loss-weight change moved their balance is the test of that remedy.
        watch += sorted(r for r in self.roles if r.startswith("loss_components["))
        evals = self.eval_steps()
        out = []
        for rec in applied:
            ba: dict[str, tuple[float, float]] = {}
            for role in watch:
                state = self._series[self.roles[role]]
                before = state.value_at(rec.step)
                if before is not None and state.n:
                    ba[role] = (before, state.last[1])
            since = None if rec.effective_step is None else len(evals) - bisect.bisect_left(evals, rec.effective_step)
            out.append(Effect(seq=rec.seq, applied_step=rec.effective_step, changes=rec.changes,
                              diagnosis=rec.diagnosis, action=rec.action, before_after=ba, evals_since=since,
                              outcome=rec.effect))
        return out

    def snapshot(
        self,
        run_id: str,
        params: Mapping[str, float],
        records: Sequence[DecisionRecord] = (),
        run_name: str = "",
        now: float | None = None,
        recent: int = 3,
    ) -> TelemetrySnapshot:
        """The snapshot a proposer sees, from what has been folded so far."""
        series = self.series()
        restarts, gap_moves = restart_steps(records)
        changed = [r.effective_step for r in records if r.status == Status.APPLIED and r.effective_step is not None
                   and (r.changes or r.action is not None)]
        kw = {} if now is None else {"taken_at": now}
        return TelemetrySnapshot(
            run_id=run_id,
            run_name=run_name,
            step=self.step(series),
            series=series,
            signals=self.signals(series, max(restarts, default=None), max(restarts + gap_moves, default=None),
                                 max(changed, default=None)),
            params=dict(params),
            recent=self.effects(records, recent),
            applied=dict(Counter(r.diagnosis.value for r in records if r.status == Status.APPLIED)),
            **kw,
        )


def _in_order(points: Sequence[tuple[int, float]], after: int | None) -> bool:
    """Whether ``points`` are in step order and none is before step ``after``."""
    prev = after if after is not None else -math.inf
    for s, _ in points:
        if s < prev:
            return False
        prev = s
    return True


def _base(role: str) -> str:
    return role.split("[", 1)[0]


def _point(p: Sequence[float]) -> tuple[int, float]:
    return int(p[0]), float(p[1])


def _same(a: tuple[int, float], b: tuple[int, float] | None) -> bool:
    """Whether two points are the same one, NaN values included (a run whose first loss is NaN was
    read as rewritten, and folded again from its start, on every poll)."""
    return b is not None and a[0] == b[0] and (a[1] == b[1] or (math.isnan(a[1]) and math.isnan(b[1])))


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
    """The snapshot of a whole metric history at once (key -> (step, value) points, sorted here by step)."""
    telemetry = RunTelemetry(policy)
    telemetry.fold({k: sorted(pts, key=lambda p: p[0]) for k, pts in history.items()})
    return telemetry.snapshot(run_id, params, records, run_name=run_name, now=now, recent=recent)
