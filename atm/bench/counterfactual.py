"""Counterfactual branches: train a real job, and from checkpoints along its life continue one branch per
move the policy offers, on several data-order seeds, to label each move by what it led to.

The job (:class:`Job`) is a plain PyTorch loop in this process, on one CPU thread, logging its
metrics into a history held in memory the way a tracker would hold it. Decision points are chosen by
step fractions before any branch runs, so where the dataset looks is not chosen by its labels. At each
point the checkpoint is the model, the optimizer state, the knobs and the schedule's position; every
branch restarts from it with the data order (and dropout masks) of its seed, so moves are compared on
the same batches. The families (what is trained) live in :mod:`atm.bench.counterfactual_families`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from atm.policies import Policy, Window, load_policy
from atm.schema import Action, Diagnosis, Proposal
from atm.watcher.counterfactual import (
    NOOP,
    DatasetLine,
    Earlier,
    Move,
    applied,
    make_line,
    point_situation,
    write_dataset,
)
from atm.watcher.rules import RulesProposer

Batch = Any


def schedule_factor(kind: str, step: int, total: int, warmup: int = 0) -> float:
    """The lr schedule's factor at ``step`` of ``total``: ``constant``, ``cosine`` (to 5%), ``warmup``
    (linear over ``warmup`` steps, then constant), ``warmup-cosine`` or ``warmup-linear`` (then a
    linear decay to 5%, the Hugging Face Trainer's default shape), ``step`` (x0.1 at half and at three
    quarters of ``total``, a StepLR/MultiStepLR shape). Pure."""
    f = 1.0
    if kind.startswith("warmup") and warmup > 0 and step < warmup:
        f = (step + 1) / warmup
    t = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    if kind.endswith("cosine"):
        f *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "warmup-linear":
        f *= 1.0 - 0.95 * t
    if kind == "step":
        f *= 0.1 ** sum(step >= m * total for m in (0.5, 0.75))
    if kind not in ("constant", "cosine", "warmup", "warmup-cosine", "warmup-linear", "step"):
        raise ValueError(f"unknown lr schedule {kind!r}; choose constant, cosine, warmup, warmup-cosine, "
                         "warmup-linear or step")
    return f


@dataclass
class Job:
    """A training loop with the knobs a listener would expose: ``lr`` (scaling the schedule), ``weight_decay``,
    ``dropout`` (every ``nn.Dropout``) and ``loss_weight.aux`` where the family has an auxiliary loss.

    ``loss`` returns the loss to minimise and the components to log (name -> value); ``validate`` the
    evaluation metric (lower is better).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    sample: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch, float], tuple[torch.Tensor, dict[str, float]]]
    validate: Callable[[nn.Module], float]
    schedule: str = "constant"
    total: int = 1000
    warmup: int = 0
    aux_weight: float | None = None
    step: int = 0
    lr_scale: float = 1.0
    data: torch.Generator = field(default_factory=torch.Generator)

    def __post_init__(self) -> None:
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._set_lr()

    # ---- knobs

    def params(self) -> dict[str, float]:
        out = {"lr": self.optimizer.param_groups[0]["lr"],
               "weight_decay": float(self.optimizer.param_groups[0].get("weight_decay", 0.0))}
        drops = self._dropouts()
        if drops:
            out["dropout"] = float(drops[0].p)
        if self.aux_weight is not None:
            out["loss_weight.aux"] = self.aux_weight
        return out

    def apply(self, changes: dict[str, float]) -> None:
        """Set knobs as a listener would: the lr scales the schedule (groups keep their proportions)."""
        for name, value in changes.items():
            if name == "lr":
                now = self.optimizer.param_groups[0]["lr"]
                self.lr_scale *= value / now if now > 0 else 1.0
                self._set_lr()
            elif name == "weight_decay":
                for g in self.optimizer.param_groups:
                    g["weight_decay"] = value
            elif name == "dropout":
                for d in self._dropouts():
                    d.p = value
            elif name == "loss_weight.aux":
                self.aux_weight = value
            else:
                raise ValueError(f"job has no knob {name!r}; knobs: {', '.join(self.params())}")

    def _dropouts(self) -> list[nn.Dropout]:
        return [m for m in self.model.modules() if isinstance(m, nn.Dropout)]

    def _set_lr(self) -> None:
        f = schedule_factor(self.schedule, self.step, self.total, self.warmup) * self.lr_scale
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f

    # ---- training

    def train(self, steps: int) -> dict[str, float]:
        """Run ``steps`` optimizer steps; the mean of each logged quantity over them."""
        self.model.train()
        sums: dict[str, float] = {}
        for _ in range(steps):
            self._set_lr()
            batch = self.sample(self.data)
            loss, parts = self.loss(self.model, batch, self.aux_weight or 0.0)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        return {k: v / max(steps, 1) for k, v in sums.items()}

    def reseed(self, seed: int) -> None:
        """Data order and dropout masks from ``seed``."""
        self.data.manual_seed(seed)
        torch.manual_seed(seed)

    def evaluate(self) -> float:
        self.model.eval()
        with torch.no_grad():
            v = float(self.validate(self.model))
        return v if math.isfinite(v) else math.inf

    # ---- checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "data": self.data.get_state(),
            "step": self.step,
            "lr_scale": self.lr_scale,
            "knobs": self.params(),
        }

    def load(self, state: dict[str, Any], *, weights_only: bool = False) -> None:
        """Restore a checkpoint; ``weights_only`` restores model and optimizer and keeps step and knobs
        (a rollback to the best checkpoint goes on from where the run is)."""
        self.model.load_state_dict(state["model"])
        knobs = self.params()
        # A copy: the optimizer keeps the tensors it is given and steps them in place, which would
        # change the checkpoint every later branch starts from.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if weights_only:
            self._restore_knobs(knobs)
            return
        self.data.set_state(state["data"])
        self.step = state["step"]
        self.lr_scale = state["lr_scale"]
        self._restore_knobs(state["knobs"])

    def _restore_knobs(self, knobs: dict[str, float]) -> None:
        for g in self.optimizer.param_groups:
            g["weight_decay"] = knobs["weight_decay"]
        for d in self._dropouts():
            d.p = knobs.get("dropout", d.p)
        if "loss_weight.aux" in knobs:
            self.aux_weight = knobs["loss_weight.aux"]
        self._set_lr()


