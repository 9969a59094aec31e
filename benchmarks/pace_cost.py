"""What the lr-too-low reading adds to a poll: the snapshot of a run folded incrementally, with and without
an lr series (the pace is read only with one), as the history grows.

For each history length H (points of the train loss; val loss every 10 steps), one run is folded whole,
then for each tick 10 new train steps (and the evaluation among them) are folded and the snapshot is
taken, as the daemon does on a poll. Timed: fold plus snapshot per tick, for the run with the listener's
``atm/lr`` (a warm-up over the first 1,000 steps, then constant, as the listener charts it) and for the
same run without it, alternating tick by tick. Target: the pace costs a small share of the tick, and
the tick at 100k points stays within 1.5x of the tick at 2k.

    .venv/bin/python benchmarks/pace_cost.py            # about a minute
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks._common import percentile, write  # noqa: E402

from atm.policies import load_policy  # noqa: E402
from atm.watcher.snapshot import RunTelemetry  # noqa: E402

EVAL_EVERY = 10
TICKS = 300


def history(steps: int, with_lr: bool) -> dict[str, list[tuple[int, float]]]:
    h = {"train_loss": [(s, 0.5 + 3.0 / (1.0 + s / 500.0)) for s in range(steps)],
         "val_loss": [(s, 0.55 + 3.0 / (1.0 + s / 500.0)) for s in range(0, steps, EVAL_EVERY)]}
    if with_lr:
        h["atm/lr"] = [(s, 1e-3 * min(1.0, (s + 100) / 1000)) for s in range(0, 1000, 100)]
    return h


def grow(h: dict[str, list[tuple[int, float]]], first: int, n: int) -> None:
    for s in range(first, first + n):
        h["train_loss"].append((s, 0.5 + 3.0 / (1.0 + s / 500.0) + 0.001 * math.sin(s)))
        if s % EVAL_EVERY == 0:
            h["val_loss"].append((s, 0.55 + 3.0 / (1.0 + s / 500.0)))


def main() -> int:
    policy = load_policy("lm")
    rows, out = [], {}
    for steps in (2_000, 20_000, 100_000):
        arms = {}
        for with_lr in (False, True):
            h = history(steps, with_lr)
            t = RunTelemetry(policy)
            t.fold(h)
            arms[with_lr] = (h, t)
        times: dict[bool, list[float]] = {False: [], True: []}
        step = steps
        for _ in range(TICKS):
            for with_lr in (False, True):  # alternating: the machine's noise falls on both alike
                h, t = arms[with_lr]
                grow(h, step, 10)
                t0 = time.perf_counter()
                t.fold(h)
                snap = t.snapshot("r", {"lr": 1e-3})
                times[with_lr].append((time.perf_counter() - t0) * 1000)
                if with_lr:
                    assert "pace" in snap.signals, "the pace was not read: this measures nothing"
            step += 10
        base, lr = percentile(sorted(times[False]), 0.5), percentile(sorted(times[True]), 0.5)
        out[str(steps)] = {"tick_ms_p50_without_lr": round(base, 3), "tick_ms_p50_with_lr": round(lr, 3),
                           "ratio": round(lr / base, 3), "ticks": TICKS}
        rows.append([f"{steps:,}", f"{base:.3f}", f"{lr:.3f}", f"{lr / base:.2f}x"])
        print(f"{steps} points: tick p50 {base:.3f} ms without an lr series, {lr:.3f} ms with it ({lr / base:.2f}x)",
              flush=True)
    small, big = out["2000"]["tick_ms_p50_with_lr"], out["100000"]["tick_ms_p50_with_lr"]
    out["with_lr_100k_vs_2k"] = round(big / small, 3)
    write(
        "pace_cost", out, rows,
        ["train points", "tick p50 ms, no lr series", "tick p50 ms, with atm/lr (pace read)", "ratio"],
        notes=(f"Fold of 10 new steps plus the snapshot, in process, {TICKS} ticks per arm, alternating. With the "
              f"lr series, the tick at 100k points is {big / small:.2f}x the tick at 2k. Command: "
              "`.venv/bin/python benchmarks/pace_cost.py`."),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
