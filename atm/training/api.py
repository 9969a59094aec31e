"""``atm.listen``: attach the listener to a job in one call."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from atm.training.listener import ApplyMode, Knob, Listener, as_knob, attr

log = logging.getLogger("atm.listener")

__all__ = ["attr", "dropout", "hf_callback", "listen", "sb3_callback"]

_warned_no_run = False


def listen(
    target: Any = None,
    *,
    knobs: Mapping[str, Any] | None = None,
    actions: Mapping[str, Callable[[], Any]] | None = None,
    apply: ApplyMode = "auto",
    step: Callable[[], int] | None = None,
    scheduler: Any = None,
    run_id: str | None = None,
    backend: str | None = None,
    poll_interval: float = 1.0,
    channel: Any = None,
    distributed: bool = False,
) -> Listener:
    """Attach atm to this training job and start receiving the manager's updates.

    Args:
        target: a ``torch.optim.Optimizer`` (lr, weight_decay, momentum, betas of every group,
            applied just before the next ``optimizer.step()``), a Stable-Baselines3 model
            (applied between rollouts), or None when only ``knobs`` are controlled.
        knobs: extra controllable values by name: a setter, a ``(getter, setter)`` pair or
            ``atm.attr(obj, "name")``. Names must match the policy's parameters.
        actions: handlers for the manager's actions, e.g. ``{"rollback": restore_best}``.
            ``stop`` always sets ``listener.stop_requested``.
        apply: ``"auto"`` (at the next optimizer step; with no optimizer, as soon as an update
            arrives) or ``"manual"`` (only when you call ``listener.apply_pending()``).
        step: a callable giving the job's current step, used to stamp when a change took effect.
            Defaults to the optimizer steps seen (or SB3's ``num_timesteps``).
        scheduler: the LR scheduler driving ``target``, so lr changes scale its base values.
        run_id, backend: which run to attach to; by default the active MLflow run
            (``mlflow.active_run()`` or ``MLFLOW_RUN_ID``) or ``wandb.run``.
        channel: a ready channel (tests and custom trackers).
        distributed: in a ``torch.distributed`` job (DDP, FSDP, ``torchrun``), call ``atm.listen`` on
            every rank with ``distributed=True``: rank 0 receives the updates and every 10 optimizer
            steps all ranks apply them together, so the replicas stay identical. Only rank 0 needs
            the run (other ranks attach to none).

    Returns:
        The started :class:`Listener`. With no run to attach to it warns once and does nothing.
    """
    global _warned_no_run
    target, scheduler = _unwrap(target), _unwrap(scheduler, "scheduler")
    all_knobs: dict[str, Knob] = {}
    hook: Callable[[Listener], None] | None = None
    in_training_thread = False
    kind = _kind(target)
    if kind == "torch":
        from atm.training.torch_hooks import optimizer_knobs

        all_knobs.update(optimizer_knobs(target, scheduler))
        hook = lambda lst: target.register_step_pre_hook(lst._on_optimizer_step)  # noqa: E731
        in_training_thread = True
    elif kind == "sb3":
        from atm.training.sb3_hooks import attach_sb3

        sb3_knobs, hook, default_step = attach_sb3(target)
        all_knobs.update(sb3_knobs)
        step = step or default_step
        in_training_thread = True
    elif target is not None:
        raise TypeError(
            f"atm.listen: don't know how to control a {type(target).__name__}; pass a torch optimizer, "
            "a Stable-Baselines3 model, or knobs={...}"
        )
    for name, spec in (knobs or {}).items():
        all_knobs[name] = as_knob(name, spec)
    blind = [n for n, k in all_knobs.items() if k.get is None]
    if blind:
        warnings.warn(
            f"atm: knobs {blind} have no getter, so the manager cannot see their current values and will not "
            "change them; pass (getter, setter) or atm.attr(obj, 'name')",
            stacklevel=2,
        )

    from atm.training._dist import RankSync, world

    rank, size = world()
    sync: RankSync | None = None
    if distributed and size > 1:
        if not in_training_thread and apply != "manual":
            raise ValueError(
                "atm.listen(distributed=True) applies updates at optimizer steps, which every rank takes "
                "together: pass the torch optimizer, or apply='manual' and call listener.apply_pending() on every rank"
            )
        sync = RankSync(rank, size)
        in_training_thread = True
    elif size > 1 and rank == 0:
        log.warning(
            "atm: this is rank 0 of %d in a torch.distributed job; changes applied on one rank make the replicas "
            "differ. Call atm.listen(..., distributed=True) on every rank.", size,
        )
    if sync is not None and not sync.leader:
        channel = None  # rank 0 talks to the tracker for the job
    elif channel is None:
        try:
            from atm.adapters import discover_channel

            channel = discover_channel(run_id=run_id, backend=backend)
        except Exception as exc:  # a broken tracker setup must not stop training
            log.warning("atm: could not attach to a tracking run (%s); training continues unmanaged", exc)
            channel = None
    if channel is None and not _warned_no_run and rank == 0:
        _warned_no_run = True
        warnings.warn(
            "atm.listen: no tracking run to attach to (no mlflow.active_run(), MLFLOW_RUN_ID or wandb.run); "
            "start the run before calling atm.listen. Training continues unmanaged.",
            stacklevel=2,
        )
    listener = Listener(
        channel,
        all_knobs,
        actions=actions,
        apply=apply,
        step=step,
        poll_interval=poll_interval,
        in_training_thread=in_training_thread,
        sync=sync,
    )
    if channel is not None or sync is not None:
        # With a sync, every rank takes part in its broadcasts, attached to a run or not.
        if hook is not None:
            hook(listener)
        listener.start()
    return listener


def _unwrap(obj: Any, *attrs: str) -> Any:
    """The optimizer (or scheduler) inside a wrapper: accelerate's ``AcceleratedOptimizer`` and
    ``AcceleratedScheduler``, Lightning's ``LightningOptimizer``. The inner object's ``step()`` is the
    one that runs the step hooks and holds the values a scheduler reads back."""
    for name in attrs or ("optimizer", "_optimizer"):
        inner = getattr(obj, name, None)
        if inner is not None and inner is not obj and (attrs or _kind(inner) == "torch"):
            return _unwrap(inner, *attrs)
    return obj


def _kind(target: Any) -> str | None:
    if target is None:
        return None
    mro = {f"{c.__module__}.{c.__name__}" for c in type(target).__mro__}
    if "torch.optim.optimizer.Optimizer" in mro:
        return "torch"
    if any(m.startswith("stable_baselines3.") and m.endswith("BaseAlgorithm") for m in mro):
        return "sb3"
    return None


def dropout(model: Any) -> Knob:
    """A knob for every dropout probability in a torch model: ``knobs={"dropout": atm.dropout(model)}``."""
    from atm.training.torch_hooks import dropout_knob

    return dropout_knob(model)


def hf_callback(**kwargs: Any) -> Any:
    """A ``transformers`` TrainerCallback that attaches the listener when training begins.

    ``Trainer(..., callbacks=[atm.hf_callback()])``. The Trainer's own optimizer and LR scheduler
    are controlled (lr, weight_decay, betas, applied just before the next optimizer step), plus
    ``dropout`` of every ``nn.Dropout`` in the model unless ``knobs`` names it. Keyword arguments go
    to :func:`listen` (``knobs=``, ``actions=``, ...). Training ends when the manager asks to stop.
    """
    from atm.training.hf_hooks import make_callback

    return make_callback(listen, dropout, **kwargs)


def sb3_callback(**kwargs: Any) -> Any:
    """An SB3 callback that attaches the listener when learning starts and applies between rollouts.

    ``model.learn(total_timesteps, callback=atm.sb3_callback())``. Keyword arguments go to
    :func:`listen` (``knobs=``, ``actions=``, ...). Returns False (stops learning) once the
    manager asks to stop.
    """
    from atm.training.sb3_hooks import make_callback

    return make_callback(listen, **kwargs)


__all__ += ["Knob", "attr"]