class Branchable(Protocol):
    """What the branch loop needs of a job: knobs, training, an evaluation metric and checkpoints
    (:class:`Job`; :class:`atm.bench.counterfactual_rl.PPOJob`)."""

    def params(self) -> dict[str, float]: ...
    def apply(self, changes: dict[str, float]) -> None: ...
    def reseed(self, seed: int) -> None: ...
    def train(self, steps: int) -> dict[str, float]: ...
    def evaluate(self) -> float: ...
    def state(self) -> dict[str, Any]: ...
    def load(self, state: dict[str, Any], *, weights_only: bool = False) -> None: ...


class BranchRecipe(Protocol):
    """What the branch loop needs of a recipe (:class:`Recipe`; :class:`atm.bench.counterfactual_rl.RLRecipe`)."""

    family: str
    run: str
    condition: str
    steps: int
    horizon: int
    seed: int
    policy: str
    higher_is_better: bool
    resolution: float

    def run_main(self) -> tuple[Branchable, list[Point], float]: ...


@dataclass(frozen=True)
class Recipe:
    """One run of a family: how its job is built and how it logs."""

    family: str
    run: str
    #: What the recipe was built to show (``overfitting``, ``healthy``, ...); not a label.
    condition: str
    build: Callable[[int], Job]
    steps: int
    eval_every: int
    horizon: int
    train_key: str = "train_loss"
    val_key: str = "val_loss"
    #: Job component -> metric key (an auxiliary model's ``loss/main``, ``loss/aux``).
    component_keys: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    #: Where the decision points are, as fractions of ``steps``.
    points: tuple[float, ...] = (0.3, 0.55, 0.8)
    #: The policy whose offer is branched.
    policy: str = "lm"
    #: The lr in force, as atm's listener charts it in the job's run (its value at the start, then
    #: whenever it moved by more than 1%; here checked at each evaluation); None: not logged.
    lr_key: str | None = "atm/lr"
    #: The outcome is a loss: smaller is better.
    higher_is_better: bool = False
    #: A loss can tell any difference.
    resolution: float = 0.0

    def run_main(self) -> tuple[Job, list[Point], float]:
        return main_run(self)


