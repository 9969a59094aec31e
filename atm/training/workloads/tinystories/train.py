"""Training loop of the TinyStories workload: user code that logs to MLflow or W&B and lets atm steer it.

``train(TrainConfig(...))`` runs one arm of the supervised benchmark and returns its curves. The
``overfit`` recipe is the paper's fixed baseline (constant lr 3e-3, no dropout, no weight decay, on a
corpus small enough to memorise); ``plateau`` adds ``ReduceLROnPlateau`` on validation loss. Early
stopping with restore needs no run of its own: :func:`early_stop_with_restore` reads it off the
fixed run's validation curve.

With the defaults (0.86M parameters, 36 KB generated corpus, 2400 steps of 4 x 128 tokens, one
thread) validation loss bottoms near 1.34 at step 200 and ends near 2.8, while training loss falls
to 0.04. Runs are deterministic for a given seed, so arms of one seed share their curve up to their
first intervention.
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

import atm
from atm.training.workloads import resolve_tracking_uri
from atm.training.workloads.tinystories.data import DEFAULT_CORPUS_KB, Prepared, load_corpus, prepare
from atm.training.workloads.tinystories.model import GPT, GPTConfig

RECIPES = ("overfit", "plateau", "healthy")
#: What ``healthy`` changes from the defaults: a recipe as a careful practitioner would set it (dropout,
#: weight decay, a linear warm-up then cosine decay to a tenth) on a corpus too large to memorise in
#: the budget. Its validation loss falls slowly at first (the warm-up), noisily (4-story batches), and
#: keeps falling to the end: a run a manager should leave alone. ``--quick`` takes ``HEALTHY_QUICK`` too.
HEALTHY: dict[str, Any] = {"corpus_kb": 600, "lr": 2e-3, "dropout": 0.1, "weight_decay": 0.1, "warmup_steps": 300}
HEALTHY_QUICK: dict[str, Any] = {"corpus_kb": 300, "warmup_steps": 100}
#: Knobs a scripted intervention may set (the same names the lm policy uses).
SCRIPT_KNOBS = ("lr", "weight_decay", "dropout")


class ScriptedIntervention(BaseModel):
    """A change made by the job itself at a fixed step (after that step's evaluation).

    Used to measure what a hand-made fix achieves (for instance restore the best checkpoint, lr/3 and
    dropout 0.1 once validation loss has turned), through the same code paths the listener uses.
    """

    step: int = Field(gt=0)
    changes: dict[str, float] = Field(default_factory=dict)
    rollback: bool = False

    @field_validator("changes")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(v) - set(SCRIPT_KNOBS))
        if unknown:
            raise ValueError(f"scripted changes can set {', '.join(SCRIPT_KNOBS)}; got {', '.join(unknown)}")
        return v

    @classmethod
    def parse(cls, text: str) -> ScriptedIntervention:
        """``"STEP:rollback,lr=6e-4,dropout=0.1"`` -> an intervention (the CLI's ``--script`` form)."""
        m = re.fullmatch(r"\s*(\d+)\s*:(.*)", text)
        if not m:
            raise ValueError(f"expected STEP:item,item,... (e.g. 200:rollback,lr=6e-4,dropout=0.1), got {text!r}")
        changes: dict[str, float] = {}
        rollback = False
        for item in filter(None, (s.strip() for s in m.group(2).split(","))):
            if item == "rollback":
                rollback = True
            elif "=" in item:
                key, value = item.split("=", 1)
                changes[key.strip()] = float(value)
            else:
                raise ValueError(f"unknown script item {item!r} in {text!r}; use rollback or KNOB=VALUE")
        return cls(step=int(m.group(1)), changes=changes, rollback=rollback)

    def to_text(self) -> str:
        """The inverse of :meth:`parse`."""
        items = (["rollback"] if self.rollback else []) + [f"{k}={v!r}" for k, v in self.changes.items()]
        return f"{self.step}:{','.join(items)}"


class TrainConfig(BaseModel):
    """Everything one run needs. Defaults are the calibrated ``overfit`` recipe (2-3.5 min on one thread)."""

    model_config = ConfigDict(extra="forbid")

    recipe: Literal["overfit", "plateau", "healthy"] = "overfit"
    steps: int = Field(default=2400, gt=0)
    eval_every: int = Field(default=40, gt=0)
    batch: int = Field(default=4, gt=0)
    # Model
    context: int = Field(default=128, gt=1)
    n_layer: int = Field(default=4, gt=0)
    n_head: int = Field(default=4, gt=0)
    width: int = Field(default=128, gt=0)
    # Optimisation (the recipe's starting values; the manager may change lr, weight_decay, dropout)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    threads: int = Field(default=1, gt=0)
    # Data
    data: str = "generated"
    corpus_kb: int = Field(default=DEFAULT_CORPUS_KB, gt=0)
    data_seed: int = 0
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    # ReduceLROnPlateau (recipe "plateau"); patience counts evaluations
    plateau_factor: float = Field(default=0.5, gt=0, lt=1)
    plateau_patience: int = Field(default=2, ge=0)
    # Linear warm-up over this many steps, then cosine decay to a tenth of lr (recipe "healthy")
    warmup_steps: int = Field(default=0, ge=0)
    # Early stopping derived from the curve (see early_stop_with_restore); patience counts evaluations
    early_stop_patience: int = Field(default=4, gt=0)
    early_stop_min_delta: float = Field(default=0.0, ge=0)
    # Tracking
    tracking: Literal["mlflow", "wandb", "none"] = "none"
    tracking_uri: str | None = None
    experiment: str = "atm-tinystories"
    run_name: str | None = None
    #: Attach atm's listener (with a tracker). Off for arms that must stay unmanaged.
    listen: bool = True
    script: list[ScriptedIntervention] = Field(default_factory=list)

    def run_params(self) -> dict[str, Any]:
        """Flat params for the tracker (the scripted interventions as their CLI form)."""
        params = self.model_dump(exclude={"script", "tracking_uri"})
        if self.script:
            params["script"] = "; ".join(s.to_text() for s in self.script)
        return params


class EvalPoint(BaseModel):
    step: int
    train_loss: float
    val_loss: float
    grad_norm: float
    lr: float
    weight_decay: float
    dropout: float
    elapsed_s: float


class TrainResult(BaseModel):
    """What one run did. ``final_val_loss`` is the last evaluation (after any rollback the manager made)."""

    config: TrainConfig
    evals: list[EvalPoint]
    steps_done: int
    stopped_by_manager: bool
    interventions: int
    rollbacks: int
    wall_time_s: float
    tokens_per_s: float
    n_params: int
    data_source: str
    run_id: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def val_curve(self) -> list[tuple[int, float]]:
        return [(e.step, e.val_loss) for e in self.evals]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def train_curve(self) -> list[tuple[int, float]]:
        return [(e.step, e.train_loss) for e in self.evals]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def final_val_loss(self) -> float:
        return self.evals[-1].val_loss

    @computed_field  # type: ignore[prop-decorator]
    @property
    def best_val_loss(self) -> float:
        return min(e.val_loss for e in self.evals)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def best_step(self) -> int:
        return min(self.evals, key=lambda e: e.val_loss).step


class EarlyStopOutcome(BaseModel):
    """Early stopping with restore, replayed on a validation curve."""

    stopped: bool
    #: Step at which training would have stopped (the curve's last step if patience never ran out).
    stop_step: int
    best_step: int
    #: Validation loss of the restored best checkpoint: the arm's final validation loss.
    final_val_loss: float
    reason: str


def early_stop_with_restore(val_curve: Sequence[tuple[int, float]], patience: int,
                            min_delta: float = 0.0) -> EarlyStopOutcome:
    """Replay early stopping on ``val_curve`` ((step, val_loss) in step order).

    An evaluation improves when it is below the best so far by more than ``min_delta``; training stops
    after ``patience`` evaluations in a row without improvement, and the best checkpoint is restored.

    Raises:
        ValueError: empty curve or ``patience < 1``.
    """
    if not val_curve:
        raise ValueError("val_curve is empty; early stopping needs at least one evaluation")
    if patience < 1:
        raise ValueError(f"patience must be at least 1 evaluation, got {patience}")
    best_step, best = val_curve[0]
    waited = 0
    for step, loss in val_curve[1:]:
        if loss < best - min_delta:
            best_step, best, waited = step, loss, 0
            continue
        waited += 1
        if waited >= patience:
            return EarlyStopOutcome(stopped=True, stop_step=step, best_step=best_step, final_val_loss=best,
                                    reason=f"no improvement below {best:.4f} (min_delta {min_delta}) for "
                                           f"{patience} evaluations; restored step {best_step}")
    return EarlyStopOutcome(stopped=False, stop_step=val_curve[-1][0], best_step=best_step, final_val_loss=best,
                            reason=f"patience never ran out; restored best step {best_step} at the end")


# --------------------------------------------------------------------------- trackers (how a user logs)


class _Tracker:
    """Records nothing (``tracking="none"``); the MLflow and W&B trackers override its three methods."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self, ok: bool) -> None: ...


class _MlflowTracker(_Tracker):
    def __init__(self, cfg: TrainConfig) -> None:
        import mlflow  # noqa: PLC0415 - only runs that log to MLflow pay for the import

        self.mlflow = mlflow
        mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking_uri))
        mlflow.set_experiment(cfg.experiment)
        self.run_id = mlflow.start_run(run_name=cfg.run_name).info.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        self.mlflow.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self, ok: bool) -> None:
        self.mlflow.end_run(status="FINISHED" if ok else "FAILED")


class _WandbTracker(_Tracker):
    def __init__(self, cfg: TrainConfig) -> None:
        import wandb  # noqa: PLC0415

        self.wandb = wandb
        # Offline unless the user chose otherwise: no account or server is needed, and atm reads the
        # offline run's transaction log. tracking_uri, for W&B, is the folder runs are written to.
        mode = os.environ.get("WANDB_MODE") or "offline"
        if cfg.tracking_uri:
            Path(cfg.tracking_uri).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.experiment, name=cfg.run_name, mode=mode, dir=cfg.tracking_uri)
        self.run_id = self.run.id

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


def _make_tracker(cfg: TrainConfig) -> _Tracker:
    if cfg.tracking == "mlflow":
        return _MlflowTracker(cfg)
    if cfg.tracking == "wandb":
        return _WandbTracker(cfg)
    return _Tracker()


# --------------------------------------------------------------------------- the loop


def _story_starts(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Positions where stories begin: 0 and every position right after an ``<eos>``."""
    after_eos = (ids[:-1] == eos_id).nonzero().flatten() + 1
    return torch.cat([torch.zeros(1, dtype=torch.long), after_eos])


def _val_loss(model: GPT, ids: torch.Tensor, starts: torch.Tensor, eos_id: int, context: int,
              chunk: int = 64) -> float:
    """Token-weighted loss over every validation story, each read from its start (as in training),
    up to its ``<eos>`` or the context length."""
    windows = []
    for s in starts.tolist():
        w = ids[s: s + context + 1]
        eos = (w == eos_id).nonzero()
        windows.append(w[: int(eos[0]) + 1] if len(eos) else w)
    windows = [w for w in windows if len(w) > 1]
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), chunk):
            part = windows[i: i + chunk]
            width = max(len(w) for w in part)
            inputs = torch.full((len(part), width - 1), eos_id, dtype=torch.long)
            targets = torch.full((len(part), width - 1), -100, dtype=torch.long)  # cross_entropy ignores -100
            for j, w in enumerate(part):
                inputs[j, : len(w) - 1] = w[:-1]
                targets[j, : len(w) - 1] = w[1:]
            n = int((targets != -100).sum())
            _, loss = model(inputs, targets)
            total += float(loss) * n
            count += n
    model.train(was_training)
    return total / count


