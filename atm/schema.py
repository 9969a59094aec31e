"""The one contract between the daemon (``atm.watcher``) and the in-job listener (``atm.training``).

Both sides import this module and nothing else of each other. Every message carries
``schema_version`` so a listener and a daemon of different releases can tell when they
cannot understand each other, instead of guessing.

Rules both sides keep:

- An :class:`Update` is identified by ``(run_id, seq)``. ``seq`` is monotonic per run (gaps
  are allowed: rejected decisions consume a number too). The listener applies updates in
  ascending ``seq`` order, at most once each, and acknowledges each with an :class:`Ack`.
- Updates carry absolute target values (``Change.new``), never deltas, so re-applying one
  after a crash is harmless, and the listener still refuses to do it.
- Messages are small JSON documents: an update must fit one MLflow tag (8000 characters)
  or one inbox file; long text (prompts, raw LLM answers) lives in the decision record.
- Updates, acks and decision records are signed (``atm.signing``): ``signature`` and ``key_id``
  are optional here so that messages written before signing still parse, but the listener applies
  only updates whose signature checks with its key, and only within the limits each change carries
  (:func:`target_value`).
"""

from __future__ import annotations

import enum
import math
import sys
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1

#: Longest rationale carried inside an update message; the full text is in the decision record.
MAX_MESSAGE_RATIONALE = 600


class Diagnosis(str, enum.Enum):
    """What a proposer believes is going on. Shared by the rules and the LLM proposers."""

    HEALTHY = "healthy"
    OVERFITTING = "overfitting"
    PLATEAU = "plateau"
    #: A supervised loss falling at a steady pace that is not slowing down: the step is too small.
    LR_TOO_LOW = "lr_too_low"
    DIVERGENCE = "divergence"
    LOSS_IMBALANCE = "loss_imbalance"
    OVER_REGULARIZATION = "over_regularization"
    EXPLORATION_COLLAPSE = "exploration_collapse"
    UNSAFE_EXPLORATION = "unsafe_exploration"
    CONVERGED = "converged"
    INSUFFICIENT_DATA = "insufficient_data"


class Action(str, enum.Enum):
    """Discrete actions besides parameter changes. The listener maps them to user handlers."""

    STOP = "stop"
    ROLLBACK = "rollback"


class Status(str, enum.Enum):
    """Where a decision stands. ``pending``: published, not yet acknowledged by the job.
    ``awaiting-approval``: accepted, held by the watcher until a person approves it (then ``pending``),
    rejects it (``rejected``), or it is no longer fresh (``expired``)."""

    PENDING = "pending"
    APPLIED = "applied"
    REJECTED = "rejected"
    STALE = "stale"
    DRY_RUN = "dry-run"
    FAILED = "failed"
    NOOP = "noop"
    AWAITING_APPROVAL = "awaiting-approval"
    EXPIRED = "expired"
    #: Applied, then set back by the job itself before it could act (the listener read it back).
    UNDONE = "undone"


#: Diverged runs log NaN and inf; JSON has no such numbers, so they travel as "NaN" / "Infinity" strings.
_JSON = ConfigDict(extra="ignore", ser_json_inf_nan="strings")


class _Message(BaseModel):
    model_config = _JSON
    schema_version: int = SCHEMA_VERSION


# --------------------------------------------------------------------------- telemetry


class SeriesStats(BaseModel):
    """Windowed statistics of one metric series. Slopes are per 1000 steps."""

    model_config = _JSON

    key: str
    n: int
    first_step: int
    last_step: int
    latest: float
    ema: float
    slope: float
    window_mean: float
    window_std: float
    best: float
    best_step: int
    steps_since_best: int
    min: float
    max: float
    nonfinite: bool
    #: A few (step, value) points spread over the history, for trend tables.
    trail: list[tuple[int, float]] = Field(default_factory=list)


