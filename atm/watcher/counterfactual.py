"""The counterfactual decision dataset: its line format, loader, labels and scoring (``atm eval --dataset``).

Each line is one decision point of a real training run: the metric history a proposer would have
seen there, the parameters in force, the policy, and the measured outcome of every move the policy
offered, each continued from the same checkpoint for a fixed horizon on several data-order seeds
(written by ``benchmarks/counterfactual/generate.py``). Evaluation rebuilds the proposer's situation
from the line (:func:`atm.watcher.decide.offline_situation`), so it needs no training.

Labels (pure, :func:`label_moves`), on the policy's evaluation metric: lower is better (a validation loss)
unless the line says ``higher_is_better`` (an RL run's held-out return):

- ``noise``: the seeds' spread, the pooled standard deviation of the outcomes across seeds over every
  move, floored at a small share of the no-op outcome so a deterministic outcome does not make every
  difference significant;
- per move, ``helped`` if its mean beats no-op's by more than ``noise``, ``hurt`` if it is worse by more,
  else ``neutral``;
- ``best``: the moves with the best mean; ``acceptable``: within ``noise`` of the best;
  ``harmful``: the moves labelled ``hurt``.

Follow-up points (``earlier``, written with ``generate.py --follow-ups``) continue the branch where
the rules' remedy at a point was applied, for two evaluations: the run as the daemon sees it while
that remedy is in effect but not yet measured. There a proposer shows whether it stacks another
remedy for the same problem (:func:`stacked`), and what waiting costs or saves.

Scoring (pure, :func:`score_choice`) judges what the validator would let through. Besides the single
moves, the generator branches the rules proposer's own move when it combines several (a rollback with
an lr cut and more dropout); any other combination was not branched and is scored as the worst of its
parts, the cautious reading.
"""

from __future__ import annotations

import gzip
import json
import math
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atm.policies import Policy, check, load_policy
from atm.schema import Action, Change, DecisionRecord, Diagnosis, Proposal, Status
from atm.watcher.decide import Situation, offline_situation
from atm.watcher.proposer import ProposalResult, Proposer, ProposerError
from atm.watcher.snapshot import HIGHER_IS_BETTER

#: The no-op move's key.
NOOP = "noop"
#: The smallest noise, as a share of the no-op outcome (a deterministic outcome has zero spread).
NOISE_FLOOR = 1e-3

MoveLabel = Literal["helped", "neutral", "hurt"]
Split = Literal["train", "test"]


class DatasetError(ValueError):
    """A dataset file cannot be used. The message names the file and line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Move(_Strict):
    """One candidate move: nothing, parameters set to values, an action, or an action with changes."""

    changes: dict[str, float] = Field(default_factory=dict)
    action: Action | None = None

    @field_validator("changes")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not math.isfinite(x)}
        if bad:
            raise ValueError(f"values must be finite, got {bad}")
        return v

    @property
    def key(self) -> str:
        return move_key(self.changes, self.action.value if self.action else None)


def move_key(changes: dict[str, float], action: str | None) -> str:
    """A move's name: ``noop``, ``lr=0.0005``, ``rollback``, ``rollback+dropout=0.2+lr=0.0005``. Pure."""
    parts = ([action] if action else []) + [f"{k}={v:.6g}" for k, v in sorted(changes.items())]
    return "+".join(parts) or NOOP


