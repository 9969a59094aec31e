"""The ``llm`` proposer: a typed, policy-bounded answer from a language model.

The response model is built per decision from the offer: the model can only name offered
moves (``lr down to 0.0005``), offered actions and a diagnosis that fits the run. Its
validator re-checks the answer against the policy (through instructor's validation context),
so an out-of-policy answer is re-asked with the reason; after the retries the daemon's own
:func:`atm.policies.check` still has the last word.

Prompting variants (measured on the scenario suite by ``benchmarks/decision_quality.py``):

- ``plain``: the snapshot tables only; one schema for every diagnosis.
- ``evidence``: plus the rules proposer's diagnosis and evidence, marked as a heuristic.
- ``two-stage``: a free-text reasoning call, then a formatting call that sees the reasoning.
- ``few-shot``: worked examples (prompt and ideal answer) before the snapshot.
- ``coherent``: the schema branches on the diagnosis, and each branch offers only the moves
  that address it (:data:`REMEDY_DIRECTIONS`: no lowering dropout for overfitting, no stop
  on a healthy run). ``coherent+evidence`` adds the rules' evidence.
- ``anchored``: the rules' detectors fix the diagnosis; the model chooses among the moves
  and actions that address it and explains the choice. When nothing may be done (healthy,
  too early, nothing offered) the model is not called.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from atm.policies import DecisionContext, Policy, check, load_policy
from atm.schema import Action, Diagnosis, Proposal, TelemetrySnapshot
from atm.watcher.prompt import Move, diagnoses_for, offered_moves, render_snapshot, system_prompt
from atm.watcher.snapshot import is_rl
from atm.watcher.proposer import Offer, ProposalResult, ProposerError
from atm.watcher.rules import Thresholds, diagnose_for_offer

#: Longest free-text fields the model may write. Short: every character costs decoding time.
MAX_RATIONALE = 120
MAX_EXPECTED = 80
MAX_WATCH = 40

REASON_PROMPT = (
    "In two or three short sentences: what is happening to this run, and which allowed move "
    "(or none) addresses it? Do not write JSON yet."
)
FORMAT_PROMPT = "Now give your decision as one JSON object."

Direction = Literal["up", "down", "any"]

#: Which moves address which diagnosis (``coherent`` variants); nothing moves for ``healthy``,
#: ``insufficient_data`` or ``converged``. A parameter no entry names (a custom knob) is not offered
#: in coherent mode, as the rules never move one either: use the ``plain`` variant for such policies.
#: Keys ending in ``.`` match every parameter with that prefix; ``loss_weight.*`` directions come
#: from the loss components (:func:`loss_weight_directions`).
REMEDY_DIRECTIONS: dict[Diagnosis, dict[str, Direction]] = {
    Diagnosis.OVERFITTING: {"dropout": "up", "weight_decay": "up", "lr": "down"},
    Diagnosis.DIVERGENCE: {"lr": "down", "clip_range": "down", "target_kl": "down"},
    Diagnosis.PLATEAU: {"lr": "down"},
    Diagnosis.OVER_REGULARIZATION: {"dropout": "down", "weight_decay": "down"},
    Diagnosis.LOSS_IMBALANCE: {"loss_weight.": "any"},
    Diagnosis.EXPLORATION_COLLAPSE: {"ent_coef": "up", "clip_range": "up"},
    Diagnosis.UNSAFE_EXPLORATION: {
        "reward.collision_penalty": "up",
        "lr": "down",
        "ent_coef": "down",
        "clip_range": "down",
        "target_kl": "down",
        "n_epochs": "down",
    },
}
#: A stalled RL run needs bolder updates, not smaller ones.
RL_PLATEAU_DIRECTIONS: dict[str, Direction] = {
    "lr": "up",
    "n_epochs": "up",
    "clip_range": "up",
    "target_kl": "up",
    "ent_coef": "up",
}
REMEDY_ACTIONS: dict[Diagnosis, tuple[Action, ...]] = {
    Diagnosis.OVERFITTING: (Action.ROLLBACK,),
    Diagnosis.DIVERGENCE: (Action.ROLLBACK,),
    Diagnosis.UNSAFE_EXPLORATION: (Action.ROLLBACK,),
    Diagnosis.CONVERGED: (Action.STOP,),
}
_QUIET = (Diagnosis.HEALTHY, Diagnosis.INSUFFICIENT_DATA, Diagnosis.CONVERGED)


@dataclass(frozen=True)
class Variant:
    """How the model is prompted and constrained."""

    name: str
    evidence: bool = False
    two_stage: bool = False
    few_shot: int = 0
    coherent: bool = False
    anchored: bool = False


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("plain"),
        Variant("evidence", evidence=True),
        Variant("two-stage", two_stage=True),
        Variant("few-shot", few_shot=3),
        Variant("coherent", coherent=True),
        Variant("coherent+evidence", coherent=True, evidence=True),
        Variant("anchored", coherent=True, evidence=True, anchored=True),
    )
}
DEFAULT_VARIANT = "anchored"


# --------------------------------------------------------------------------- response model


class _Branch(BaseModel):
    """One diagnosis family and the moves and actions it may take."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("moves", mode="before", check_fields=False)
    @classmethod
    def _dedupe(cls, v: Any) -> Any:
        # Small models repeat themselves ("lr down to 0.5", "lr down to 0.5" or "lr down to 0.25"):
        # the first move named for a parameter counts, like check() keeps the first max_changes.
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            seen: set[str] = set()
            out = []
            for label in v:
                param = label.split(" ", 1)[0]
                if param not in seen:
                    seen.add(param)
                    out.append(label)
            return out
        return v


