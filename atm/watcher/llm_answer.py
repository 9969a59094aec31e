"""The typed answer the LLM must give: a pydantic model built per decision from the offer.

The model can only name offered moves (``lr down to 0.0005``), offered actions and a diagnosis
that fits the run. Its validator re-checks the answer against the policy (through instructor's
validation context), so an out-of-policy answer is re-asked with the reason; after the retries the
daemon's own :func:`atm.policies.check` still has the last word.
"""

from __future__ import annotations

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

from atm.policies import DecisionContext, Policy, check
from atm.schema import Action, Diagnosis, Proposal, TelemetrySnapshot
from atm.watcher.llm_variants import REMEDY_ACTIONS, remedy_moves
from atm.watcher.prompt import Move, diagnoses_for, offered_moves
from atm.watcher.proposer import Offer

#: Longest free-text fields the model may write. Short: every character costs decoding time.
MAX_RATIONALE = 120
MAX_EXPECTED = 80
MAX_WATCH = 40
#: The brief answer's one free-text field (about 10 tokens).
MAX_WHY = 40


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


class _Checked(BaseModel):
    """Checks the whole answer against the policy in the validation context."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _within_policy(self, info: ValidationInfo) -> _Checked:
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


class _Answer(_Checked):
    """The root: a decision branch, then the free text."""


class _Brief(_Branch, _Checked):
    """The brief answer, flat: ``{"moves", "action", "why"}``; the diagnosis is the measured one."""


def brief_model(
    snapshot: TelemetrySnapshot,
    offer: Offer,
    diagnosis: Diagnosis,
    allowed: list[Move],
    actions: list[Action],
    *,
    max_changes: int,
    min_moves: int,
) -> type[BaseModel]:
    """The brief variant's answer: moves among ``allowed`` (``min_moves`` to ``max_changes``), an action
    among ``actions`` or none, and a few words why. A field with nothing to choose is left out, which
    keeps the tokens to generate few (a forced token costs as much as a free one).
    """
    fields: dict[str, Any] = {}
    if allowed:
        labels = Literal[tuple(m.label for m in allowed)]  # type: ignore[misc]
        fields["moves"] = (list[labels], Field(..., min_length=min_moves, max_length=max_changes))  # type: ignore[valid-type]
    if actions:
        fields["action"] = (Literal[("none",) + tuple(a.value for a in actions)], ...)  # type: ignore[misc]
    fields["why"] = (str, Field(..., max_length=MAX_WHY))
    model = create_model("Remedy", __base__=_Brief, **fields)
    model.__moves__ = {m.label: m for m in offered_moves(offer, snapshot.params)}  # type: ignore[attr-defined]
    model.__diagnosis__ = diagnosis  # type: ignore[attr-defined]
    return model


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
            mv = remedy_moves(d, moves, snapshot, policy)
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


def has_choice(model: type[BaseModel]) -> bool:
    """Whether an answer of this model can propose anything (a move or an action besides none)."""
    if "decision" not in model.model_fields:  # a brief answer
        return "moves" in model.model_fields or "action" in model.model_fields
    branch = model.model_fields["decision"].annotation
    return any(
        ("moves" in b.model_fields or "action" in b.model_fields)
        for b in getattr(branch, "__args__", (branch,))
    )


def answer_moves(answer: BaseModel) -> list[Move]:
    table: dict[str, Move] = getattr(answer, "__moves__", {})
    labels = getattr(getattr(answer, "decision", answer), "moves", [])
    return [table[label] for label in labels if label in table]


def to_proposal(answer: BaseModel) -> Proposal:
    """The :class:`Proposal` an answer stands for: labels mapped back to exact offered values."""
    if isinstance(answer, _Brief):
        action = getattr(answer, "action", "none")
        return Proposal(
            diagnosis=type(answer).__diagnosis__,  # type: ignore[attr-defined]
            changes={m.param: m.value for m in answer_moves(answer)},
            action=None if action == "none" else Action(action),
            rationale=answer.why,  # type: ignore[attr-defined]
        )
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
