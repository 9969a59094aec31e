"""A user's training script, as people write them: an MLP on scikit-learn's digits (bundled with it, no
download), one optimizer, train and val loss logged to MLflow once an epoch. With ``--managed`` it adds
atm's two lines (``import atm``; ``atm.listen(optimizer, scheduler=...)``); otherwise it is untouched.
With ``--full`` too, it also does what the README's full integration does: it keeps its best weights,
offers ``rollback`` to them, and on ``stop`` restores them and ends.

    python benchmarks/jobs/digits_job.py --tracking-uri sqlite:///runs.db --optimizer adam --lr 1e-3 [--managed]

The rest of the arguments make it healthy or not: noisy labels and a wide layer overfit, a large lr is
too high. ``--dropout`` adds a dropout layer, which the managed job registers as the knob
``dropout``; ``--weight-decay`` is the optimizer's.

Prints ``RUN <id>`` when the run starts, ``VAL <epoch> <val loss>`` each epoch and
``FINAL <val loss> <lr>`` at the end.
"""

from __future__ import annotations

import argparse
import copy
import time

import mlflow
import torch
from sklearn.datasets import load_digits
from torch import nn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--name", default="digits")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--hidden", type=int, default=128, help="width of the hidden layer")
    p.add_argument("--dropout", type=float, default=None,
                   help="add a dropout layer at this rate (managed: the knob `dropout`); none by default")
    p.add_argument("--train-size", type=int, default=1300, help="examples trained on (the other 497 validate)")
    p.add_argument("--label-noise", type=float, default=0.0,
                   help="share of the training examples given a wrong label (fixed, not by --seed)")
    p.add_argument("--warmup-epochs", type=int, default=0, help="a linear warm-up by LambdaLR (0: none)")
    p.add_argument("--plateau", action="store_true",
                   help="ReduceLROnPlateau on val loss (factor 0.5, patience 5), the usual automatic answer")
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--seed", type=int, default=0, help="the model's initialisation and nothing else")
    p.add_argument("--epoch-sleep", type=float, default=0.25,
                   help="seconds between epochs: an epoch here takes milliseconds, a real job's minutes")
    p.add_argument("--managed", action="store_true", help="add atm's listener")
    p.add_argument("--full", action="store_true",
                   help="with --managed: offer rollback to the best weights, and on stop restore them and end")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    if not 0 < args.train_size <= 1300:
        p.error("--train-size must be between 1 and 1300")
    if not 0.0 <= args.label_noise < 1.0:
        p.error("--label-noise must be in [0, 1)")
    tr, va = perm[:args.train_size], perm[1300:]
    if args.label_noise:
        # Noisy labels, the usual reason a real classifier's val loss turns: the model memorises them.
        g = torch.Generator().manual_seed(1)
        noisy = tr[torch.rand(len(tr), generator=g) < args.label_noise]
        y = y.clone()
        y[noisy] = (y[noisy] + torch.randint(1, 10, (len(noisy),), generator=g)) % 10
    layers: list[nn.Module] = [nn.Linear(64, args.hidden), nn.ReLU()]
    if args.dropout is not None:
        layers.append(nn.Dropout(args.dropout))
    model = nn.Sequential(*layers, nn.Linear(args.hidden, 10))
    if args.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    if args.plateau and args.warmup_epochs:
        p.error("--plateau and --warmup-epochs are two schedulers; choose one")
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda e: min(1.0, (e + 1) / args.warmup_epochs))
             if args.warmup_epochs else None)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5) if args.plateau else None
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment("digits")
    with mlflow.start_run(run_name=args.name) as run:
        print("RUN", run.info.run_id, flush=True)
        mlflow.log_params({"optimizer": args.optimizer, "lr": args.lr, "momentum": args.momentum,
                           "weight_decay": args.weight_decay, "hidden": args.hidden, "dropout": args.dropout,
                           "train_size": args.train_size, "label_noise": args.label_noise})
        best_val, best_state = float("inf"), copy.deepcopy(model.state_dict())

        def restore_best() -> None:
            model.load_state_dict(best_state)

        listener = None
        if args.managed:
            import atm

            listener = atm.listen(opt, scheduler=sched,
                                  knobs={"dropout": atm.dropout(model)} if args.dropout is not None else None,
                                  actions={"rollback": restore_best} if args.full else None)
        val = float("nan")
        for epoch in range(1, args.epochs + 1):
            model.train()
            total = 0.0
            for i in range(0, len(tr), 64):
                idx = tr[i:i + 64]
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            model.eval()
            with torch.no_grad():
                val = float(nn.functional.cross_entropy(model(x[va]), y[va]))
            mlflow.log_metrics({"train_loss": total / len(tr), "val_loss": val}, step=epoch)
            print("VAL", epoch, val, flush=True)
            if val < best_val:
                best_val, best_state = val, copy.deepcopy(model.state_dict())
            if sched is not None:
                sched.step()
            if plateau is not None:
                plateau.step(val)
            if args.full and listener is not None and listener.stop_requested:
                restore_best()  # what early stopping with restore would do
                val = best_val
                print("STOPPED", epoch, flush=True)
                break
            time.sleep(args.epoch_sleep)
        print("FINAL", val, opt.param_groups[0]["lr"], flush=True)


if __name__ == "__main__":
    main()
