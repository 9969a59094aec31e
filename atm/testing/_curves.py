"""Synthetic metric curves: value shapes, and their placement on a step axis as a metric history.

A shape is a plain list of values; :func:`series` puts it on steps and :func:`make_history`
builds the ``key -> [(step, value), ...]`` mapping that :func:`atm.watcher.snapshot.build_snapshot`
reads. Noise is multiplicative and seeded, so every curve is the same on every run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

Points = list[tuple[int, float]]


def _noisy(values: list[float], noise: float, seed: int) -> list[float]:
    if noise <= 0:
        return values
    rng = random.Random(seed)
    return [v * (1.0 + noise * rng.gauss(0.0, 1.0)) for v in values]


def decay(n: int, start: float, end: float, *, rate: float = 3.0, noise: float = 0.0, seed: int = 0) -> list[float]:
    """``n`` values falling exponentially from ``start`` towards ``end`` (``rate`` e-folds over the curve).

    The last value is ``end + (start - end) * exp(-rate)``: with a small ``rate`` the curve is
    still clearly improving at its end, with a large one it has flattened out.
    """
    if n == 1:
        return _noisy([start], noise, seed)
    vals = [end + (start - end) * math.exp(-rate * i / (n - 1)) for i in range(n)]
    return _noisy(vals, noise, seed)


def ramp(n: int, start: float, end: float, *, noise: float = 0.0, seed: int = 0) -> list[float]:
    """``n`` values on a straight line from ``start`` to ``end``, both included."""
    if n == 1:
        return _noisy([start], noise, seed)
    return _noisy([start + (end - start) * i / (n - 1) for i in range(n)], noise, seed)


def flat(n: int, value: float, *, noise: float = 0.0, seed: int = 0) -> list[float]:
    """``n`` values around ``value``."""
    return _noisy([value] * n, noise, seed)


def valley(
    n: int, start: float, bottom: float, end: float, *, bottom_at: int, noise: float = 0.0, seed: int = 0
) -> list[float]:
    """Falls from ``start`` to ``bottom`` at index ``bottom_at``, then rises in a line to ``end``.

    The shape of a validation loss under overfitting.
    """
    if not 0 < bottom_at < n - 1:
        raise ValueError(f"bottom_at must lie strictly inside the curve (0 < bottom_at < {n - 1}), got {bottom_at}")
    down = [start + (bottom - start) * (1 - (1 - i / bottom_at) ** 2) for i in range(bottom_at + 1)]
    up = ramp(n - bottom_at, bottom, end)[1:]
    return _noisy(down + up, noise, seed)


def concat(*parts: Sequence[float]) -> list[float]:
    """One curve made of several shapes in a row."""
    return [float(v) for part in parts for v in part]


def series(values: Sequence[float], *, every: int = 1, start: int | None = None) -> Points:
    """Place values on steps ``start, start + every, ...``; ``start`` defaults to ``every``
    (the first point logged after the first ``every`` steps, as a training loop does)."""
    if every < 1:
        raise ValueError(f"every must be a positive number of steps, got {every}")
    first = every if start is None else start
    return [(first + i * every, float(v)) for i, v in enumerate(values)]


def make_history(
    curves: Mapping[str, Sequence[float]],
    *,
    every: int | Mapping[str, int] = 1,
    start: int | None = None,
) -> dict[str, Points]:
    """A metric history: metric key -> sorted ``(step, value)`` points.

    Args:
        curves: metric key (as the job logs it, e.g. ``train/loss``) -> values.
        every: steps between two points, for all keys or per key (keys left out use 1).
        start: step of every key's first point; defaults to that key's ``every``.
    """
    out: dict[str, Points] = {}
    for key, values in curves.items():
        k_every = every.get(key, 1) if isinstance(every, Mapping) else every
        out[key] = series(values, every=k_every, start=start)
    return out