@dataclass
class Point:
    """A decision point of a main run: the history and knobs a proposer sees there, the checkpoint every
    branch starts from, the best checkpoint so far (where a rollback goes) and the evaluation there."""

    index: int
    step: int
    history: dict[str, list[tuple[int, float]]]
    params: dict[str, float]
    checkpoint: dict[str, Any]
    best: dict[str, Any]
    value: float


def _log(recipe: Recipe, history: dict[str, list[tuple[int, float]]], step: int, train: dict[str, float],
         val: float, lr: float | None = None) -> None:
    history.setdefault(recipe.train_key, []).append((step, train.get("loss", math.nan)))
    for part, key in recipe.component_keys.items():
        if part in train:
            history.setdefault(key, []).append((step, train[part]))
    history.setdefault(recipe.val_key, []).append((step, val))
    if lr is not None:
        _log_lr(recipe, history, step, lr)


def _log_lr(recipe: Recipe, history: dict[str, list[tuple[int, float]]], step: int, lr: float) -> None:
    """The lr in force under ``recipe.lr_key`` when it moved by more than 1% since last logged (as the
    listener does)."""
    if recipe.lr_key is None:
        return
    pts = history.setdefault(recipe.lr_key, [])
    if not pts or not math.isclose(pts[-1][1], lr, rel_tol=0.01):
        pts.append((step, lr))


def main_run(recipe: Recipe) -> tuple[Job, list[Point], float]:
    """Train the recipe's run, keeping a checkpoint at each decision point and the best one so far;
    returns the job, the points and the ceiling (10x the first evaluation) that caps a diverged branch."""
    torch.manual_seed(recipe.seed)
    job = recipe.build(recipe.seed)
    job.data.manual_seed(recipe.seed)
    evals = [e for e in range(recipe.eval_every, recipe.steps + 1, recipe.eval_every)]
    # Each point at the first evaluation at or after its fraction of the run.
    point_steps = sorted({next(e for e in evals if e >= f * recipe.steps) for f in recipe.points})
    history: dict[str, list[tuple[int, float]]] = {}
    points: list[Point] = []
    best_val, best_state, first = math.inf, job.state(), math.nan
    _log_lr(recipe, history, 0, job.params()["lr"])
    for e in evals:
        train = job.train(e - job.step)
        val = job.evaluate()
        _log(recipe, history, e, train, val, job.params()["lr"])
        if math.isnan(first):
            first = val
        if val < best_val:
            best_val, best_state = val, job.state()
        if e in point_steps:
            points.append(Point(len(points), e, copy.deepcopy(history), job.params(), job.state(), best_state, val))
    ceiling = 10 * first if math.isfinite(first) and first > 0 else 1e6
    return job, points, ceiling


def rules_choice(policy: Policy, point: Point, run: str = "point",
                 earlier: Sequence[Earlier] = ()) -> tuple[Proposal, dict[str, float | str]]:
    """The rules proposer's proposal at a point, and what the validator lets through of it."""
    sit = point_situation(run, point.index, policy, point.history, point.params, earlier)
    proposal = RulesProposer().propose(sit.snapshot, sit.policy, sit.ctx, sit.offer).proposal
    return proposal, applied(proposal, sit)


