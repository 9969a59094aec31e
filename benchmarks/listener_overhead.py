"""Listener overhead: step time of a small torch model with and without atm attached, same process.

Blocks of steps alternate between the two arms so machine noise hits both alike; the listener
is attached to a real MLflow run (sqlite store) and polls it every 0.5 s while training runs.

    python benchmarks/listener_overhead.py [--steps 300] [--blocks 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from _common import summary, write


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200, help="steps per block")
    ap.add_argument("--blocks", type=int, default=10, help="blocks per arm (alternating)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import mlflow

    import atm

    tmp = Path(tempfile.mkdtemp(prefix="atm-bench-"))
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'm.db'}")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 64))
    x = torch.randn(32, 64)

    def block(opt: torch.optim.Optimizer) -> list[float]:
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        return times

    plain_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    managed_opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with mlflow.start_run():
        listener = atm.listen(managed_opt, knobs={"dropout": atm.dropout(model)}, poll_interval=0.5)
        block(plain_opt), block(managed_opt)  # warm-up
        plain: list[float] = []
        managed: list[float] = []
        for _ in range(args.blocks):
            plain += block(plain_opt)
            managed += block(managed_opt)
        listener.close()
    p, m = summary(plain), summary(managed)
    ratio50, ratio95 = m["p50"] / p["p50"], m["p95"] / p["p95"]
    write(
        "listener_overhead",
        {"steps_per_arm": len(plain), "poll_interval_s": 0.5, "without_listener_s": p, "with_listener_s": m,
         "ratio_p50": ratio50, "ratio_p95": ratio95},
        [["without listener", f"{p['p50'] * 1e3:.3f}", f"{p['p95'] * 1e3:.3f}", "1.00"],
         ["with listener (MLflow sqlite, polling 0.5 s)", f"{m['p50'] * 1e3:.3f}", f"{m['p95'] * 1e3:.3f}", f"{ratio50:.3f}"]],
        ["arm", "step p50 (ms)", "step p95 (ms)", "ratio p50"],
        notes=f"{len(plain)} steps per arm in {args.blocks} alternating blocks; MLP 64-256-64, batch 32, AdamW, 1 torch thread.",
    )


if __name__ == "__main__":
    main()
