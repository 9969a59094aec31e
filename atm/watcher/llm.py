"""The ``llm`` proposer: a typed, policy-bounded answer from a language model.

The response model is built per decision from the offer: the model can only name offered
moves (``lr down to 0.0005``), offered actions and a diagnosis that fits the run. Its
validator re-checks the answer against the policy (through instructor's validation context),
so an out-of-policy answer is re-asked with the reason; after the retries the daemon's own
:func:`atm.policies.check` still has the last word.

Variants (measured on the scenario suite, see ``benchmarks/decision_quality.py``):

- ``plain``: the snapshot tables only.
- ``evidence``: plus the rules proposer's diagnosis and evidence, marked as a heuristic.
- ``two-stage``: a free-text reasoning call, then a formatting call that sees the reasoning.
- ``few-shot``: worked examples (prompt and ideal answer) before the snapshot.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, model_validator

from atm.policies import DecisionContext, Policy, check
from atm.schema import Action, Diagnosis, Proposal, TelemetrySnapshot
from atm.watcher.prompt import Move, diagnoses_for, offered_moves, render_snapshot, system_prompt
from atm.watcher.proposer import Offer, ProposalResult, ProposerError
from atm.watcher.rules import RulesProposer, Thresholds, diagnose

#: Longest free-text fields the model may write. Short: every character costs decoding time.
MAX_RATIONALE = 160
MAX_EXPECTED = 100
MAX_WATCH = 60

REASON_PROMPT = (
    "In two or three short sentences: what is happening to this run, and which allowed move "
    "(or none) addresses it? Do not write JSON yet."
)
FORMAT_PROMPT = "Now give your decision as one JSON object with the fields of the schema."


@dataclass(frozen=True)
class Variant:
    """How the model is prompted."""

    name: str
    evidence: bool = False
    two_stage: bool = False
    few_shot: int = 0


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("plain"),
        Variant("evidence", evidence=True),
        Variant("two-stage", two_stage=True),
        Variant("few-shot", few_shot=3),
        Variant("evidence+few-shot", evidence=True, few_shot=3),
    )
}
DEFAULT_VARIANT = "evidence"


class _AnswerBase(BaseModel):
    """Fields and policy checks shared by every per-decision response model."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _within_policy(self, info: ValidationInfo) -> "_AnswerBase":
        ctx = info.context or {}
        moves: dict[str, Move] = {m.label: m for m in getattr(self, "__moves__", ())}
        chosen = list(getattr(self, "moves", []))
        params = [moves[label].param for label in chosen if label in moves]
        dupes = sorted({p for p in params if params.count(p) > 1})
        if dupes:
            raise ValueError(f"choose at most one move per parameter; {', '.join(dupes)} appears more than once")
        policy: Policy | None = ctx.get("policy")
        decision: DecisionContext | None = ctx.get("ctx")
        if policy is not None and decision is not None:
            proposal = to_proposal(self)
            if not proposal.is_noop:
                verdict = check(proposal, policy, decision)
                if verdict.dropped:
                    why = "; ".join(f"{k}: {v}" for k, v in verdict.dropped.items())
                    raise ValueError(f"not allowed by the policy: {why}. Choose only from ALLOWED MOVES and ACTIONS")
        return self


def response_model(snapshot: TelemetrySnapshot, policy: Policy, offer: Offer) -> type[BaseModel]:
    """A pydantic model accepting only this decision's offered moves, actions and fitting diagnoses.

    Fields, in the order the model writes them: ``diagnosis``, ``moves`` (labels, at most
    ``limits.max_changes``), ``action`` (``none`` or an offered action), ``rationale``,
    ``expected_outcome``, ``watch_next``. ``moves`` and ``action`` are left out when nothing
    of the kind is offered, which keeps the schema (and the tokens to generate) small.
    """
    moves = offered_moves(offer, snapshot.params)
    fields: dict[str, Any] = {
        "diagnosis": (Literal[tuple(d.value for d in diagnoses_for(snapshot))], ...),  # type: ignore[misc]
    }
    if moves:
        labels = Literal[tuple(m.label for m in moves)]  # type: ignore[misc]
        fields["moves"] = (list[labels], Field(..., max_length=policy.limits.max_changes))  # type: ignore[valid-type]
    if offer.actions:
        fields["action"] = (Literal[("none",) + tuple(a.value for a in offer.actions)], ...)  # type: ignore[misc]
    fields["rationale"] = (str, Field(..., max_length=MAX_RATIONALE))
    fields["expected_outcome"] = (str, Field(..., max_length=MAX_EXPECTED))
    fields["watch_next"] = (str, Field(..., max_length=MAX_WATCH))
    model = create_model("Decision", __base__=_AnswerBase, **fields)
    model.__moves__ = tuple(moves)  # type: ignore[attr-defined]
    return model


def to_proposal(answer: BaseModel) -> Proposal:
    """The :class:`Proposal` an answer stands for: labels mapped back to exact offered values."""
    moves: dict[str, Move] = {m.label: m for m in getattr(answer, "__moves__", ())}
    changes = {moves[label].param: moves[label].value for label in getattr(answer, "moves", []) if label in moves}
    action = getattr(answer, "action", "none")
    return Proposal(
        diagnosis=Diagnosis(answer.diagnosis),  # type: ignore[attr-defined]
        changes=changes,
        action=None if action == "none" else Action(action),
        rationale=answer.rationale,  # type: ignore[attr-defined]
        expected_outcome=answer.expected_outcome,  # type: ignore[attr-defined]
        watch_next=answer.watch_next,  # type: ignore[attr-defined]
    )


