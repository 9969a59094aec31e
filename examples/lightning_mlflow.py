"""A PyTorch Lightning job that logs with ``MLFlowLogger``, managed by atm.

A small regression module that overfits (few noisy samples), with a cosine LR schedule stepped every
optimizer step and validation every epoch; atm is the one callback marked ``# atm``: it attaches when
training starts, to the trainer's optimizer and scheduler, the module's dropout, and the logger's run::

    python examples/lightning_mlflow.py --epochs 40
    atm-watch --backend mlflow --run <run_id> --policy lm --tracking-uri sqlite:///examples-mlflow.db

Prints the run id when training starts. ``--tracking-uri`` defaults to ``sqlite:///examples-mlflow.db``.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as L
import torch
import torch.nn as nn
from lightning.pytorch.loggers import MLFlowLogger

import atm  # atm


class Regressor(L.LightningModule):
    def __init__(self, lr: float = 3e-3, dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, 1))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        steps = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=self.hparams.lr / 20)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PrintRunId(L.Callback):
    def on_train_start(self, trainer, pl_module):
        print(f"run_id {trainer.logger.run_id}", flush=True)


def loaders(batch_size: int) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=g)
    y = x @ torch.randn(16, 1, generator=g) + torch.randn(1000, 1, generator=g)  # noisy: memorising it overfits
    train = torch.utils.data.TensorDataset(x[:64], y[:64])
    val = torch.utils.data.TensorDataset(x[64:], y[64:])
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(val, batch_size=256))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--tracking-uri", default="sqlite:///examples-mlflow.db")
    p.add_argument("--experiment", default="lightning-mlflow")
    args = p.parse_args(argv)

    L.seed_everything(0, verbose=False)
    torch.set_num_threads(1)  # a network this small runs fastest on one thread (several spin on a busy CPU)
    # MLFLOW_RUN_ID (set by a launcher, or a test) continues that run.
    logger = MLFlowLogger(experiment_name=args.experiment, tracking_uri=args.tracking_uri,
                          run_id=os.environ.get("MLFLOW_RUN_ID"))
    trainer = L.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=1,
        callbacks=[PrintRunId(), L.callbacks.LearningRateMonitor(logging_interval="step"),
                   atm.lightning_callback()],  # atm: stops fit() when the manager asks to
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    train, val = loaders(batch_size=16)
    trainer.fit(Regressor(), train, val)


if __name__ == "__main__":
    main()