class EffectLabel(str, enum.Enum):
    """What an applied change did, judged against the run's own trend and noise."""

    HELPED = "helped"
    NEUTRAL = "neutral"
    HURT = "hurt"
    #: It could not be judged: too few evaluations before it to project from, or the run ended first.
    UNKNOWN = "unknown"


class Outcome(BaseModel):
    """The measured effect of one applied change on the metric the policy optimises: its mean over
    the evaluations after the change took effect, against what the run's trend before it projected."""

    model_config = _JSON

    label: EffectLabel
    #: The metric judged (the run's key) and how many evaluations were measured.
    metric: str
    evals: int = 0
    #: Mean of the last evaluations before the change; mean projected and measured over the ones after.
    before: float = math.nan
    projected: float = math.nan
    measured: float = math.nan
    #: The run's own spread around its trend before the change (residual standard deviation).
    noise: float = math.nan
    #: Slope per 1000 steps before the change and over the evaluations after it.
    slope_before: float = math.nan
    slope_after: float = math.nan
    note: str = ""

    def summary(self) -> str:
        if self.label == EffectLabel.UNKNOWN:
            return f"unknown ({self.note})" if self.note else "unknown"
        # A neutral change may still show a difference: say it is one the run's noise could make.
        within = " (a difference within the noise)" if self.label == EffectLabel.NEUTRAL else ""
        return (f"{self.label.value}{within}: {self.metric} {fmt(self.measured)} against {fmt(self.projected)} projected "
                f"over {self.evals} evaluations (noise {fmt(self.noise)}; slope {fmt(self.slope_before)} -> "
                f"{fmt(self.slope_after)} per 1k steps)")


class Effect(BaseModel):
    """What happened to the watched metrics after an applied intervention."""

    model_config = _JSON

    seq: int
    #: Where it took effect on the run's step axis (the decision record's ``effective_step``); None until known.
    applied_step: int | None
    changes: dict[str, "Change"]
    diagnosis: Diagnosis | None = None
    #: The action that came with the changes (``rollback``: it restarted from the best checkpoint).
    action: Action | None = None
    #: Metric role -> (value at decision, value now).
    before_after: dict[str, tuple[float, float]] = Field(default_factory=dict)
    #: Evaluations logged since it took effect (at or after ``applied_step``); None until known.
    evals_since: int | None = None
    #: What it did, once measured (see :class:`Outcome`).
    outcome: Outcome | None = None


class TelemetrySnapshot(_Message):
    """Everything a proposer may look at, rebuilt from the metrics the job already logs."""

    run_id: str
    run_name: str = ""
    step: int
    taken_at: float = Field(default_factory=time.time)
    #: Role (``train_loss``, ``val_loss``, ``return`` ...) -> stats of the mapped metric.
    series: dict[str, SeriesStats] = Field(default_factory=dict)
    #: Derived signals: ``gap`` (val - train), ``gap_slope``, ``plateau``, ``diverging``, ...
    signals: dict[str, float | bool] = Field(default_factory=dict)
    #: Current values of the controllable parameters, as the listener last reported them.
    params: dict[str, float] = Field(default_factory=dict)
    #: Recent interventions and their measured effects, newest last.
    recent: list[Effect] = Field(default_factory=list)
    #: Applied interventions per diagnosis over the whole run (``recent`` holds only the last few).
    applied: dict[str, int] = Field(default_factory=dict)


# --------------------------------------------------------------------------- decisions


#: The largest factor :func:`in_force` applies to a value in force when a change does not carry its
#: policy's own bound (``Change.max_factor``): past it a move is a set-value, never a multiplication.
DEFAULT_MAX_FACTOR = 10.0

#: Knobs the listener never makes negative, whatever an update says: a negative lr climbs the loss.
NEVER_NEGATIVE = frozenset({"lr", "weight_decay"})