class _Checkpoint:
    """The best weights and optimizer moments, kept in memory for rollback."""

    def __init__(self) -> None:
        self.model: dict[str, torch.Tensor] | None = None
        self.optimizer: dict[str, Any] | None = None
        self.step = 0

    def save(self, model: GPT, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.model = copy.deepcopy(model.state_dict())
        self.optimizer = copy.deepcopy(optimizer.state_dict())
        self.step = step

    def restore(self, model: GPT, optimizer: torch.optim.Optimizer) -> bool:
        if self.model is None or self.optimizer is None:
            return False
        # Keep the current hyperparameters: a rollback usually arrives together with new lr, weight
        # decay or dropout, which are applied first and must survive the restore.
        with atm.keep_hyperparameters(optimizer):
            model.load_state_dict(self.model)
            optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        return True


def train(config: TrainConfig, on_eval: Callable[[EvalPoint], None] | None = None,
          on_start: Callable[[str | None], None] | None = None, prepared: Prepared | None = None) -> TrainResult:
    """Run one training job.

    Args:
        config: the run's settings.
        on_eval: called after every evaluation (the CLI prints progress with it).
        on_start: called with the tracker's run id (None without a tracker) once the run has started,
            before the first step: the moment to point ``atm-watch`` at it.
        prepared: already tokenised data, to skip loading when many runs share one corpus.

    Returns:
        The run's curves and summary.

    Raises:
        CorpusError: the data source could not be read.
    """
    torch.set_num_threads(config.threads)
    if prepared is None:
        prepared = prepare(load_corpus(config.data, size_kb=config.corpus_kb, seed=config.data_seed),
                           val_fraction=config.val_fraction, seed=config.data_seed)
    if len(prepared.train_ids) <= config.context + 1:
        raise ValueError(f"training stream has {len(prepared.train_ids)} tokens, fewer than one context window "
                         f"({config.context + 1}); use more data or a smaller --context")
    torch.manual_seed(config.seed)
    model = GPT(GPTConfig(vocab_size=len(prepared.tokenizer), context=config.context, n_layer=config.n_layer,
                          n_head=config.n_head, width=config.width, dropout=config.dropout))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler: Any = None
    if config.recipe == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=config.plateau_factor, patience=config.plateau_patience)
    elif config.recipe == "healthy":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.steps))
    batches = torch.Generator().manual_seed(config.seed)
    train_ids, val_ids = prepared.train_ids, prepared.val_ids
    eos_id = prepared.tokenizer.eos_id
    # Every training window starts at the beginning of a story, as TinyStories models are trained: a
    # story's opening identifies it, so a small corpus can be memorised outright, which is the point.
    train_starts = _story_starts(train_ids, eos_id)
    train_ids = torch.cat([train_ids, train_ids[: config.context + 1]])  # the last stories wrap around
    val_starts = _story_starts(val_ids, eos_id)
    best = _Checkpoint()
    best_val = math.inf
    step = 0
    rollback_requested = False
    rollbacks = 0

    def request_rollback() -> None:
        # Called from inside optimizer.step()'s hook (or another thread): restoring there would let the
        # step apply gradients of the old weights to the restored ones, so restore at a safe point.
        nonlocal rollback_requested
        rollback_requested = True

    def restore_if_requested() -> None:
        nonlocal rollback_requested, rollbacks
        if rollback_requested:
            rollback_requested = False
            rollbacks += best.restore(model, optimizer)

    tracker = _make_tracker(config)
    listener = None
    ok = False
    evals: list[EvalPoint] = []
    scripted = sorted(config.script, key=lambda s: s.step)
    scripted_done = 0
    start = time.perf_counter()
    try:
        tracker.log_params({**config.run_params(), "data_source": prepared.source,
                            "vocab_size": len(prepared.tokenizer), "n_params": model.n_params(),
                            "train_tokens": len(prepared.train_ids), "val_tokens": len(val_ids),
                            "train_stories": prepared.n_train_stories, "val_stories": prepared.n_val_stories,
                            "val_unk_rate": round(prepared.val_unk_rate, 4)})
        if config.tracking != "none" and config.listen:
            listener = atm.listen(optimizer, knobs={"dropout": (model.get_dropout, model.set_dropout)},
                                  actions={"rollback": request_rollback}, scheduler=scheduler, step=lambda: step)
        if on_start is not None:
            on_start(tracker.run_id)
        losses: list[float] = []
        norms: list[float] = []
        model.train()
        while step < config.steps:
            restore_if_requested()
            pick = torch.randint(0, len(train_starts), (config.batch,), generator=batches)
            batch = torch.stack([train_ids[s: s + config.context + 1] for s in train_starts[pick].tolist()])
            _, loss = model(batch[:, :-1], batch[:, 1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip = config.grad_clip if config.grad_clip is not None else math.inf
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
            optimizer.step()
            if config.recipe == "healthy":
                scheduler.step()  # per step; "plateau" steps on each evaluation below
            step += 1
            losses.append(loss.item())
            stop = listener is not None and listener.stop_requested
            if step % config.eval_every and step != config.steps and not stop:
                continue
            if stop:
                # Stopping keeps the best checkpoint, as early stopping with restore does.
                request_rollback()
            restore_if_requested()  # one that arrived with this step is evaluated now, not next time
            val = _val_loss(model, val_ids, val_starts, eos_id, config.context)
            point = EvalPoint(step=step, train_loss=sum(losses) / len(losses), val_loss=val,
                              grad_norm=sum(norms) / len(norms), lr=optimizer.param_groups[0]["lr"],
                              weight_decay=optimizer.param_groups[0]["weight_decay"], dropout=model.get_dropout(),
                              elapsed_s=time.perf_counter() - start)
            losses, norms = [], []
            evals.append(point)
            tracker.log_metrics(point.model_dump(include={"train_loss", "val_loss", "grad_norm", "lr",
                                                          "weight_decay", "dropout"}), step=step)
            if on_eval is not None:
                on_eval(point)
            if val < best_val:
                best_val = val
                best.save(model, optimizer, step)
            if config.recipe == "plateau":
                scheduler.step(val)
            while scripted_done < len(scripted) and scripted[scripted_done].step <= step:
                _apply_script(scripted[scripted_done], model, optimizer)
                if scripted[scripted_done].rollback:
                    request_rollback()
                scripted_done += 1
            if stop:
                break
        ok = True
    finally:
        if listener is not None:
            listener.close()
        tracker.finish(ok)
    wall = time.perf_counter() - start
    return TrainResult(
        config=config, evals=evals, steps_done=step,
        stopped_by_manager=bool(listener is not None and listener.stop_requested),
        interventions=(len(listener.applied) if listener is not None else 0) + scripted_done,
        rollbacks=rollbacks, wall_time_s=wall, tokens_per_s=step * config.batch * config.context / wall,
        n_params=model.n_params(), data_source=prepared.source, run_id=tracker.run_id,
    )


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """The lr factor at each step: linear from 1/warmup to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        done = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done))
    return factor


def _apply_script(s: ScriptedIntervention, model: GPT, optimizer: torch.optim.Optimizer) -> None:
    # The same effect as the listener's appliers: every param group, every dropout module.
    for name, value in s.changes.items():
        if name == "dropout":
            model.set_dropout(value)
            continue
        for group in optimizer.param_groups:
            group[name] = value
