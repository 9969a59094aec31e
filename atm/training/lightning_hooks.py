"""PyTorch Lightning glue: attach the listener when training starts.

Lightning makes the optimizers and LR schedulers from ``configure_optimizers()`` inside ``fit()``,
and its loggers start their runs lazily, so a script cannot pass them to :func:`atm.listen`
beforehand. The callback attaches at ``on_train_start``, when both exist: to the first optimizer
and its scheduler (an lr change scales the schedule instead of being undone), with ``dropout`` of
every ``nn.Dropout`` in the module, on the run of the trainer's ``MLFlowLogger`` (which starts no
``mlflow.active_run()``, so the run and its store are named) or ``WandbLogger``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from atm.training.listener import Listener

log = logging.getLogger("atm.listener")


def make_callback(listen: Callable[..., Listener], dropout: Callable[[Any], Any], **kwargs: Any) -> Any:
    try:
        from lightning.pytorch import Callback
    except ImportError:  # the older package name
        try:
            from pytorch_lightning import Callback
        except ImportError as exc:
            raise ImportError("atm.lightning_callback() needs Lightning: pip install lightning") from exc

    class ATMLightningCallback(Callback):  # type: ignore[misc]
        """Attaches atm when training starts; ends training when the manager asks to stop."""

        def __init__(self) -> None:
            self.listener: Listener | None = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if self.listener is not None:
                return
            opts = dict(kwargs)
            # Every process of a multi-device job attaches: they apply the main process's updates together.
            opts.setdefault("distributed", trainer.world_size > 1)
            knobs = dict(opts.pop("knobs", None) or {})
            if "dropout" not in knobs:
                try:
                    knobs["dropout"] = dropout(pl_module)
                except ValueError:
                    log.info("atm: the module has no nn.Dropout modules; no dropout knob")
            step = opts.pop("step", None) or (lambda: int(trainer.global_step))
            optimizers = list(trainer.optimizers)
            if len(optimizers) > 1:
                log.warning("atm: %d optimizers; the manager controls the first one's hyperparameters (give the "
                            "others' as knobs=...)", len(optimizers))
            configs = list(getattr(trainer, "lr_scheduler_configs", None) or [])
            scheduler = configs[0].scheduler if configs else None
            if "channel" not in opts and "run_id" not in opts:
                try:
                    opts["channel"] = _logger_channel(trainer, opts.get("key"))
                except Exception as exc:  # as atm.listen does with a broken tracker set-up: training goes on
                    log.warning("atm: could not attach to the logger's run (%s); training continues unmanaged", exc)
                    return
            self.listener = listen(optimizers[0] if optimizers else None, scheduler=scheduler, knobs=knobs,
                                   step=step, **opts)

        def on_train_batch_end(self, trainer: Any, *args: Any, **kw: Any) -> None:
            if self.listener is not None and self.listener.stop_requested:
                trainer.should_stop = True

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.listener is not None:
                self.listener.close()
                self.listener = None

    return ATMLightningCallback()


def _logger_channel(trainer: Any, key: Any) -> Any:
    """A channel to the run of the trainer's ``MLFlowLogger`` (in its own store) or ``WandbLogger``, with the
    job's signing key (``listen(key=...)``); None with neither (then :func:`atm.listen` looks for
    ``wandb.run`` or an active MLflow run, as in any script). Loggers start their runs when first asked
    for them, which a module without hyperparameters may not have done by ``on_train_start``."""
    if isinstance(key, str):
        from atm.signing import key_from_text

        key = key_from_text(key, "atm.lightning_callback(key=...)")
    for logger in getattr(trainer, "loggers", None) or []:
        kind = type(logger).__name__
        if kind == "MLFlowLogger":
            from atm.adapters.mlflow_backend import MlflowChannel

            return MlflowChannel(logger.run_id, tracking_uri=getattr(logger, "_tracking_uri", None), key=key)
        if kind == "WandbLogger":
            from atm.adapters.wandb_backend import WandbChannel

            return WandbChannel.from_run(logger.experiment, key=key)
    return None