class Change(BaseModel):
    """A decided move of one parameter, ``old -> new``, with the limits the listener holds it to.

    ``max_factor`` and ``min`` come from the policy (the validator fills them) and travel inside the
    signed update, so the listener enforces the policy's bounds without a policy file.
    """

    old: float
    new: float
    #: The most this move may multiply (or divide) the value in force by: the policy's largest multiplier.
    max_factor: float | None = None
    #: The policy's lower bound; when it is 0 or more, the listener never sets a negative value.
    min: float | None = None

    @field_validator("old", "new", "min")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"parameter values must be finite, got {v}")
        return v

    @field_validator("max_factor")
    @classmethod
    def _factor(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and v >= 1):
            raise ValueError(f"max_factor must be a finite number of at least 1, got {v}")
        return v


def in_force(old: float, new: float, now: Any, max_factor: float | None = None) -> float:
    """The value a change decided as ``old -> new`` means when the parameter reads ``now``.

    The decided move, applied to the value in force: if the job moved the value since the manager
    read it (an LR scheduler decays the lr all the time; a rollback restores an older one), setting
    ``new`` as such could even move it the wrong way. So the ratio ``new / old`` is applied to ``now``.
    A set-value decided from 0 (dropout 0 -> 0.1), or a value that has not moved (within 1%), is
    ``new`` as it is. The listener applies changes this way; the daemon checks them this way.

    The ratio is applied only while it is within ``max_factor`` (default :data:`DEFAULT_MAX_FACTOR`)
    either way: a larger one is no multiplier move but a set-value from a value near zero (weight
    decay 1e-9 -> 0.01), and as a ratio it would multiply the value in force without limit.
    """
    try:
        now = float(now)
    except (TypeError, ValueError):
        return new
    # Below the smallest normal float a product loses its precision, or underflows to 0 (found by a
    # property test: now 5e-324 halved gave 0): such a value in force is read as 0, so ``new`` as it is.
    tiny = sys.float_info.min
    if old > 0 and new > 0 and now >= tiny and math.isfinite(now) and not math.isclose(now, old, rel_tol=0.01):
        ratio = new / old
        bound = DEFAULT_MAX_FACTOR if max_factor is None else max_factor
        if 1 / bound <= ratio <= bound and tiny <= now * ratio < math.inf:
            return now * ratio
    return new


class LimitExceeded(ValueError):
    """A change the listener refuses to apply; the message names the parameter and the limit."""


def target_value(name: str, change: Change, now: float | None) -> float:
    """The value the listener sets for ``change`` of knob ``name`` now at ``now``. Pure.

    Checked whatever arrived (a message built without validation too): every number finite, the
    result finite, and not negative for :data:`NEVER_NEGATIVE` knobs or a policy minimum of 0 or more.

    Raises:
        LimitExceeded: with the reason, for the ack.
    """
    numbers = {"old": change.old, "new": change.new, "max_factor": change.max_factor, "min": change.min}
    bad = {k: v for k, v in numbers.items() if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v))}
    if bad:
        raise LimitExceeded(f"{name}: {', '.join(f'{k}={v}' for k, v in bad.items())} is not a finite number")
    if change.max_factor is not None and change.max_factor < 1:
        raise LimitExceeded(f"{name}: max_factor {change.max_factor} is below 1")
    value = in_force(change.old, change.new, now, change.max_factor)
    if not math.isfinite(value):
        raise LimitExceeded(f"{name} would be {value}: values must be finite")
    floor = name in NEVER_NEGATIVE or (change.min is not None and change.min >= 0)
    if floor and value < 0:
        raise LimitExceeded(f"{name} would be {fmt(value)}: {name} may not be negative")
    return value


Effect.model_rebuild()


class Proposal(BaseModel):
    """A proposer's answer: a diagnosis and what to change, in absolute new values."""

    model_config = ConfigDict(extra="forbid")

    diagnosis: Diagnosis
    #: Parameter -> proposed new value. Empty means "do nothing".
    changes: dict[str, float] = Field(default_factory=dict)
    action: Action | None = None
    rationale: str = ""
    expected_outcome: str = ""
    watch_next: str = ""
    #: The earlier decision this proposal undoes (its change was measured ``hurt``).
    reverts: int | None = None
    #: For a stop: the problem it ends (overfitting or a plateau that remedies did not fix); None
    #: when the run reached its goal.
    problem: Diagnosis | None = None

    @property
    def is_noop(self) -> bool:
        return not self.changes and self.action is None