@dataclass(frozen=True)
class Example:
    """A worked example for the few-shot variant: the prompt inputs and the ideal answer."""

    name: str
    snapshot: TelemetrySnapshot
    policy: Policy
    offer: Offer
    answer: dict[str, Any]


class LLMProposer:
    """Asks a language model for a proposal. See the module docstring for the variants.

    The client (and with it the model file) is created on first use, so building a proposer is cheap.
    """

    name = "llm"

    def __init__(
        self,
        client: Any = None,
        *,
        config: Any = None,
        variant: str | Variant = DEFAULT_VARIANT,
        examples: Sequence[Example] = (),
    ):
        self._client = client
        self._config = config
        self.variant = VARIANTS[variant] if isinstance(variant, str) else variant
        if self.variant.name not in VARIANTS and not isinstance(variant, Variant):
            raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")
        self.examples = list(examples)
        if self.variant.few_shot and not self.examples:
            raise ValueError(f"variant {self.variant.name!r} needs worked examples (examples=...)")

    @classmethod
    def from_settings(
        cls,
        model: str | None = None,
        base_url: str | None = None,
        *,
        policy: Policy | None = None,
        variant: str | Variant = DEFAULT_VARIANT,
        examples: Sequence[Example] = (),
        **overrides: Any,
    ) -> "LLMProposer":
        """A proposer configured from flags, ``ATM_LLM*`` variables and the policy's ``llm:`` section."""
        from atm.adapters.llm import LLMConfig

        config = LLMConfig.resolve(model, base_url, policy_llm=policy.llm if policy else None, **overrides)
        return cls(config=config, variant=variant, examples=examples)

    @property
    def client(self) -> Any:
        if self._client is None:
            from atm.adapters.llm import LLMClient, LLMConfig

            self._client = LLMClient.from_config(self._config or LLMConfig.resolve())
        return self._client

    def messages(
        self, snapshot: TelemetrySnapshot, policy: Policy, offer: Offer, evidence: tuple[Diagnosis, str] | None = None
    ) -> list[dict[str, str]]:
        """The chat messages for one decision (deterministic)."""
        msgs = [{"role": "system", "content": system_prompt(policy)}]
        for ex in self.examples[: self.variant.few_shot]:
            ex_evidence = diagnose(ex.snapshot, Thresholds.from_policy(ex.policy)) if self.variant.evidence else None
            msgs.append({"role": "user", "content": render_snapshot(ex.snapshot, ex.policy, ex.offer, evidence=ex_evidence)})
            msgs.append({"role": "assistant", "content": _json(ex.answer)})
        msgs.append({"role": "user", "content": render_snapshot(snapshot, policy, offer, evidence=evidence)})
        return msgs

    def propose(self, snapshot: TelemetrySnapshot, policy: Policy, ctx: DecisionContext, offer: Offer) -> ProposalResult:
        from atm.adapters.llm import LLMError

        evidence = diagnose(snapshot, Thresholds.from_policy(policy)) if self.variant.evidence else None
        msgs = self.messages(snapshot, policy, offer, evidence)
        model = response_model(snapshot, policy, offer)
        audit: dict[str, Any] = {"variant": self.variant.name, "prompt": msgs[-1]["content"]}
        if evidence is not None:
            audit["evidence"] = {"diagnosis": evidence[0].value, "text": evidence[1]}
        t0 = time.perf_counter()
        try:
            client = self.client
            audit["model"] = client.name
            if self.variant.two_stage:
                reasoning = client.chat(msgs + [{"role": "user", "content": REASON_PROMPT}], max_tokens=96)
                audit["reasoning"] = reasoning.transcript
                msgs = msgs + [
                    {"role": "user", "content": REASON_PROMPT},
                    {"role": "assistant", "content": str(reasoning.value).strip()},
                    {"role": "user", "content": FORMAT_PROMPT},
                ]
            answer = client.ask(msgs, model, context={"policy": policy, "offer": offer, "ctx": ctx})
        except LLMError as exc:
            audit.update(_flatten(exc.audit))
            audit["latency_s"] = round(time.perf_counter() - t0, 3)
            audit["error"] = str(exc)
            raise ProposerError(f"LLM proposer failed: {exc}", audit) from exc
        audit.update(_flatten(answer.transcript))
        audit["latency_s"] = round(time.perf_counter() - t0, 3)
        if "reasoning" in audit:
            audit["prompt_tokens"] = _add(audit.get("prompt_tokens"), audit["reasoning"].get("prompt_tokens"))
            audit["completion_tokens"] = _add(audit.get("completion_tokens"), audit["reasoning"].get("completion_tokens"))
        return ProposalResult(proposal=to_proposal(answer.value), source=self.name, audit=audit)


def _flatten(transcript: dict[str, Any]) -> dict[str, Any]:
    out = dict(transcript)
    # The last user message is already kept as ``prompt``; keep the rest of the conversation once.
    out["messages"] = transcript.get("messages", [])
    return out


def _add(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, ensure_ascii=True)