def candidate_moves(policy: Policy, point: Point, run: str = "point", earlier: Sequence[Earlier] = ()) -> list[Move]:
    """The moves branched at a point: no-op, every value the policy offers for each parameter, each offered
    action, and the rules proposer's own move when it combines several (so that it is scored as itself).

    On a follow-up point (``earlier`` interventions in effect) the offer is the one the validator makes
    there (cooldowns), and the rules' move is branched as they decide with and without ``limits.settle``,
    so that both are scored as themselves."""
    sit = point_situation(run, point.index, policy, point.history, point.params, earlier)
    moves = [Move()]
    for param, values in sorted(sit.offer.choices.items()):
        moves += [Move(changes={param: v}) for v in values]
    moves += [Move(action=a) for a in sit.offer.actions]
    variants = [policy] + ([_without_settle(policy)] if earlier else [])
    for pol in variants:
        changes = rules_choice(pol, point, run, earlier)[1]
        if len(changes) > 1:
            act = changes.pop("action", None)
            mv = Move(changes={k: float(v) for k, v in changes.items()}, action=Action(act) if isinstance(act, str) else None)
            if mv.key not in {m.key for m in moves}:
                moves.append(mv)
    return moves


def _without_settle(policy: Policy) -> Policy:
    return policy.model_copy(update={"limits": policy.limits.model_copy(update={"settle": Window(evals=0)})})


#: A follow-up point's index: the index of the point it follows plus this.
FOLLOW_UP = 100


def follow_up(recipe: Recipe, job: Job, point: Point, policy: Policy, evals: int = 2) -> tuple[Point, Earlier] | None:
    """A second decision point ``evals`` evaluations after ``point``, on the branch where the rules'
    remedy there was applied: the run as the daemon would see it while that remedy is in effect but
    not yet measured (``limits.settle`` waits 3 evaluations in the bundled presets). None when the
    rules' move at ``point`` changes no parameter (a no-op, a stop, a rollback alone)."""
    proposal, changes = rules_choice(policy, point, recipe.run)
    action = changes.pop("action", None)
    if not changes or action == Action.STOP.value:
        return None
    return _continued(recipe, job, point, proposal.diagnosis, {k: float(v) for k, v in changes.items()},
                      action if isinstance(action, str) else None, evals)


def _continued(recipe: Recipe, job: Job, point: Point, diagnosis: Diagnosis, changes: dict[str, float],
               action: str | None, evals: int = 2) -> tuple[Point, Earlier]:
    """``point``'s run on from there ``evals`` evaluations with ``changes`` (and ``action``) applied."""
    job.load(point.checkpoint)
    if action == Action.ROLLBACK.value:
        job.load(point.best, weights_only=True)
    before = job.params()
    job.apply(changes)
    # Its own data order: the branches from the follow-up point then share it up to there.
    job.reseed(7919 * (recipe.seed + 1) + point.index)
    history = copy.deepcopy(point.history)
    best_val = min((v for _, v in history.get(recipe.val_key, []) if math.isfinite(v)), default=math.inf)
    best, step, val = point.best, point.step, point.value
    # The listener charts what it applied at once (its ack), the step after the point.
    _log_lr(recipe, history, step + 1, job.params()["lr"])
    for _ in range(evals):
        train = job.train(recipe.eval_every)
        step += recipe.eval_every
        val = job.evaluate()
        _log(recipe, history, step, train, val, job.params()["lr"])
        if val < best_val:
            best_val, best = val, job.state()
    earlier = Earlier(step=point.step, effective_step=point.step + 1, diagnosis=diagnosis,
                      changes={k: (before[k], float(v)) for k, v in changes.items()},
                      action=Action(action) if action is not None else None)
    return Point(point.index + FOLLOW_UP, step, history, job.params(), job.state(), best, val), earlier


def branch(job: Branchable, point: Point, move: Move, seed: int, horizon: int) -> float:
    """The evaluation metric after ``horizon`` steps from ``point`` with ``move`` applied, on data order ``seed``."""
    return branch_to(job, point, move, seed, [horizon])[0]