class Verdict(BaseModel):
    """The policy validator's answer, with a reason a person can read."""

    accepted: bool
    reason: str
    #: The changes that passed, with the values they replace.
    changes: dict[str, Change] = Field(default_factory=dict)
    action: Action | None = None
    #: Parameter -> why that one change was dropped (cooldown, budget, not allowed ...).
    dropped: dict[str, str] = Field(default_factory=dict)


class Update(_Message):
    """An accepted decision as sent to the job. Small: it must fit one MLflow tag."""

    run_id: str
    seq: int
    #: The metric step the decision was based on.
    step: int
    changes: dict[str, Change] = Field(default_factory=dict)
    action: Action | None = None
    diagnosis: Diagnosis
    rationale: str = ""
    source: str
    created_at: float = Field(default_factory=time.time)
    #: HMAC-SHA256 of the rest (:mod:`atm.signing`) and the id of the key that made it.
    signature: str | None = None
    key_id: str | None = None

    @field_validator("rationale")
    @classmethod
    def _short(cls, v: str) -> str:
        return v if len(v) <= MAX_MESSAGE_RATIONALE else v[: MAX_MESSAGE_RATIONALE - 1] + "…"


class Ack(_Message):
    """The listener's receipt for one update."""

    run_id: str
    seq: int
    #: ``rejected``: not applied at all (bad signature or a limit); ``error`` says why and what to do.
    #: ``undone``: applied, then set back by the job itself (a scheduler it did not give atm, code that
    #: re-applies a config); sent again over the ``applied`` ack, ``error`` says the cause and the fix.
    status: Literal["applied", "failed", "rejected", "undone"]
    #: The job's step when the update took effect.
    applied_step: int | None
    applied_at: float = Field(default_factory=time.time)
    #: Parameter -> value actually in force after applying (may differ if a knob rounds).
    values: dict[str, float] = Field(default_factory=dict)
    error: str = ""
    #: The listener signs its acks too, so a written-in ack cannot pass for one of the job's.
    signature: str | None = None
    key_id: str | None = None


class Approval(_Message):
    """A person's answer to a decision the watcher holds for approval (``limits.approval: required``).

    ``atm approve`` / ``atm reject`` write it signed; a tag added in the tracker's UI (``atm.approve``
    = ``<seq>``) is read as an unsigned one, which the watcher takes only under stricter conditions.
    """

    #: The run it answers for (empty for a UI tag: the tag is on the run itself).
    run_id: str = ""
    seq: int
    decision: Literal["approve", "reject"]
    #: Who answered, as far as atm can tell (``user@host`` for ``atm approve``, the tag for the UI).
    by: str = ""
    note: str = ""
    created_at: float = Field(default_factory=time.time)
    signature: str | None = None
    key_id: str | None = None


class ListenerInfo(_Message):
    """What a listener announces about itself when it attaches, and refreshes as values change."""

    run_id: str
    knobs: list[str]
    values: dict[str, float]
    #: Knobs that are a weight decay added to the gradient (an L2 penalty: torch.optim.SGD, Adam,
    #: RMSprop), not decoupled from it (AdamW). Empty from listeners that do not tell.
    l2_knobs: list[str] = Field(default_factory=list)
    #: Knobs a schedule moves (an LR scheduler on the optimizer). The listener logs their values every
    #: few seconds, so a schedule's first seconds show as one point. Empty from listeners that do not tell.
    scheduled_knobs: list[str] = Field(default_factory=list)
    actions: list[str] = Field(default_factory=list)
    apply_mode: str
    pid: int
    host: str = ""
    started_at: float
    last_applied_seq: int = 0
    step: int | None = None


