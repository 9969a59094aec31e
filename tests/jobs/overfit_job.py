"""A small real training job that overfits, as a user would write it, plus the two atm lines.

An MLP memorises 48 noisy samples; validation loss bottoms out early and climbs. Logs
train_loss / val_loss / grad_norm to MLflow with step=, like any script. Writes what the
optimizer actually used at each step to --trace (JSON) so tests can check what landed when.

    python overfit_job.py --tracking-uri sqlite:///x.db --steps 400 --trace out.json
"""

from __future__ import annotations

import argparse
import json
import time

import mlflow
import torch
import torch.nn as nn

import atm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", default="atm-tests")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--step-sleep", type=float, default=0.01, help="seconds per step, so a daemon can follow")
    ap.add_argument("--trace", required=True)
    ap.add_argument("--run-id-file", default=None)
    ap.add_argument("--no-atm", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="data and initial weights")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x = torch.randn(200, 16)
    w = torch.randn(16, 1)
    y = x @ w + torch.randn(200, 1)  # noisy targets: memorising them is overfitting
    xt, yt, xv, yv = x[:48], y[:48], x[48:], y[48:]
    model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Dropout(0.0), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    loss_fn = nn.MSELoss()

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    trace: list[dict[str, float]] = []
    with mlflow.start_run() as run:
        if args.run_id_file:
            with open(args.run_id_file, "w") as fh:
                fh.write(run.info.run_id)
        listener = None
        if not args.no_atm:
            listener = atm.listen(opt, knobs={"dropout": atm.dropout(model)}, poll_interval=0.2)
        for step in range(1, args.steps + 1):
            model.train()
            opt.zero_grad()
            loss = loss_fn(model(xt), yt)
            loss.backward()
            gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
            opt.step()
            trace.append({"step": step, "lr": opt.param_groups[0]["lr"], "dropout": float(model[2].p),
                          "weight_decay": opt.param_groups[0]["weight_decay"]})
            if step % args.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    val = float(loss_fn(model(xv), yv))
                mlflow.log_metrics({"train_loss": float(loss.detach()), "val_loss": val, "grad_norm": gn}, step=step)
            time.sleep(args.step_sleep)
        if listener is not None:
            listener.close()
            applied = [u.seq for u in listener.applied]
        else:
            applied = []
    with open(args.trace, "w") as fh:
        json.dump({"trace": trace, "applied_seqs": applied, "run_id": run.info.run_id}, fh)


if __name__ == "__main__":
    main()
