"""``atm.listen``: attach the listener to a job in one call."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import warnings
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from atm.signing import SigningKey, key_from_text
from atm.training.listener import ApplyMode, Knob, Listener, as_knob, attr

log = logging.getLogger("atm.listener")

__all__ = ["attr", "attrs", "dropout", "hf_callback", "lightning_callback", "listen", "log_metrics", "sb3_callback"]

_warned_no_run = False


def listen(
    target: Any = None,
    *,
    knobs: Mapping[str, Any] | None = None,
    actions: Mapping[str, Callable[[], Any]] | None = None,
    apply: ApplyMode = "auto",
    step: Callable[[], int] | None = None,
    scheduler: Any = None,
    no_decay: Sequence[int] = (),
    run_id: str | None = None,
    backend: str | None = None,
    poll_interval: float = 1.0,
    channel: Any = None,
    distributed: bool = False,
    key: SigningKey | str | None = None,
) -> Listener:
    """Attach atm to this training job and start receiving the manager's updates.

    Args:
        target: a ``torch.optim.Optimizer`` (lr, weight_decay, momentum, betas of every group,
            applied just before the next ``optimizer.step()``), a Stable-Baselines3 model
            (applied between rollouts), or None when only ``knobs`` are controlled.
        knobs: extra controllable values by name: a setter, a ``(getter, setter)`` pair,
            ``atm.attr(obj, "name")``, or a whole mapping from ``atm.attrs(obj, "recipe.actor_lr", ...)``.
            Names must match the policy's parameters.
        actions: handlers for the manager's actions, e.g. ``{"rollback": restore_best}``.
            ``stop`` always sets ``listener.stop_requested``.
        apply: ``"auto"`` (at the next optimizer step; with no optimizer, as soon as an update
            arrives) or ``"manual"`` (only when you call ``listener.apply_pending()``).
        step: a callable giving the job's current step, used to stamp when a change took effect.
            Defaults to the optimizer steps seen (or SB3's ``num_timesteps``).
        scheduler: the LR scheduler driving ``target``, so lr changes scale its base values.
        no_decay: indices of ``target``'s param groups whose weight decay a change must not touch
            (biases, norms, embeddings). Needed only when every group starts at weight decay 0:
            otherwise the groups at 0 are told apart and left alone.
        run_id, backend: which run to attach to; by default the active MLflow run
            (``mlflow.active_run()`` or ``MLFLOW_RUN_ID``) or ``wandb.run``.
        channel: a ready channel (tests and custom trackers).
        distributed: in a ``torch.distributed`` job (DDP, FSDP, ``torchrun``), call ``atm.listen`` on
            every rank with ``distributed=True``: rank 0 receives the updates and every 10 optimizer
            steps all ranks apply them together, so the replicas stay identical. Only rank 0 needs
            the run (other ranks attach to none).
        key: the secret updates must be signed with (a :class:`atm.signing.SigningKey` or its text);
            by default ``ATM_KEY``, ``ATM_KEY_FILE`` or the per-user key file, as the watcher finds
            it. Updates not signed with it are never applied (acknowledged as ``rejected``).

    Returns:
        The started :class:`Listener`. With no run to attach to it warns once and does nothing.
    """
    global _warned_no_run
    if isinstance(key, str):
        key = key_from_text(key, "atm.listen(key=...)")
    target, scheduler = _unwrap(target), _unwrap(scheduler, "scheduler")
    all_knobs: dict[str, Knob] = {}
    hook: Callable[[Listener], None] | None = None
    in_training_thread = False
    kind = _kind(target)
    if kind == "torch":
        from atm.training.torch_hooks import optimizer_knobs

        all_knobs.update(optimizer_knobs(target, scheduler, no_decay))
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

            channel = discover_channel(run_id=run_id, backend=backend, key=key)
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
        key=key,
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


def attrs(obj: Any, *paths: str | Mapping[str, str], **named: str) -> dict[str, Knob]:
    """Knobs for attributes (or mapping items) of ``obj`` by dotted path, for ``atm.listen(knobs=...)``.

    ``atm.attrs(trainer, "reward.collision_penalty", lr="recipe.actor_lr")`` gives the knobs
    ``reward.collision_penalty`` and ``lr``: a positional path is its own knob name, a keyword names
    the knob (names must match the policy's ``params``), and so does a positional ``{name: path}``
    mapping, for names a keyword cannot spell (``{"loss_weight.aux": "cfg.aux_weight"}``). The path is
    followed from ``obj`` at every read and every write, so a trainer that rebinds ``self.recipe`` (or
    replaces a dict of reward weights) is changed where it looks now, not on the object it had when
    ``atm.listen`` ran. Each step of a path is an attribute, or a key when the object there is a
    mapping (``reward`` may be a dict). A new value keeps the attribute's type (an int stays an int).
    A frozen dataclass or a NamedTuple on the path is replaced by a changed copy, stored where the
    job will read it.

    Raises:
        ValueError: a path is empty or a knob named twice.
        AttributeError / KeyError: a path does not lead to a value now (the message names the path
            and the step that failed).
        TypeError: the value there is not a number (the manager only moves numbers).
    """
    pairs = [pair for p in paths for pair in (p.items() if isinstance(p, Mapping) else [(p, p)])]
    pairs += list(named.items())
    specs = dict(pairs)
    if len(specs) != len(pairs):
        raise ValueError(f"atm.attrs: a knob is named twice in {[name for name, _ in pairs]}")
    knobs = {}
    for name, path in specs.items():
        parts = path.split(".")
        if not all(parts):
            raise ValueError(f"atm.attrs: {path!r} is not a dotted path like 'recipe.actor_lr'")
        value = _follow(obj, parts, path)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"atm.attrs: {path!r} is {value!r} ({type(value).__name__}), not a number the manager can move")
        knobs[name] = Knob(get=lambda parts=parts, path=path: float(_follow(obj, parts, path)),
                           set=lambda v, parts=parts, path=path: _assign(obj, parts, path, v))
    return knobs


def _follow(obj: Any, parts: list[str], path: str) -> Any:
    """The value at ``parts`` from ``obj``: attributes, or keys of mappings. Read fresh at each call."""
    here = obj
    for i, part in enumerate(parts):
        if isinstance(here, Mapping):
            if part not in here:
                raise KeyError(f"atm.attrs: {path!r}: {'.'.join(parts[:i]) or 'the object'} has no key {part!r}")
            here = here[part]
        elif hasattr(here, part):
            here = getattr(here, part)
        else:
            where = ".".join(parts[:i]) or type(obj).__name__
            raise AttributeError(f"atm.attrs: {path!r}: {where} ({type(here).__name__}) has no attribute {part!r}")
    return here


def _assign(obj: Any, parts: list[str], path: str, value: float) -> None:
    # The objects along the path, read now: the trainer may have rebound any of them since the last call.
    chain = [obj]
    for part in parts[:-1]:
        chain.append(_follow(chain[-1], [part], path))
    old = _follow(chain[-1], parts[-1:], path)
    # Keep the type the job uses: an epoch count stays an int, a numpy float stays one.
    new: Any = type(old)(round(value) if isinstance(old, numbers.Integral) else value)
    for here, part in zip(reversed(chain), reversed(parts)):
        changed = _put(here, part, new)
        if changed is here:
            return
        new = changed  # an immutable object (a frozen dataclass) was copied: store the copy one level up
    raise TypeError(f"atm.attrs: {path!r}: {type(obj).__name__} is immutable; pass the object that holds it")


def _put(here: Any, part: str, value: Any) -> Any:
    """``here`` with ``part`` set: changed in place (``here`` itself), or a changed copy when immutable."""
    if isinstance(here, MutableMapping):
        here[part] = value
        return here
    if dataclasses.is_dataclass(here) and not isinstance(here, type) and here.__dataclass_params__.frozen:
        return dataclasses.replace(here, **{part: value})
    if isinstance(here, tuple) and hasattr(here, "_replace"):  # a NamedTuple
        return here._replace(**{part: value})
    setattr(here, part, value)
    return here


def log_metrics(row: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log the numbers of ``row`` to the job's active tracker run: ``mlflow.active_run()`` and/or ``wandb.run``.

    For trainers whose rows mix numbers with strings, bools and None (MLflow refuses strings).
    Logged: ints, floats, numpy scalars and one-element tensors or arrays, NaN and infinities
    included (a NaN loss is divergence, which the manager must see). Not logged: bools (a flag is not
    a metric), strings, None and anything else; each such key is named once, in a warning, the
    first time it is dropped. With ``step=None`` each tracker does what it does without one (W&B
    numbers the row, MLflow logs it at step 0): pass the step your metrics use.

    Returns:
        The values logged (empty when there is no active run: said once, in a warning).
    """
    values, dropped = numeric_items(row)
    new = sorted(k for k in dropped if k not in _dropped_keys)
    if new:
        _dropped_keys.update(new)
        warnings.warn(
            "atm.log_metrics: not logged, not numbers: "
            + ", ".join(f"{k!r} ({dropped[k]})" for k in new)
            + "; each key is named once",
            stacklevel=2,
        )
    from atm.adapters.metrics import log_to_active_runs

    trackers = log_to_active_runs(values, step)  # the tracker's own errors reach the job, as its own calls would
    global _warned_no_tracker
    if not trackers and not _warned_no_tracker:
        _warned_no_tracker = True
        warnings.warn(
            "atm.log_metrics: no active run (mlflow.start_run() or wandb.init() first); nothing was logged",
            stacklevel=2,
        )
    return values if trackers else {}


_dropped_keys: set[str] = set()
_warned_no_tracker = False


def numeric_items(row: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """Split a row into the values a tracker can chart and the rest: ``(values, {key: type name})``. Pure."""
    values: dict[str, float] = {}
    dropped: dict[str, str] = {}
    for key, value in row.items():
        number = _as_number(value)
        if number is None:
            dropped[str(key)] = type(value).__name__
        else:
            values[str(key)] = number
    return values, dropped


def _as_number(value: Any) -> float | None:
    # A 0-d or one-element tensor or array (loss.detach(), np.float32(...).reshape(1)) is a number.
    size = getattr(value, "numel", None)
    size = size() if callable(size) else getattr(value, "size", None)
    if size == 1 and callable(getattr(value, "item", None)) and not isinstance(value, numbers.Number):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # a flag is not a metric
        return None
    return float(value)


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


def lightning_callback(**kwargs: Any) -> Any:
    """A PyTorch Lightning ``Callback`` that attaches the listener when training starts.

    ``L.Trainer(..., callbacks=[atm.lightning_callback()])``. The trainer's first optimizer and its
    LR scheduler are controlled (lr, weight_decay, betas, applied just before the next optimizer
    step), plus ``dropout`` of every ``nn.Dropout`` in the module unless ``knobs`` names it, on the
    run of the trainer's ``MLFlowLogger`` or ``WandbLogger``. Keyword arguments go to :func:`listen`
    (``knobs=``, ``actions=``, ...). Training ends (``trainer.should_stop``) when the manager asks to stop.
    """
    from atm.training.lightning_hooks import make_callback

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