class DecisionRecord(_Message):
    """One line of ``atm/interventions.jsonl``: everything needed to review a decision later."""

    run_id: str
    seq: int
    step: int
    status: Status
    source: str
    diagnosis: Diagnosis
    changes: dict[str, Change] = Field(default_factory=dict)
    action: Action | None = None
    rationale: str = ""
    expected_outcome: str = ""
    watch_next: str = ""
    reason: str = ""
    dropped: dict[str, str] = Field(default_factory=dict)
    proposal: Proposal | None = None
    snapshot: TelemetrySnapshot | None = None
    decided_at: float = Field(default_factory=time.time)
    #: The job's own step count when it applied the change (the listener's ``step``; optimizer steps by default).
    applied_step: int | None = None
    #: The job's wall time when it applied the change.
    applied_at: float | None = None
    #: Where the change took effect on the run's own step axis (the one its metrics are logged on):
    #: the step of the first point the job logged after ``applied_at``. None until such a point is read.
    effective_step: int | None = None
    #: The values in force right after the job applied it, as its acknowledgement reports them (they
    #: differ from ``changes`` when the job moved them meanwhile, or a restore undid them).
    applied_values: dict[str, float] = Field(default_factory=dict)
    #: Proposer-specific audit detail: prompt, raw answers, validation errors, latency, tokens.
    audit: dict[str, Any] = Field(default_factory=dict)
    #: What the change did, once the policy's ``limits.settle`` evaluations after it were logged.
    effect: Outcome | None = None
    #: The earlier decision this one undoes (its change was measured ``hurt``).
    reverts: int | None = None
    #: For a stop: the problem it ends, when that is not convergence (see :attr:`Proposal.problem`).
    problem: Diagnosis | None = None
    #: For a decision held for approval: who approved or rejected it and how, or why it expired.
    approval: str = ""
    #: The daemon signs its records as it writes its log, so it only takes for its own what it wrote.
    signature: str | None = None
    key_id: str | None = None

    def to_update(self, *, run_id: str | None = None) -> Update:
        """The message for the job, unsigned: backends sign it as they publish it (:func:`atm.signing.sign`).

        ``run_id``: the job's own name for its run when it differs from the daemon's (W&B).
        """
        return Update(
            run_id=run_id or self.run_id,
            seq=self.seq,
            step=self.step,
            changes=self.changes,
            action=self.action,
            diagnosis=self.diagnosis,
            rationale=self.rationale,
            source=self.source,
            created_at=self.decided_at,
        )

    def summary(self) -> str:
        """One line for tags, logs and tables."""
        parts = [f"#{self.seq} @{self.step} {self.status.value} {self.label()}"]
        if self.changes:
            parts.append(", ".join(f"{k} {fmt(c.old)}->{fmt(c.new)}" for k, c in self.changes.items()))
        if self.action:
            parts.append(self.action.value)
        if self.effective_step is not None:
            parts.append(f"applied@{self.effective_step}")
        if self.effect is not None:
            parts.append(self.effect.label.value)
        return " ".join(parts)

    def label(self) -> str:
        """The diagnosis as tables show it: a stop names the problem it ends (``overfitting -> stop``),
        not "converged", unless the run reached its goal."""
        if self.problem is not None:
            return f"{self.problem.value} -> stop"
        return self.diagnosis.value

    def counts_from(self, now: int) -> int:
        """The step after which evaluations count towards this decision's cooldowns.

        A change counts from where it took effect, so evaluations the job logged before applying it
        (read late, or while the update waited for the next optimizer step) do not count. A change
        applied but not yet followed by any logged point has had no evaluation at all: ``now``.
        """
        if self.status != Status.APPLIED:
            return self.step
        return self.effective_step - 1 if self.effective_step is not None else now


def fmt(x: float) -> str:
    """Compact number formatting for tables and tags (3 significant digits)."""
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.3g}"
    return f"{x:.4g}"