def branch_to(job: Branchable, point: Point, move: Move, seed: int, horizons: Sequence[int]) -> list[float]:
    """The evaluation metric ``h`` steps after ``point`` for each ``h`` of ``horizons`` (ascending), on one
    branch with ``move`` applied and data order ``seed``: the first value is what :func:`branch` gives
    for the first horizon, the branch simply trains on. A stop keeps the point's value throughout."""
    if move.action == Action.STOP:
        return [point.value for _ in horizons]
    job.load(point.checkpoint)
    if move.action == Action.ROLLBACK:
        job.load(point.best, weights_only=True)
    job.apply(move.changes)
    job.reseed(seed)
    out, done = [], 0
    for h in horizons:
        job.train(h - done)
        done = h
        out.append(job.evaluate())
    return out


def relog(recipe: Recipe, lines: Sequence[DatasetLine]) -> list[DatasetLine]:
    """``lines`` of ``recipe``'s run with their history as its main run logs it now (a series added to what
    the run logs), their branches as they were. Follow-up points are continued from their point with the
    remedy they carry, whatever the rules would decide there now.

    Raises:
        ValueError: a series a line held came out different (the run itself changed: branch it again).
    """
    torch.set_num_threads(1)  # as the lines were made: more threads sum in another order
    job, points, _ = main_run(recipe)
    at = {p.index: p for p in points}
    out = []
    for ln in lines:
        if ln.earlier:
            e = ln.earlier[-1]
            pt, _ = _continued(recipe, job, at[ln.point - FOLLOW_UP], e.diagnosis,
                               {k: new for k, (_, new) in e.changes.items()}, e.action.value if e.action else None)
        else:
            pt = at[ln.point]
        for key, pts in ln.history.items():
            if pt.step != ln.step or [tuple(p) for p in pt.history.get(key, [])] != [tuple(p) for p in pts]:
                raise ValueError(f"{ln.run} point {ln.point}: {key} is not what the run logs now; branch it again")
        out.append(ln.model_copy(update={"history": pt.history}))
    return out


def recipe_lines(
    recipe: BranchRecipe,
    split: str,
    *,
    policy: str | None = None,
    seeds: int = 3,
    progress: Callable[[str], None] | None = None,
    done: Sequence[DatasetLine] = (),
    on_line: Callable[[DatasetLine], None] | None = None,
    only: Sequence[int] | None = None,
    follow_ups: bool = False,
    to_end: bool = False,
) -> list[DatasetLine]:
    """Every decision point of one recipe, branched and labelled.

    Args:
        policy: the policy whose offer is branched (default: the recipe's).
        done: lines of this run already made (an interrupted generation): their points are not branched
            again, and they are returned in their place.
        on_line: called with each line as soon as it is labelled (to save it).
        only: branch only the points of these indices (to share one run's points among processes).
        follow_ups: also branch, after each point where the rules applied a remedy, a follow-up point
            while that remedy is in effect but not yet measured (:func:`follow_up`; supervised recipes).
        to_end: carry every branch on to the run's last step (``recipe.steps``) and keep its outcome
            there too (``at_end``), where the horizon ends before it.
    """
    policy = policy or recipe.policy
    pol = load_policy(policy)
    job, points, ceiling = recipe.run_main()
    finished = {ln.point: ln for ln in done if ln.run == recipe.run}
    lines = []

    def kept(index: int) -> DatasetLine | None:
        """The finished line of this point, unless it is to be carried on to the run's end now."""
        old = finished.get(index)
        if old is not None and to_end and not old.has_end and old.step + old.horizon < recipe.steps:
            return None
        return old

    def emit(pt: Point, earlier: Sequence[Earlier] = ()) -> None:
        old = kept(pt.index)
        if old is not None:
            lines.append(old)
            return
        moves = candidate_moves(pol, pt, recipe.run, earlier)
        end = recipe.steps - pt.step if to_end and recipe.steps - pt.step > recipe.horizon else None
        horizons = [recipe.horizon] + ([end] if end else [])
        outcomes: dict[str, tuple[Move, list[float]]] = {}
        ends: dict[str, list[float]] = {}
        for mv in moves:
            # Seeds differ per point but are shared by the moves of a point: moves are compared on the same data.
            outs = [branch_to(job, pt, mv, 1000 * (recipe.seed + 1) + 17 * pt.index + s, horizons)
                    for s in range(seeds)]
            outcomes[mv.key] = (mv, [o[0] for o in outs])
            if end:
                ends[mv.key] = [o[1] for o in outs]
        extra: dict[str, Any] = {"at_end": ends, "end_step": recipe.steps} if end else {}
        line = make_line(
            outcomes=outcomes, ceiling=ceiling, higher_is_better=recipe.higher_is_better, **extra,
            resolution=recipe.resolution, family=recipe.family,
            run=recipe.run, condition=recipe.condition, split=split, point=pt.index, policy=policy, step=pt.step,
            history=pt.history, params=pt.params, horizon=recipe.horizon, seeds=seeds, earlier=list(earlier),
        )
        lines.append(line)
        if on_line is not None:
            on_line(line)
        if progress is not None:
            lab = line.labels
            kind = f"follow-up point {pt.index}" if earlier else f"point {pt.index}"
            progress(f"{recipe.family}/{recipe.run} {kind} (step {pt.step}): {len(moves)} moves, "
                     f"noise {lab.noise:.3g}, best {lab.best}, no-op "
                     f"{'acceptable' if NOOP in lab.acceptable else 'not acceptable'}, {len(lab.harmful)} harmful")

    for pt in points:
        if only is not None and pt.index not in only:
            continue
        emit(pt)
        if not (follow_ups and isinstance(recipe, Recipe) and isinstance(job, Job)):
            continue
        old = kept(pt.index + FOLLOW_UP)
        if old is not None:
            lines.append(old)
            continue
        made = follow_up(recipe, job, pt, pol)
        if made is not None:
            fu_point, earlier = made
            emit(fu_point, [earlier])
    # The run's finished lines not made now (other --points, follow-ups when not asked for) stay.
    emitted = {ln.point for ln in lines}
    lines += [ln for i, ln in finished.items() if i not in emitted]
    # Each main point, then its follow-up.
    return sorted(lines, key=lambda ln: (ln.point % FOLLOW_UP, ln.point))


