"""The policy file format: what the manager may change, by how much, and how often."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from atm.schema import Action


class _Strict(BaseModel):
    # Unknown keys are typos more often than not: refuse them with the field named.
    model_config = ConfigDict(extra="forbid")


class Window(_Strict):
    """A span of training, counted in logged steps or in evaluations (points of ``eval_metric``).

    Evaluations make presets independent of how a script numbers its steps; steps are exact.
    When both are set, both must have passed.
    """

    steps: int = Field(0, ge=0)
    evals: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping_of_evals_or_steps(cls, v: Any) -> Any:
        # pydantic would say "Input should be a valid dictionary or instance of Window": name the forms.
        forms = "a window is written {evals: N}, {steps: N}, or both ({evals: 2, steps: 20000})"
        if isinstance(v, dict):
            unknown = [k for k in v if k not in ("evals", "steps")]
            if unknown:
                raise ValueError(f"{forms}; {', '.join(map(str, unknown))} is not a unit it counts")
        elif not isinstance(v, Window):
            raise ValueError(f"{forms}; got {v!r}")
        return v

    def describe(self) -> str:
        """The window in words, as messages say it: "20000 steps and 2 evaluations", "1 evaluation"."""
        parts = []
        if self.steps:
            parts.append(f"{self.steps} step{'s' if self.steps != 1 else ''}")
        if self.evals:
            parts.append(f"{self.evals} evaluation{'s' if self.evals != 1 else ''}")
        return " and ".join(parts) or "nothing"


class ParamRule(_Strict):
    """Bounds and pace for one controllable parameter."""

    description: str = ""
    min: float
    max: float
    #: New value = current x one of these, clamped to [min, max].
    multipliers: list[float] = Field(default_factory=list)
    #: New value = one of these (how a parameter sitting at 0 is raised).
    values: list[float] = Field(default_factory=list)
    #: Largest |new - old| / |old| allowed in one intervention (ignored when old is 0).
    max_relative_change: float | None = Field(None, gt=0)
    #: Minimum distance between two changes of this parameter.
    cooldown: Window = Field(default_factory=Window)
    #: At most ``budget`` changes of this parameter within any ``budget_window``.
    budget: int | None = Field(None, ge=0)
    budget_window: Window | None = None
    #: Values are whole numbers (epochs per update, ...).
    integer: bool = False
    #: Parameters of one group move together: a remedy that moves the group (``lr`` for an
    #: ``actor_lr`` and a ``critic_lr``) moves every member by the same factor, each within its own
    #: bounds, and counts as one change.
    group: str | None = None

    @field_validator("multipliers")
    @classmethod
    def _positive_multipliers(cls, v: list[float]) -> list[float]:
        bad = [m for m in v if not (math.isfinite(m) and m > 0)]
        if bad:
            raise ValueError(f"multipliers must be positive numbers, got {bad}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ParamRule":
        if not (math.isfinite(self.min) and math.isfinite(self.max)) or self.min > self.max:
            raise ValueError(f"min ({self.min}) must be a number no greater than max ({self.max})")
        if not self.multipliers and not self.values:
            raise ValueError("give `multipliers` or `values` (or both): the allowed moves for this parameter")
        out = [v for v in self.values if not self.min <= v <= self.max]
        if out:
            raise ValueError(f"values {out} lie outside [min, max] = [{self.min}, {self.max}]")
        if self.budget is not None and self.budget_window is None:
            raise ValueError("`budget` needs a `budget_window` (for example {evals: 10})")
        return self


class ActionRule(_Strict):
    description: str = ""
    cooldown: Window = Field(default_factory=Window)
    #: Not before this far into training.
    not_before: Window = Field(default_factory=Window)


class Limits(_Strict):
    """Limits on the manager as a whole."""

    #: Most parameters changed by one intervention.
    max_changes: int = Field(2, ge=1)
    #: No intervention before this far into training.
    warmup: Window = Field(default_factory=Window)
    #: Minimum distance between any two interventions.
    cooldown: Window = Field(default_factory=Window)
    #: A decision made while the run moved further than this is stale: discarded unless the run
    #: still shows the problem it answers.
    stale_after: Window = Field(default_factory=lambda: Window(evals=2))
    #: Most interventions in a run.
    max_interventions: int | None = Field(None, ge=0)
    #: The metric role whose logged points count as evaluations (``Window.evals``).
    eval_metric: str = "val_loss"
    #: A RUNNING run with no new metric for this long is treated as dead (killed jobs stay RUNNING).
    idle_minutes: float = Field(30.0, gt=0)
    #: How long an applied change is watched before its effect is judged (helped, neutral, hurt);
    #: until then another remedy for the same problem waits (divergence excepted: speed wins there).
    settle: Window = Field(default_factory=lambda: Window(evals=3))
    #: ``required``: an accepted decision is held until a person approves it (a run tag in the
    #: tracker's UI, or ``atm approve``); ``none``: it goes to the job at once.
    approval: Literal["required", "none"] = "none"
    #: How long a decision held for approval stays fresh: past this much training since the
    #: evaluation it was decided on, it expires unapproved (the run it answered has moved on).
    approval_window: Window = Field(default_factory=lambda: Window(evals=5))


class LLMSettings(_Strict):
    """Defaults for ``--proposer llm``; command-line flags and ``ATM_LLM*`` variables override them."""

    model: str | None = None
    base_url: str | None = None
    timeout_s: float | None = Field(None, gt=0)
    max_retries: int | None = Field(None, ge=0)


#: The metric roles atm reads, with what each means. A policy maps them to a run's metric names.
ROLES: dict[str, str] = {
    "train_loss": "training loss",
    "val_loss": "validation loss",
    "grad_norm": "gradient norm",
    "lr": "learning rate in force (the job's own lr metric, or the listener's atm/lr)",
    "loss_components": "parts of the loss (a pattern such as loss/*)",
    "return": "RL episode return",
    "success": "RL success rate (0-1)",
    "safe_success": "RL success without collision (0-1)",
    "collision": "RL collision rate (0-1)",
    "episode_length": "RL episode length",
    "entropy": "policy entropy",
    "entropy_loss": "entropy loss (minus the entropy, as SB3 logs it)",
    "action_std": "std of a Gaussian policy's actions",
    "approx_kl": "approximate KL of a PPO update",
    "clip_fraction": "share of clipped PPO ratios",
    "explained_variance": "value function's explained variance",
    "value_loss": "value function loss",
}


#: Roles that describe the run's settings, not its progress: read beside the others, never alone.
AUX_ROLES = frozenset({"lr"})


class Policy(_Strict):
    """A whole policy file. See ``atm policy schema`` for the JSON Schema."""

    name: str
    #: The policy this one changes: a preset name (``rl-ppo``) or a policy file's path, relative to
    #: this file. Only what differs is given; the loader merges it over the base.
    extends: str | None = None
    description: str = ""
    #: Role -> metric keys to look for, first match wins (``train_loss: [train_loss, train/loss]``).
    #: A key ending in ``*`` matches every metric with that prefix (``loss/*`` for loss components).
    metrics: dict[str, list[str]] = Field(default_factory=dict)
    params: dict[str, ParamRule] = Field(default_factory=dict)
    actions: dict[Action, ActionRule] = Field(default_factory=dict)
    #: Parameters the manager must never touch, even if ``params`` lists them.
    frozen: list[str] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    #: Thresholds for the rules proposer (see ``atm.watcher.rules.Thresholds``).
    thresholds: dict[str, float] = Field(default_factory=dict)
    llm: LLMSettings = Field(default_factory=LLMSettings)

    @field_validator("metrics", mode="before")
    @classmethod
    def _one_key_is_a_list(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {role: [keys] if isinstance(keys, str) else keys for role, keys in v.items()}
        return v

    @field_validator("metrics")
    @classmethod
    def _known_roles(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = [r for r in v if r not in ROLES]
        if unknown:
            raise ValueError(f"unknown metric roles {unknown}; the roles atm reads are {', '.join(ROLES)}")
        return v

    @field_validator("limits")
    @classmethod
    def _eval_metric_is_mapped(cls, v: Limits, info: ValidationInfo) -> Limits:
        metrics = info.data.get("metrics")
        if metrics and v.eval_metric not in metrics:
            raise ValueError(
                f"eval_metric {v.eval_metric!r} is not one of this policy's metric roles ({', '.join(metrics)}); "
                "evaluations are counted in points of that role's metric"
            )
        return v

    # A field validator (not a model validator) so the error points at the `frozen:` line;
    # `params` is declared earlier and so already validated (absent if it failed).
    @field_validator("frozen")
    @classmethod
    def _frozen_known(cls, v: list[str], info: ValidationInfo) -> list[str]:
        params = info.data.get("params")
        if params is not None:
            unknown = [p for p in v if p not in params]
            if unknown:
                raise ValueError(f"frozen names {unknown} are not in `params` ({sorted(params)})")
        return v

    def controllable(self) -> list[str]:
        return [p for p in self.params if p not in self.frozen]