class _Answer(BaseModel):
    """The root: a decision branch, then the free text. Checks the whole answer against the policy."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _within_policy(self, info: ValidationInfo) -> _Answer:
        ctx = info.context or {}
        policy: Policy | None = ctx.get("policy")
        decision: DecisionContext | None = ctx.get("ctx")
        if policy is not None and decision is not None:
            proposal = to_proposal(self)
            if not proposal.is_noop:
                verdict = check(proposal, policy, decision)
                if verdict.dropped:
                    why = "; ".join(f"{k}: {v}" for k, v in verdict.dropped.items())
                    raise ValueError(
                        f"not allowed by the policy: {why}. Choose only from the allowed moves and actions"
                    )
        return self


def remedy_moves(diagnosis: Diagnosis, moves: Sequence[Move], snapshot: TelemetrySnapshot) -> list[Move]:
    """The offered moves that address ``diagnosis`` (see :data:`REMEDY_DIRECTIONS`)."""
    if diagnosis in _QUIET:
        return []
    if is_rl(snapshot) and diagnosis == Diagnosis.PLATEAU:
        table = RL_PLATEAU_DIRECTIONS
    elif diagnosis == Diagnosis.LOSS_IMBALANCE:
        table = loss_weight_directions(snapshot)
    else:
        table = REMEDY_DIRECTIONS.get(diagnosis, {})
    out = []
    for m in moves:
        want = _direction(table, m.param)
        if want == "any" or want == m.direction:
            out.append(m)
    return out


def loss_weight_directions(snapshot: TelemetrySnapshot) -> dict[str, Direction]:
    """For loss imbalance: lower the weight of the dominant loss component, raise the vanishing one's.

    ``loss_weight.aux`` belongs to a component whose key ends in ``aux`` (``loss/aux``,
    ``train/loss_aux``). Weights of components in between, or of none, may move either way.
    """
    comps = {
        st.key.rsplit("/", 1)[-1].removeprefix("loss_"): abs(st.ema)
        for role, st in snapshot.series.items()
        if role.startswith("loss_components[")
    }
    out: dict[str, Direction] = {"loss_weight.": "any"}
    if len(comps) >= 2:
        big, small = max(comps, key=comps.__getitem__), min(comps, key=comps.__getitem__)
        out[f"loss_weight.{big}"] = "down"
        out[f"loss_weight.{small}"] = "up"
    return out


def _direction(table: dict[str, Direction], param: str) -> Direction | None:
    if param in table:
        return table[param]
    return next((d for key, d in table.items() if key.endswith(".") and param.startswith(key)), None)


def response_model(
    snapshot: TelemetrySnapshot,
    policy: Policy,
    offer: Offer,
    *,
    coherent: bool = False,
    only: Diagnosis | None = None,
) -> type[BaseModel]:
    """A pydantic model accepting only this decision's offered moves and actions, and fitting diagnoses.

    The answer is ``{"decision": {"diagnosis", "moves", "action"}, "rationale", "expected_outcome",
    "watch_next"}``. ``moves`` are labels of offered moves (at most ``limits.max_changes``);
    ``action`` is ``none`` or an offered action; either is left out when it has no choice, which
    keeps the schema and the tokens to generate small. With ``coherent``, ``decision`` is a union
    with one branch per group of diagnoses sharing the same remedies; ``only`` fixes the diagnosis.
    """
    moves = offered_moves(offer, snapshot.params)
    diagnoses = [only] if only is not None else diagnoses_for(snapshot)
    groups: list[tuple[list[Diagnosis], list[Move], list[Action]]] = []
    if coherent:
        for d in diagnoses:
            mv = remedy_moves(d, moves, snapshot)
            acts = [a for a in offer.actions if a in REMEDY_ACTIONS.get(d, ())]
            for g in groups:
                if g[1] == mv and g[2] == acts:
                    g[0].append(d)
                    break
            else:
                groups.append(([d], mv, acts))
    else:
        groups.append((list(diagnoses), list(moves), list(offer.actions)))
    # In coherent mode a problem diagnosis comes with at least one move (a small model otherwise
    # names the problem and then does nothing); "healthy" is how the model declines to act.
    branches = [
        _branch(i, ds, mv, acts, policy.limits.max_changes, min_moves=1 if coherent and mv else 0)
        for i, (ds, mv, acts) in enumerate(groups)
    ]
    # A union built at run time: the ``X | Y`` syntax needs the members written out.
    decision_type: Any = branches[0] if len(branches) == 1 else Union[tuple(branches)]  # noqa: UP007
    model = create_model(
        "Decision",
        __base__=_Answer,
        decision=(decision_type, ...),
        rationale=(str, Field(..., max_length=MAX_RATIONALE)),
        expected_outcome=(str, Field(..., max_length=MAX_EXPECTED)),
        watch_next=(str, Field(..., max_length=MAX_WATCH)),
    )
    model.__moves__ = {m.label: m for m in moves}  # type: ignore[attr-defined]
    return model


def _branch(
    i: int,
    diagnoses: list[Diagnosis],
    moves: list[Move],
    actions: list[Action],
    max_changes: int,
    min_moves: int,
) -> type[BaseModel]:
    fields: dict[str, Any] = {"diagnosis": (Literal[tuple(d.value for d in diagnoses)], ...)}  # type: ignore[misc]
    if moves:
        labels = Literal[tuple(m.label for m in moves)]  # type: ignore[misc]
        size = Field(..., min_length=min_moves, max_length=max_changes)
        fields["moves"] = (list[labels], size)  # type: ignore[valid-type]
    if actions:
        fields["action"] = (Literal[("none",) + tuple(a.value for a in actions)], ...)  # type: ignore[misc]
    name = (
        "".join(w.capitalize() for w in diagnoses[0].value.split("_")) if len(diagnoses) == 1 else f"Group{i}"
    )
    return create_model(name, __base__=_Branch, **fields)


def _has_choice(model: type[BaseModel]) -> bool:
    """Whether an answer of this model can propose anything (a move or an action besides none)."""
    branch = model.model_fields["decision"].annotation
    return any(
        ("moves" in b.model_fields or "action" in b.model_fields)
        for b in getattr(branch, "__args__", (branch,))
    )


def answer_moves(answer: BaseModel) -> list[Move]:
    table: dict[str, Move] = getattr(answer, "__moves__", {})
    labels = getattr(answer.decision, "moves", [])  # type: ignore[attr-defined]
    return [table[label] for label in labels if label in table]


def to_proposal(answer: BaseModel) -> Proposal:
    """The :class:`Proposal` an answer stands for: labels mapped back to exact offered values."""
    decision = answer.decision  # type: ignore[attr-defined]
    action = getattr(decision, "action", "none")
    return Proposal(
        diagnosis=Diagnosis(decision.diagnosis),
        changes={m.param: m.value for m in answer_moves(answer)},
        action=None if action == "none" else Action(action),
        rationale=answer.rationale,  # type: ignore[attr-defined]
        expected_outcome=answer.expected_outcome,  # type: ignore[attr-defined]
        watch_next=answer.watch_next,  # type: ignore[attr-defined]
    )


# --------------------------------------------------------------------------- worked examples


@dataclass(frozen=True)
class Example:
    """A worked example for few-shot prompting: the prompt inputs and the ideal answer."""

    name: str
    snapshot: TelemetrySnapshot
    policy: Policy
    offer: Offer
    answer: dict[str, Any]


def make_example(
    name: str,
    policy: Policy,
    history: dict[str, list[tuple[int, float]]],
    params: dict[str, float],
    diagnosis: Diagnosis,
    changes: dict[str, float],
    action: Action | None,
    rationale: str,
) -> Example:
    """An example from metric history and the ideal decision (checked against the offer)."""
    from atm.watcher.evaluate import offline_situation

    sit = offline_situation(name, policy, history, params, run_name=name)
    snap, offer = sit.snapshot, sit.offer
    labels = {(m.param, m.value): m.label for m in offered_moves(offer, params)}
    missing = [p for p, v in changes.items() if (p, v) not in labels]
    if missing or (action is not None and action not in offer.actions):
        raise ValueError(f"example {name!r}: {missing or action} is not in its own offer")
    decision: dict[str, Any] = {
        "diagnosis": diagnosis.value,
        "moves": [labels[(p, v)] for p, v in changes.items()],
    }
    if offer.actions:
        decision["action"] = action.value if action else "none"
    answer = {
        "decision": decision,
        "rationale": rationale,
        "expected_outcome": _EXPECTED.get(diagnosis, "no change needed"),
        "watch_next": _WATCH.get(diagnosis, "the primary metric"),
    }
    return Example(name=name, snapshot=snap, policy=policy, offer=offer, answer=answer)


_EXPECTED = {
    Diagnosis.OVERFITTING: "val loss stops rising; the gap narrows",
    Diagnosis.UNSAFE_EXPLORATION: "collision rate falls",
}
_WATCH = {Diagnosis.OVERFITTING: "val_loss and the gap", Diagnosis.UNSAFE_EXPLORATION: "collision rate"}


def _curve(steps: Iterable[int], f: Any) -> list[tuple[int, float]]:
    return [(s, round(f(s), 4)) for s in steps]


def bundled_examples() -> list[Example]:
    """Three worked examples shipped with atm (overfitting, healthy, unsafe exploration).

    They are written for the prompt, not taken from the evaluation suite, so scoring the
    ``few-shot`` variant on the suite never shows the model its own test cases.
    """
    lm, rl = load_policy("lm"), load_policy("rl-ppo")
    overfit = make_example(
        "example-overfitting",
        lm,
        {
            "train_loss": _curve(range(0, 601, 20), lambda s: 0.3 + 2.7 * math.exp(-s / 150)),
            "val_loss": _curve(
                range(60, 601, 60), lambda s: 1.6 + 1.5 * math.exp(-s / 100) + max(0.0, s - 300) * 0.0012
            ),
        },
        {"lr": 0.002, "weight_decay": 0.0, "dropout": 0.0},
        Diagnosis.OVERFITTING,
        {"dropout": 0.1},
        Action.ROLLBACK,
        "val loss rose 20% from its best while train loss kept falling",
    )
    healthy = make_example(
        "example-healthy",
        lm,
        {
            "train_loss": _curve(range(0, 601, 20), lambda s: 1.0 + 2.0 * math.exp(-s / 400)),
            "val_loss": _curve(range(60, 601, 60), lambda s: 1.1 + 2.0 * math.exp(-s / 400)),
        },
        {"lr": 0.001, "weight_decay": 0.01, "dropout": 0.1},
        Diagnosis.HEALTHY,
        {},
        None,
        "both losses still fall and the gap is small",
    )
    unsafe = make_example(
        "example-unsafe",
        rl,
        {
            "eval/safe_success": _curve(range(10240, 102401, 10240), lambda s: 0.1),
            "eval/collision_rate": _curve(range(10240, 102401, 10240), lambda s: 0.5 + s * 1e-6),
            "train/entropy": _curve(range(2048, 102401, 4096), lambda s: 3.0),
        },
        {
            "lr": 0.001,
            "ent_coef": 0.05,
            "clip_range": 0.3,
            "n_epochs": 8,
            "target_kl": 0.1,
            "reward.collision_penalty": 2.5,
            "reward.success_bonus": 10,
            "reward.progress_scale": 5,
        },
        Diagnosis.UNSAFE_EXPLORATION,
        {"reward.collision_penalty": 5.0},
        None,
        "over half of the episodes end in a collision",
    )
    return [overfit, healthy, unsafe]


# --------------------------------------------------------------------------- the proposer


class LLMProposer:
    """Asks a language model for a proposal. See the module docstring for the variants.

    The client (and with it the model file) is created on first use, so building a proposer is cheap.
    Thread-safe when its client is (the in-process model serialises calls).
    """

    name = "llm"

    def __init__(
        self,
        client: Any = None,
        *,
        config: Any = None,
        variant: str | Variant = DEFAULT_VARIANT,
        examples: Sequence[Example] | None = None,
    ):
        if isinstance(variant, str):
            if variant not in VARIANTS:
                raise ValueError(f"unknown LLM variant {variant!r}: choose one of {', '.join(VARIANTS)}")
            variant = VARIANTS[variant]
        self.variant = variant
        #: Names the proposer and its variant in reports (``llm[anchored]``).
        self.label = f"llm[{variant.name}]"
        self._client = client
        self._config = config
        if examples is None:
            examples = bundled_examples() if variant.few_shot else []
        self.examples = list(examples)[: variant.few_shot]

    @classmethod
    def from_settings(
        cls,
        model: str | None = None,
        base_url: str | None = None,
        *,
        policy: Policy | None = None,
        variant: str | Variant = DEFAULT_VARIANT,
        examples: Sequence[Example] | None = None,
        **overrides: Any,
    ) -> LLMProposer:
        """A proposer configured from flags, ``ATM_LLM*`` variables and the policy's ``llm:`` section.

        Raises:
            LLMConfigError: a setting cannot be used (the message names it).
        """
        from atm.adapters.llm import LLMConfig

        config = LLMConfig.resolve(model, base_url, policy_llm=policy.llm if policy else None, **overrides)
        return cls(config=config, variant=variant, examples=examples)

    @property
    def client(self) -> Any:
        if self._client is None:
            from atm.adapters.llm import LLMClient, LLMConfig

            self._client = LLMClient.from_config(self._config or LLMConfig.resolve())
        return self._client

    def messages(self, snapshot: TelemetrySnapshot, policy: Policy, offer: Offer) -> list[dict[str, str]]:
        """The chat messages for one decision (deterministic)."""
        msgs = [{"role": "system", "content": system_prompt()}]
        for ex in self.examples:
            msgs.append(
                {
                    "role": "user",
                    "content": render_snapshot(
                        ex.snapshot, ex.policy, ex.offer, evidence=self._evidence(ex.snapshot, ex.policy, ex.offer)
                    ),
                }
            )
            msgs.append({"role": "assistant", "content": json.dumps(ex.answer)})
        msgs.append(
            {
                "role": "user",
                "content": render_snapshot(
                    snapshot, policy, offer, evidence=self._evidence(snapshot, policy, offer)
                ),
            }
        )
        return msgs

    def _evidence(self, snapshot: TelemetrySnapshot, policy: Policy, offer: Offer) -> tuple[Diagnosis, str] | None:
        return diagnose_for_offer(snapshot, Thresholds.from_policy(policy), offer) if self.variant.evidence else None

    def propose(
        self, snapshot: TelemetrySnapshot, policy: Policy, ctx: DecisionContext, offer: Offer
    ) -> ProposalResult:
        from atm.adapters.llm import LLMError

        msgs = self.messages(snapshot, policy, offer)
        evidence = self._evidence(snapshot, policy, offer)
        only = evidence[0] if (self.variant.anchored and evidence is not None) else None
        model = response_model(snapshot, policy, offer, coherent=self.variant.coherent, only=only)
        audit: dict[str, Any] = {"variant": self.variant.name, "prompt": msgs[-1]["content"]}
        if evidence is not None:
            audit["evidence"] = {"diagnosis": evidence[0].value, "text": evidence[1]}
        if only is not None and evidence is not None and not _has_choice(model):
            # The only valid answer is "no change": asking the model would cost seconds and say nothing.
            audit["skipped"] = "nothing to choose: no move or action addresses this diagnosis now"
            audit["latency_s"] = 0.0
            proposal = Proposal(diagnosis=only, rationale=evidence[1])
            return ProposalResult(proposal=proposal, source=self.name, audit=audit)
        t0 = time.perf_counter()
        try:
            client = self.client
            audit["model"] = client.name
            if self.variant.two_stage:
                ask = msgs + [{"role": "user", "content": REASON_PROMPT}]
                reasoning = client.chat(ask, max_tokens=96)
                audit["reasoning"] = reasoning.transcript
                msgs = ask + [
                    {"role": "assistant", "content": str(reasoning.value).strip()},
                    {"role": "user", "content": FORMAT_PROMPT},
                ]
            answer = client.ask(msgs, model, context={"policy": policy, "offer": offer, "ctx": ctx})
        except LLMError as exc:
            audit.update(exc.audit)
            audit.update(latency_s=round(time.perf_counter() - t0, 3), error=str(exc))
            raise ProposerError(f"LLM proposer failed: {exc}", audit) from exc
        audit.update(answer.transcript)
        audit["latency_s"] = round(time.perf_counter() - t0, 3)
        if "reasoning" in audit:
            for key in ("prompt_tokens", "completion_tokens"):
                a, b = audit.get(key), audit["reasoning"].get(key)
                audit[key] = None if a is None or b is None else a + b
        proposal = to_proposal(answer.value)
        if only is not None and evidence is not None:
            # Anchored: the diagnosis, and so the reason, is the measured evidence; the model chose the
            # moves. Its own words (a small model's are often generic) follow, and stay in the audit.
            said = proposal.rationale.strip()
            # Fragments ("{", ".348967,") and loops ("1.108 is 1.108 is ...") are what a small model leaves
            # when it runs out of tokens or repeats itself: no words of its own, no reason.
            worded = len({w.lower() for w in re.findall(r"[A-Za-z]{3,}", said)}) >= 3
            proposal = proposal.model_copy(update={"rationale": evidence[1] + (f" (model: {said})" if worded else "")})
        return ProposalResult(proposal=proposal, source=self.name, audit=audit)


__all__ = [
    "DEFAULT_VARIANT",
    "REMEDY_DIRECTIONS",
    "VARIANTS",
    "Example",
    "LLMProposer",
    "Variant",
    "bundled_examples",
    "make_example",
    "remedy_moves",
    "response_model",
    "to_proposal",
]