def generate(
    recipes: Sequence[tuple[BranchRecipe, str]],
    out: str | Path,
    *,
    policy: str | None = None,
    seeds: int = 3,
    progress: Callable[[str], None] | None = None,
    keep: Sequence[DatasetLine] = (),
    only: Sequence[int] | None = None,
    follow_ups: bool = False,
    to_end: bool = False,
) -> list[DatasetLine]:
    """Branch and label every (recipe, split) and write the dataset to ``out`` (JSON Lines, ``.gz`` compressed),
    rewritten after each decision point so that an interrupted run keeps what it finished.

    Args:
        policy: the policy whose offer is branched (default: each recipe's own).
        keep: lines to keep in the file: the other runs' come first, as they are; those of a run
            in ``recipes`` (an interrupted generation) are not branched again.
        only: the point indices to branch (default: all).
        follow_ups: also branch follow-up points (see :func:`recipe_lines`).
        to_end: also measure every branch at the run's end (see :func:`recipe_lines`).
    """
    torch.set_num_threads(1)
    names = {r.run for r, _ in recipes}
    kept = [ln for ln in keep if ln.run not in names]
    lines: list[DatasetLine] = []

    def save(line: DatasetLine) -> None:
        lines.append(line)
        # The kept lines of this and later runs too, until they are reached: an interrupted generation
        # must not lose what the file held.
        made = {(ln.run, ln.point) for ln in lines}
        write_dataset(kept + lines + [ln for ln in keep if ln.run in names and (ln.run, ln.point) not in made], out)

    for recipe, split in recipes:
        done = [ln for ln in keep if ln.run == recipe.run and ln.seeds == seeds]
        if progress is not None and done:
            progress(f"{recipe.family}/{recipe.run}: points {sorted(ln.point for ln in done)} kept from {out}")
        before = len(lines)
        made = recipe_lines(recipe, split, policy=policy, seeds=seeds, progress=progress, done=done, on_line=save,
                            only=only, follow_ups=follow_ups, to_end=to_end)
        # The kept points of this run, in their place among the new ones.
        lines[before:] = made
        write_dataset(kept + lines, out)
    return kept + lines
