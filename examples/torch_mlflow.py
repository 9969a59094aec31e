"""A plain PyTorch training script that logs to MLflow, managed by atm.

An MLP classifier on a small synthetic data set (it overfits: few noisy samples, no regularisation),
an LR schedule with warm-up (``LambdaLR``), train and validation loss logged once per epoch at
``step=epoch``, the best checkpoint kept as a copy. atm is the lines marked ``# atm``::

    python examples/torch_mlflow.py --epochs 60
    atm-watch --backend mlflow --run <run_id> --policy lm

Prints the run id first. ``--tracking-uri`` defaults to ``sqlite:///examples-mlflow.db``.
"""

from __future__ import annotations

import argparse
import copy

import mlflow
import torch
import torch.nn as nn

import atm  # atm


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    w = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    y = (x @ w + 1.5 * torch.randn(n, 4, generator=g)).argmax(1)  # noisy labels: memorising them overfits
    return x, y


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batches", type=int, default=8, help="batches per epoch")
    p.add_argument("--tracking-uri", default="sqlite:///examples-mlflow.db")
    p.add_argument("--experiment", default="torch-mlflow")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a network this small runs fastest on one thread (several spin on a busy CPU)
    xt, yt = data(256, seed=1)
    xv, yv = data(512, seed=2)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Dropout(0.0), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    warmup = 5 * args.batches
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    loss_fn = nn.CrossEntropyLoss()
    best = {"val": float("inf")}
    rollback_wanted = []

    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run() as run:
        print(f"run_id {run.info.run_id}", flush=True)
        epoch = 0
        listener = atm.listen(  # atm
            opt, scheduler=sched,  # atm: the scheduler too, or it would undo an lr change
            knobs={"dropout": atm.dropout(model)},  # atm
            actions={"rollback": lambda: rollback_wanted.append(True)},  # atm: restored at the top of the loop
            step=lambda: epoch,  # atm: the step our metrics use
        )
        for epoch in range(1, args.epochs + 1):
            if rollback_wanted and "model" in best:
                with atm.keep_hyperparameters(opt, sched):  # atm: keep the changes that came with it
                    model.load_state_dict(best["model"])
                    opt.load_state_dict(best["opt"])
                rollback_wanted.clear()
            model.train()
            for xb, yb in zip(xt.chunk(args.batches), yt.chunk(args.batches)):
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                opt.step()  # atm applies its updates just before a step
                sched.step()
            model.eval()
            with torch.no_grad():
                train_loss = float(loss_fn(model(xt), yt))
                val_loss = float(loss_fn(model(xv), yv))
            mlflow.log_metrics({"train_loss": train_loss, "val_loss": val_loss, "lr": sched.get_last_lr()[0]},
                               step=epoch)
            if val_loss < best["val"]:
                best = {"val": val_loss, "model": copy.deepcopy(model.state_dict()),
                        "opt": copy.deepcopy(opt.state_dict())}
            if listener.stop_requested:  # atm: the manager's `stop`
                model.load_state_dict(best["model"])
                break
        mlflow.log_metric("best_val_loss", best["val"])
        listener.close()  # atm: flush the last acknowledgements


if __name__ == "__main__":
    main()
