"""``atm.lightning_callback()`` in a real Lightning ``Trainer``: the trainer's own optimizer and LR
scheduler are controlled (a change lands before the next optimizer step and the schedule does not
undo it), dropout is a knob, a stop ends ``fit()``; with ``MLFlowLogger``, the listener attaches to
the logger's run in the logger's store (a real sqlite store; the other tests use ``FakeChannel``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

L = pytest.importorskip("lightning.pytorch")

import atm  # noqa: E402
from atm.schema import Action  # noqa: E402
from atm.testing import FakeChannel, wait_for  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 1))

    def training_step(self, batch, _):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.01 * s))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Probe(L.Callback):
    """Records the lr each step used and the module's dropout; runs a hook before a chosen step."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}
        self.dropout: dict[int, float] = {}
        self.before: dict[int, object] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        hook = self.before.get(trainer.global_step)
        if hook is not None:
            hook(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lr[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]
        self.dropout[trainer.global_step] = pl_module.net[2].p


def loader(n: int = 256):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    ds = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    return torch.utils.data.DataLoader(ds, batch_size=16)


def trainer(tmp_path: Path, callbacks, steps: int = 12, logger=False):
    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path))


def test_a_change_lands_before_the_next_step_and_the_schedule_keeps_it(tmp_path: Path) -> None:
    ch = FakeChannel()
    cb = atm.lightning_callback(channel=ch, poll_interval=0.01)
    probe = Probe()
    plain = Probe()
    trainer(tmp_path, [plain]).fit(Tiny(), loader())

    def publish(t) -> None:
        now = t.optimizers[0].param_groups[0]["lr"]
        ch.publish(1, lr=(now, now / 2), dropout=(0.0, 0.2))
        wait_for(lambda: cb.listener._pending)

    probe.before[5] = publish
    torch.manual_seed(0)
    trainer(tmp_path, [cb, probe]).fit(Tiny(), loader())
    assert probe.lr[5] == pytest.approx(plain.lr[5])  # step 5 (global_step 5 after it) ran before the update
    for s in range(6, 13):  # from step 6 on, half the schedule's lr: the LambdaLR did not undo it
        assert probe.lr[s] == pytest.approx(plain.lr[s] / 2), s
    assert probe.dropout[12] == 0.2
    wait_for(lambda: 1 in ch.acks)
    assert ch.acks[1].status == "applied" and ch.acks[1].applied_step == 5
    assert cb.listener is None  # closed when training ended


def test_a_stop_ends_fit_on_the_mlflow_loggers_run(tmp_path: Path, mlflow_uri: str) -> None:
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    from atm.adapters.mlflow_backend import MlflowBackend
    from atm.schema import Status
    from atm.testing import make_record

    logger = MLFlowLogger(experiment_name="lightning-atm", tracking_uri=mlflow_uri)
    cb = atm.lightning_callback(poll_interval=0.05)
    probe = Probe()

    def stop(_) -> None:
        MlflowBackend(tracking_uri=mlflow_uri).publish(
            make_record(1, step=3, status=Status.PENDING, action=Action.STOP, run_id=logger.run_id)
        )
        wait_for(lambda: cb.listener._pending, timeout=20)

    probe.before[3] = stop
    t = trainer(tmp_path, [cb, probe], steps=50, logger=logger)
    t.fit(Tiny(), loader(2000))
    assert t.global_step < 10, t.global_step
    tags = MlflowClient(mlflow_uri).get_run(logger.run_id).data.tags
    assert "atm.listener" in tags and "atm.ack.000001" in tags
    assert '"dropout"' in tags["atm.listener"] and '"lr"' in tags["atm.listener"]


def test_with_wandb_logger_it_attaches_to_the_loggers_run(tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-atm")
    seen = {}
    cb = atm.lightning_callback(poll_interval=0.05)
    probe = Probe()
    probe.before[2] = lambda t: seen.update(run=cb.listener.run_id, attached=cb.listener.attached)
    try:
        trainer(tmp_path, [cb, probe], steps=4, logger=logger).fit(Tiny(), loader())
    finally:
        logger.experiment.finish()
    assert seen == {"run": logger.experiment.id, "attached": True}