class MoveOutcome(_Strict):
    move: Move
    #: The evaluation metric at the horizon, one per seed (a diverged branch counts as the line's `ceiling`).
    outcomes: list[float] = Field(min_length=1)
    mean: float
    label: MoveLabel
    #: The same branches carried on to the end of the run (the line's ``end_step``), one per seed; absent
    #: when the line was branched to its horizon only. What a user keeps is the run's end: a move that
    #: helps over a short horizon (a smaller step lowers the loss at once) can cost by then.
    at_end: list[float] | None = None

    @field_validator("outcomes", "at_end")
    @classmethod
    def _finite(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not all(math.isfinite(x) for x in v):
            raise ValueError("outcomes must be finite (cap a diverged branch at the line's `ceiling`)")
        return v


class Labels(_Strict):
    noise: float = Field(gt=0)
    best: list[str]
    acceptable: list[str]
    harmful: list[str]


class Earlier(_Strict):
    """An intervention applied before a line's decision point: on a follow-up point, the rules' remedy
    at the point it follows, in effect for a few evaluations, not yet long enough to be measured."""

    #: Where it was decided, and the first step trained with it.
    step: int = Field(ge=0)
    effective_step: int = Field(ge=0)
    diagnosis: Diagnosis
    #: Parameter -> [value before, value after].
    changes: dict[str, tuple[float, float]] = Field(default_factory=dict)
    action: Action | None = None


class DatasetLine(_Strict):
    """One decision point: what a proposer would have seen, and what each offered move led to."""

    family: str
    #: The run's recipe within the family (``overfit-adamw-const``, ...).
    run: str
    #: What the recipe was built to show (``overfitting``, ``healthy``, ...): how the run was made, not a label.
    condition: str
    split: Split
    #: Decision point index within the run.
    point: int = Field(ge=0)
    #: A preset name or a policy file's path.
    policy: str
    step: int = Field(ge=0)
    #: Metric key -> [[step, value], ...] up to the decision point, as the tracker would hold it.
    history: dict[str, list[tuple[int, float]]]
    params: dict[str, float]
    #: Training steps each branch ran after the decision point.
    horizon: int = Field(gt=0)
    seeds: int = Field(ge=2)
    #: The value a diverged (non-finite or exploding) branch counts as: no outcome is worse.
    ceiling: float
    #: Whether a larger outcome is better (an RL run's return); a loss is better smaller.
    higher_is_better: bool = False
    #: The smallest difference the outcome can tell (an RL success rate over N held-out episodes: 1/N); 0
    #: for a loss. The labels' noise is never below it.
    resolution: float = Field(0.0, ge=0)
    moves: list[MoveOutcome]
    labels: Labels
    #: Interventions already applied at this point (a follow-up point, see :class:`Earlier`); empty on
    #: the points of the main run.
    earlier: list[Earlier] = Field(default_factory=list)
    #: The run's last step, where each move's ``at_end`` outcomes were measured; absent when they were not.
    end_step: int | None = None

    @field_validator("history")
    @classmethod
    def _history(cls, v: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
        if not any(v.values()):
            raise ValueError("`history` holds no points")
        for key, pts in v.items():
            steps = [s for s, _ in pts]
            if steps != sorted(steps):
                raise ValueError(f"`history.{key}`: steps must be sorted")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> DatasetLine:
        keys = [m.move.key for m in self.moves]
        if keys.count(NOOP) != 1:
            raise ValueError("`moves` must hold exactly one no-op move")
        if len(set(keys)) != len(keys):
            raise ValueError(f"`moves` repeats a move: {sorted(k for k in set(keys) if keys.count(k) > 1)}")
        ends = [m.at_end is not None for m in self.moves]
        if any(ends) and not all(ends):
            raise ValueError("`at_end`: every move needs its outcomes at the run's end, or none")
        if all(ends) and self.end_step is None:
            raise ValueError("`at_end` outcomes need `end_step`, the step they were measured at")
        if self.end_step is not None and self.end_step < self.step + self.horizon:
            raise ValueError(f"`end_step` {self.end_step} is not after the horizon (step {self.step} + {self.horizon})")
        for m in self.moves:
            if len(m.outcomes) != self.seeds:
                raise ValueError(f"move {m.move.key}: {len(m.outcomes)} outcomes for {self.seeds} seeds")
            if m.at_end is not None and len(m.at_end) != self.seeds:
                raise ValueError(f"move {m.move.key}: {len(m.at_end)} `at_end` outcomes for {self.seeds} seeds")
            unknown = set(m.move.changes) - set(self.params)
            if unknown:
                raise ValueError(f"move {m.move.key}: parameters {sorted(unknown)} are not in `params`")
        for e in self.earlier:
            unknown = set(e.changes) - set(self.params)
            if unknown:
                raise ValueError(f"`earlier` changes parameters {sorted(unknown)} that are not in `params`")
            if e.effective_step > self.step:
                raise ValueError(f"`earlier`: effective at step {e.effective_step}, after the point's step {self.step}")
        for name in ("best", "acceptable", "harmful"):
            unknown = set(getattr(self.labels, name)) - set(keys)
            if unknown:
                raise ValueError(f"`labels.{name}` names moves not in `moves`: {sorted(unknown)}")
        return self

    def outcome(self, key: str) -> MoveOutcome | None:
        return next((m for m in self.moves if m.move.key == key), None)

    @property
    def has_end(self) -> bool:
        return self.end_step is not None and all(m.at_end is not None for m in self.moves)


def at_run_end(line: DatasetLine) -> DatasetLine:
    """The line as if it had been branched to the end of the run: each move's outcomes at ``end_step``,
    labelled by the same rule as at the horizon (:func:`label_moves`). Pure.

    Raises:
        DatasetError: the line has no outcomes at the run's end (``generate.py --to-end`` makes them).
    """
    if not line.has_end:
        raise DatasetError(f"{line.family}/{line.run} point {line.point} was branched to its horizon only; "
                           "generate.py --to-end branches to the run's end")
    assert line.end_step is not None
    moves, labels = _labelled({m.move.key: (m.move, list(m.at_end or [])) for m in line.moves},
                              higher_is_better=line.higher_is_better, resolution=line.resolution)
    return line.model_copy(update={"moves": moves, "labels": labels, "horizon": line.end_step - line.step,
                                   "end_step": None})


# --------------------------------------------------------------------------- labels


def label_moves(
    outcomes: dict[str, Sequence[float]], noise_floor: float = NOISE_FLOOR, *, higher_is_better: bool = False,
    resolution: float = 0.0,
) -> tuple[dict[str, MoveLabel], Labels]:
    """Per-move labels and the line's move sets from each move's per-seed outcomes. Pure.

    Args:
        outcomes: move key -> outcome per seed, including :data:`NOOP`; every list has the same seeds
            in the same order.
        noise_floor: the smallest noise as a share of no-op's mean outcome.
        higher_is_better: a larger outcome is better (a return); else a smaller one (a loss).
        resolution: the smallest difference the outcome can tell (a success rate over 36 episodes: 1/36);
            the noise is never taken below it.

    Raises:
        ValueError: no no-op move, or fewer than two seeds.
    """
    if NOOP not in outcomes:
        raise ValueError("the outcomes need the no-op move, the reference every move is compared with")
    if min(len(v) for v in outcomes.values()) < 2:
        raise ValueError("the seeds' spread needs at least two seeds per move")
    sign = -1.0 if higher_is_better else 1.0
    # Compared as costs (smaller is better) whichever way the metric points.
    means = {k: sign * statistics.fmean(v) for k, v in outcomes.items()}
    # Pooled over moves: a single move's 2-3 seeds give a rough spread, the point's moves together a steadier one.
    variances = [statistics.variance(v) for v in outcomes.values()]
    pooled = math.sqrt(statistics.fmean(variances))
    # A rate over a few episodes moves in whole episodes: where most moves score the same on every seed
    # (a stalled run at 0 successes), the pooled spread is near zero and one episode's success would
    # read as many spreads of help.
    noise = max(pooled, noise_floor * abs(means[NOOP]), resolution, 1e-12)
    ref = means[NOOP]
    labels: dict[str, MoveLabel] = {}
    for k, m in means.items():
        labels[k] = "helped" if m < ref - noise else "hurt" if m > ref + noise else "neutral"
    lo = min(means.values())
    return labels, Labels(
        noise=noise,
        best=sorted(k for k, m in means.items() if m == lo),
        acceptable=sorted(k for k, m in means.items() if m <= lo + noise),
        harmful=sorted(k for k, lab in labels.items() if lab == "hurt"),
    )


def make_line(
    *, outcomes: dict[str, tuple[Move, Sequence[float]]], ceiling: float, higher_is_better: bool = False,
    resolution: float = 0.0, at_end: dict[str, Sequence[float]] | None = None, **fields: Any,
) -> DatasetLine:
    """A dataset line from the moves' per-seed outcomes (none counted worse than ``ceiling``), labelled;
    ``at_end``: the same branches' outcomes at the run's end (``end_step`` among ``fields``). Pure."""
    worst = max if higher_is_better else min

    def cap(x: float) -> float:
        return worst(x, ceiling) if math.isfinite(x) else ceiling

    capped = {k: (mv, [cap(x) for x in v]) for k, (mv, v) in outcomes.items()}
    ends = {k: [cap(x) for x in v] for k, v in (at_end or {}).items()}
    moves, labels = _labelled(capped, higher_is_better=higher_is_better, resolution=resolution, at_end=ends)
    return DatasetLine(ceiling=ceiling, higher_is_better=higher_is_better, resolution=resolution, moves=moves,
                       labels=labels, **fields)


def _labelled(
    outcomes: dict[str, tuple[Move, list[float]]], *, higher_is_better: bool, resolution: float,
    at_end: dict[str, list[float]] | None = None,
) -> tuple[list[MoveOutcome], Labels]:
    """The moves with their outcomes, means and labels (:func:`label_moves`), and the line's move sets. Pure."""
    per_move, labels = label_moves({k: v for k, (_, v) in outcomes.items()}, higher_is_better=higher_is_better,
                                   resolution=resolution)
    moves = [MoveOutcome(move=mv, outcomes=v, mean=statistics.fmean(v), label=per_move[k],
                         at_end=(at_end or {}).get(k)) for k, (mv, v) in outcomes.items()]
    return moves, labels


# --------------------------------------------------------------------------- file


def write_dataset(lines: Iterable[DatasetLine], path: str | Path) -> Path:
    """Write JSON Lines, gzip-compressed when ``path`` ends in ``.gz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A loss line leaves out `higher_is_better` and `resolution`, a main-run point `earlier` (their defaults): lines
    # written before the fields existed come out byte for byte the same.
    def defaults(line: DatasetLine) -> set[str]:
        return {name for name, empty in (("higher_is_better", not line.higher_is_better), ("earlier", not line.earlier),
                                          ("resolution", not line.resolution)) if empty}

    text = "".join(line.model_dump_json(exclude_none=True, exclude=defaults(line) or None) + "\n" for line in lines)
    if path.suffix == ".gz":
        # mtime 0: the same lines give the same bytes, so a regenerated file diffs only where it changed.
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        path.write_text(text)
    return path


def load_dataset(path: str | Path) -> list[DatasetLine]:
    """Every line of a dataset file (``.jsonl`` or ``.jsonl.gz``).

    Raises:
        DatasetError: the file is missing or empty, or a line is not JSON or breaks the schema (its
            number and the fields named).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset {str(path)!r} does not exist; pass --dataset FILE (benchmarks/counterfactual/)")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    out: list[DatasetLine] = []
    for n, text in enumerate(raw.decode().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            out.append(DatasetLine.model_validate(json.loads(text)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{n}: not valid JSON: {exc}") from exc
        except ValidationError as exc:
            errs = "; ".join(f"`{'.'.join(str(p) for p in e['loc']) or 'line'}`: {e['msg']}" for e in exc.errors())
            raise DatasetError(f"{path}:{n}: {errs}") from exc
    if not out:
        raise DatasetError(f"{path}: no lines")
    return out


def line_situation(line: DatasetLine, policy: Policy) -> Situation:
    """What a proposer is handed at the line's decision point (see :func:`point_situation`)."""
    history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in line.history.items()}
    return point_situation(line.run, line.point, policy, history, line.params, line.earlier)


def point_situation(run: str, point: int, policy: Policy, history: dict[str, list[tuple[int, float]]],
                    params: dict[str, float], earlier: Sequence[Earlier] = ()) -> Situation:
    """What a proposer is handed at decision point ``point`` of ``run``, with its earlier interventions
    as the daemon would have recorded them (applied, in effect from their step, not yet measured)."""
    name = f"{run}#{point}"
    records = [
        DecisionRecord(run_id=name, seq=i + 1, step=e.step, status=Status.APPLIED, source="dataset",
                       diagnosis=e.diagnosis, changes={k: Change(old=o, new=n) for k, (o, n) in e.changes.items()},
                       action=e.action, applied_step=e.effective_step, effective_step=e.effective_step, decided_at=0.0)
        for i, e in enumerate(earlier)
    ]
    return offline_situation(name, policy, history, params, records)


def stacked(line: DatasetLine, proposal: Proposal | None, changes: dict[str, float | str]) -> bool:
    """Whether a decision on a follow-up point applies another remedy for the problem its earlier
    intervention answers, before that one could be measured (what ``limits.settle`` prevents).
    Divergence is not counted: there speed wins, and settle does not wait. Pure."""
    if not line.earlier or proposal is None or not changes or changes.get("action") == Action.STOP.value:
        return False
    return proposal.diagnosis == line.earlier[-1].diagnosis != Diagnosis.DIVERGENCE


# --------------------------------------------------------------------------- fixed strategies


class _Fixed:
    """A fixed strategy as a proposer: one rule, whatever the run shows."""

    name = "fixed"

    def __init__(self, name: str, rule: Callable[[Situation], Proposal]):
        self.name = self.label = name
        self._rule = rule

    def propose(self, snapshot: Any, policy: Policy, ctx: Any, offer: Any) -> ProposalResult:
        sit = Situation(snapshot=snapshot, policy=policy, ctx=ctx, offer=offer)
        return ProposalResult(proposal=self._rule(sit), source=self.name)


def _noop(sit: Situation) -> Proposal:
    return Proposal(diagnosis=Diagnosis.HEALTHY)


def _halve_lr(sit: Situation) -> Proposal:
    lr = sit.ctx.params.get("lr")
    opts = sit.offer.choices.get("lr", [])
    target = next((v for v in opts if lr is not None and math.isclose(v, lr * 0.5, rel_tol=1e-6)), None)
    if target is None:
        return _noop(sit)
    return Proposal(diagnosis=Diagnosis.PLATEAU, changes={"lr": target})


def _stop_at_rise(sit: Situation) -> Proposal:
    # The policy's evaluation metric, else the first of its roles the run logs (a return where there
    # is no success rate), as the snapshot falls back.
    roles = [sit.policy.limits.eval_metric, *sit.policy.metrics]
    role = next((r for r in roles if r in sit.snapshot.series), None)
    if role is None or Action.STOP not in sit.offer.actions:
        return _noop(sit)
    stats = sit.snapshot.series[role]
    # Early stopping with patience 1: the latest evaluation is worse than the best so far.
    worse = stats.latest < stats.best if role in HIGHER_IS_BETTER else stats.latest > stats.best
    if worse:
        return Proposal(diagnosis=Diagnosis.OVERFITTING, action=Action.STOP)
    return _noop(sit)


BASELINES: dict[str, Callable[[], Proposer]] = {
    "always-noop": lambda: _Fixed("always-noop", _noop),
    "always-halve-lr": lambda: _Fixed("always-halve-lr", _halve_lr),
    "stop-at-first-rise": lambda: _Fixed("stop-at-first-rise", _stop_at_rise),
}


# --------------------------------------------------------------------------- scoring


class Choice(BaseModel):
    """How one decision scored."""

    family: str
    run: str
    point: int
    condition: str
    diagnosis: str | None
    #: The branch key the applied moves were scored as; ``None`` when they match no branch.
    move: str | None
    acceptable: bool
    harmful: bool
    regret: float | None
    latency_s: float
    #: A follow-up point (an earlier intervention not yet measured), and whether the decision stacked
    #: another remedy for the same problem on it (:func:`stacked`).
    follow_up: bool = False
    stacked: bool = False


class Rates(BaseModel):
    n: int
    acceptable_rate: float
    harmful_rate: float
    noop_precision: float | None
    noop_recall: float | None
    mean_regret: float | None
    #: Decisions whose applied moves were no branch of the line (the offer changed since it was made).
    unmatched: int = 0
    #: Follow-up points among them, and the decisions there that stacked a remedy on an unmeasured one.
    follow_ups: int = 0
    stacked: int = 0


class DatasetReport(BaseModel):
    proposer: str
    dataset: str
    split: str
    summary: Rates
    by_family: dict[str, Rates]
    by_condition: dict[str, Rates]
    by_diagnosis: dict[str, Rates]
    decisions: list[Choice]


def applied(proposal: Proposal, sit: Situation) -> dict[str, float | str]:
    """What :func:`atm.policies.check` lets through of ``proposal``: parameter -> new value, and ``action`` ->
    its name (empty for a no-op or a rejected proposal). Pure."""
    if proposal.is_noop:
        return {}
    verdict = check(proposal, sit.policy, sit.ctx)
    if not verdict.accepted:
        return {}
    out: dict[str, float | str] = {k: c.new for k, c in verdict.changes.items()}
    if verdict.action is not None:
        out["action"] = verdict.action.value
    return out


def chosen_key(line: DatasetLine, changes: dict[str, float | str]) -> str | None:
    """The branch that applied ``changes`` (parameter -> value, ``action`` -> name) are scored as: the branch
    of exactly these moves, else, for several moves at once, the worst of their single-move branches.
    ``None`` when a move was not branched. Pure."""
    action = changes.get("action")
    params = {k: float(v) for k, v in changes.items() if k != "action"}

    def find(sub: dict[str, float], act: str | None) -> str | None:
        for m in line.moves:
            mact = m.move.action.value if m.move.action else None
            if mact == act and set(m.move.changes) == set(sub) and all(
                math.isclose(m.move.changes[k], v, rel_tol=1e-6, abs_tol=1e-12) for k, v in sub.items()
            ):
                return m.move.key
        return None

    exact = find(params, str(action) if action else None)
    if exact is not None:
        return exact
    parts = [find({k: v}, None) for k, v in params.items()] + ([find({}, str(action))] if action else [])
    if any(p is None for p in parts):
        return None
    sign = -1.0 if line.higher_is_better else 1.0
    return max(parts, key=lambda k: sign * line.outcome(k).mean)  # type: ignore[arg-type,union-attr]


def score_choice(line: DatasetLine, key: str | None) -> tuple[bool, bool, float | None]:
    """(acceptable, harmful, regret in noise units) of choosing branch ``key``. Pure."""
    if key is None:
        return False, False, None
    chosen = line.outcome(key)
    assert chosen is not None
    sign = -1.0 if line.higher_is_better else 1.0
    best = min(sign * m.mean for m in line.moves)
    return key in line.labels.acceptable, key in line.labels.harmful, (sign * chosen.mean - best) / line.labels.noise


def rates(rows: Sequence[Choice], lines: Sequence[DatasetLine]) -> Rates:
    """Summary of scored decisions (``lines`` in the same order as ``rows``). Pure."""
    n = len(rows)
    scored = [r for r in rows if r.move is not None]
    noop_chosen = [(r, ln) for r, ln in zip(rows, lines) if r.move == NOOP]
    noop_right = [(r, ln) for r, ln in zip(rows, lines) if NOOP in ln.labels.acceptable]
    regrets = [r.regret for r in scored if r.regret is not None]
    return Rates(
        n=n,
        acceptable_rate=_rate(sum(r.acceptable for r in rows), n),
        harmful_rate=_rate(sum(r.harmful for r in rows), n),
        noop_precision=_rate(sum(NOOP in ln.labels.acceptable for _, ln in noop_chosen), len(noop_chosen))
        if noop_chosen else None,
        noop_recall=_rate(sum(r.move == NOOP for r, _ in noop_right), len(noop_right)) if noop_right else None,
        mean_regret=round(statistics.fmean(regrets), 3) if regrets else None,
        unmatched=n - len(scored),
        follow_ups=sum(r.follow_up for r in rows),
        stacked=sum(r.stacked for r in rows),
    )


def score_dataset(
    proposer: Proposer,
    lines: Sequence[DatasetLine],
    *,
    dataset: str = "",
    split: str = "all",
    policy: str | None = None,
    progress: Callable[[Choice], None] | None = None,
) -> DatasetReport:
    """Run ``proposer`` at every line's decision point and score what the validator would apply.

    Args:
        policy: a preset name or policy file to decide under instead of each line's own (to compare
            policies, e.g. with and without ``limits.settle``); it must offer the moves the lines branched.
    """
    policies: dict[str, Policy] = {}
    rows: list[Choice] = []
    for line in lines:
        spec = policy or line.policy
        if spec not in policies:
            policies[spec] = load_policy(spec)
        sit = line_situation(line, policies[spec])
        t0 = time.perf_counter()
        try:
            proposal: Proposal | None = proposer.propose(sit.snapshot, sit.policy, sit.ctx, sit.offer).proposal
        except ProposerError:
            proposal = None
        latency = time.perf_counter() - t0
        changes = applied(proposal, sit) if proposal is not None else {}
        key = chosen_key(line, changes)
        ok, harm, regret = score_choice(line, key)
        rows.append(Choice(
            family=line.family, run=line.run, point=line.point, condition=line.condition,
            diagnosis=proposal.diagnosis.value if proposal is not None else None,
            move=key, acceptable=ok, harmful=harm,
            regret=round(regret, 3) if regret is not None else None, latency_s=round(latency, 4),
            follow_up=bool(line.earlier), stacked=stacked(line, proposal, changes),
        ))
        if progress is not None:
            progress(rows[-1])

    def grouped(attr: str) -> dict[str, Rates]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            groups[str(getattr(r, attr))].append(i)
        return {g: rates([rows[i] for i in idx], [lines[i] for i in idx]) for g, idx in sorted(groups.items())}

    return DatasetReport(
        proposer=getattr(proposer, "label", None) or proposer.name,
        dataset=dataset, split=split, summary=rates(rows, lines),
        by_family=grouped("family"), by_condition=grouped("condition"), by_diagnosis=grouped("diagnosis"),
        decisions=rows,
    )


#: When a move is judged: at the branch's horizon (as labelled), or at the end of the run.
HORIZONS = ("branch", "end")


def judged_at(lines: Sequence[DatasetLine], horizon: str) -> list[DatasetLine]:
    """The lines as judged at ``horizon``: as labelled (``branch``), or at the run's end (``end``: only
    the lines branched that far, see :func:`at_run_end`). Pure.

    Raises:
        DatasetError: an unknown horizon, or none of the lines reaches the run's end.
    """
    if horizon not in HORIZONS:
        raise DatasetError(f"horizon must be one of {', '.join(HORIZONS)}, got {horizon!r}")
    if horizon == "branch":
        return list(lines)
    out = [at_run_end(ln) for ln in lines if ln.has_end]
    if not out:
        raise DatasetError("none of these lines was branched to the run's end; generate.py --to-end makes them")
    return out


#: Which decision points :func:`select` takes: the main runs' points, the follow-up points, or both.
POINTS = ("all", "main", "follow-ups")


def select(lines: Sequence[DatasetLine], split: str, points: str = "all") -> list[DatasetLine]:
    """The lines of one split (``all``: every line), of the main runs' points, the follow-up points
    (an earlier remedy in effect) or both.

    Raises:
        DatasetError: the selection has no lines.
    """
    if points not in POINTS:
        raise DatasetError(f"points must be one of {', '.join(POINTS)}, got {points!r}")
    out = [ln for ln in lines if split == "all" or ln.split == split]
    if not out:
        raise DatasetError(f"no lines in split {split!r}; the file has {sorted({ln.split for ln in lines})}")
    if points != "all":
        out = [ln for ln in out if bool(ln.earlier) == (points == "follow-ups")]
        if not out:
            what = "follow-up" if points == "follow-ups" else "main-run"
            hint = "; generate.py --follow-ups writes them" if points == "follow-ups" else ""
            raise DatasetError(f"no {what} points in split {split!r}{hint}")
    return out


def _rate(k: int, n: int) -> float:
    return round(k / n, 4) if n else 0.0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def rates_row(name: str, r: Rates) -> list[str]:
    """One table row: name, n, acceptable, harmful, no-op precision / recall, mean regret."""
    regret = "n/a" if r.mean_regret is None else f"{r.mean_regret:.2f}"
    return [name, str(r.n), _pct(r.acceptable_rate), _pct(r.harmful_rate), _pct(r.noop_precision),
            _pct(r.noop_recall), regret]


RATES_HEADER = ["", "n", "acceptable", "harmful", "no-op precision", "no-op recall", "mean regret (noise units)"]


def format_dataset_reports(reports: Sequence[DatasetReport]) -> str:
    """Plain text: one summary row per proposer, then each proposer's rows per family and per diagnosis."""
    def table(rows: list[list[str]]) -> list[str]:
        rows = [RATES_HEADER, *rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]

    out = [f"dataset: {reports[0].dataset}  split: {reports[0].split}"] if reports else []
    out += table([rates_row(r.proposer, r.summary) for r in reports])
    if reports and reports[0].summary.follow_ups:
        out += ["", "follow-up points (an earlier remedy in effect, not yet measured): remedies stacked on it"]
        out += [f"  {r.proposer}: {r.summary.stacked} of {r.summary.follow_ups}" for r in reports]
    for r in reports:
        out += ["", f"{r.proposer}, by family / recipe condition / its diagnosis:"]
        out += table([rates_row(f"family {k}", v) for k, v in r.by_family.items()]
                     + [rates_row(f"condition {k}", v) for k, v in r.by_condition.items()]
                     + [rates_row(f"diagnosis {k}", v) for k, v in r.by_diagnosis.items()])
    return "\n".join(out)


__all__ = [
    "BASELINES",
    "HORIZONS",
    "NOOP",
    "POINTS",
    "Choice",
    "DatasetError",
    "DatasetLine",
    "DatasetReport",
    "Earlier",
    "Labels",
    "Move",
    "MoveOutcome",
    "Rates",
    "applied",
    "at_run_end",
    "chosen_key",
    "format_dataset_reports",
    "judged_at",
    "label_moves",
    "line_situation",
    "load_dataset",
    "make_line",
    "move_key",
    "point_situation",
    "rates",
    "score_choice",
    "score_dataset",
    "select",
    "stacked",
    "write_dataset",
]
