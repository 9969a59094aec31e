"""The ``llm`` proposer: asks a language model for a typed, policy-bounded proposal.

How it is prompted is :mod:`atm.watcher.llm_variants`; the answer it must give is
:mod:`atm.watcher.llm_answer`; the model itself (in-process or behind an OpenAI-compatible server)
is reached through :mod:`atm.adapters.llm`.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from atm.policies import DecisionContext, Policy
from atm.schema import Action, DecisionRecord, Diagnosis, Proposal, TelemetrySnapshot
from atm.watcher.llm_answer import brief_model, has_choice, response_model, to_proposal
from atm.watcher.llm_variants import (
    DEFAULT_VARIANT,
    FORMAT_PROMPT,
    REASON_PROMPT,
    REMEDY_ACTIONS,
    VARIANTS,
    Example,
    Variant,
    bundled_examples,
    remedy_moves,
)
from atm.watcher.prompt import (
    Move,
    offered_moves,
    policy_prompt,
    render_brief,
    render_snapshot,
    system_prompt,
)
from atm.watcher.proposer import Offer, ProposalResult, ProposerError
from atm.watcher.rules import (
    RulesProposer,
    Thresholds,
    diagnose_for_offer,
    remedy,
    revert_proposal,
    stop_problem,
    waiting_for,
)

#: Generated tokens a brief answer may take: its JSON is about 40 tokens; the grammar ends it well before.
BRIEF_MAX_TOKENS = 96
#: Values a brief prompt offers per parameter and direction (besides the suggested one).
BRIEF_MOVES_PER_SIDE = 3


@dataclass(frozen=True)
class _Brief:
    """What a brief prompt offers for one decision: the problem, its remedies and the rules' choice."""

    problem: tuple[Diagnosis, str]
    allowed: list[Move]
    actions: list[Action]
    suggested: dict[str, Any]

    def model(self, snapshot: TelemetrySnapshot, policy: Policy, offer: Offer) -> type:
        return brief_model(snapshot, offer, self.problem[0], self.allowed, self.actions,
                           max_changes=policy.limits.max_changes,
                           # A problem gets a move when the rules found one (a small model otherwise
                           # names the problem and does nothing); none is required when they found none.
                           min_moves=1 if self.suggested.get("moves") else 0)


def _nearest(moves: list[Move], params: dict[str, float], keep: set[str]) -> list[Move]:
    """Per parameter and direction, the :data:`BRIEF_MOVES_PER_SIDE` moves nearest the value in force,
    and the moves in ``keep`` (the suggested ones). A small model copies rather than weighs a long
    list, and every value shown costs prompt tokens."""
    sides: dict[tuple[str, str], list[Move]] = {}
    for m in moves:
        sides.setdefault((m.param, m.direction), []).append(m)
    chosen: set[str] = set(keep)
    for (param, _), side in sides.items():
        now = params.get(param, 0.0)
        chosen.update(m.label for m in sorted(side, key=lambda m: abs(m.value - now))[:BRIEF_MOVES_PER_SIDE])
    return [m for m in moves if m.label in chosen]


def _brief(snapshot: TelemetrySnapshot, policy: Policy, offer: Offer, problem: tuple[Diagnosis, str],
           history: Sequence[DecisionRecord] = ()) -> _Brief:
    diagnosis = problem[0]
    allowed = remedy_moves(diagnosis, offered_moves(offer, snapshot.params), snapshot, policy)
    actions = [a for a in offer.actions if a in REMEDY_ACTIONS.get(diagnosis, ())]
    changes, action = remedy(diagnosis, snapshot, policy, offer, history)
    labels = {(m.param, m.value): m.label for m in allowed}
    picked = [labels[(p, v)] for p, v in changes.items() if (p, v) in labels][: policy.limits.max_changes]
    allowed = _nearest(allowed, snapshot.params, set(picked))
    suggested: dict[str, Any] = {}
    if allowed:
        suggested["moves"] = picked
    if actions:
        suggested["action"] = action.value if action in actions else "none"
    return _Brief(problem=problem, allowed=allowed, actions=actions, suggested=suggested)

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
        #: Policies whose prompt prefix the model has been given ahead of their first decision.
        self._warmed: set[str] = set()
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
        evidence = self._evidence(snapshot, policy, offer)
        if self.variant.brief and evidence is not None:
            return self._brief_messages(snapshot, policy, _brief(snapshot, policy, offer, evidence))
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

    @staticmethod
    def _brief_messages(snapshot: TelemetrySnapshot, policy: Policy, brief: _Brief) -> list[dict[str, str]]:
        user = render_brief(snapshot, policy, problem=brief.problem, allowed=brief.allowed, actions=brief.actions,
                            suggested=brief.suggested)
        return [{"role": "system", "content": policy_prompt(policy)}, {"role": "user", "content": user}]

    def _evidence(self, snapshot: TelemetrySnapshot, policy: Policy, offer: Offer) -> tuple[Diagnosis, str] | None:
        return diagnose_for_offer(snapshot, Thresholds.from_policy(policy), offer) if self.variant.evidence else None

    def propose(
        self, snapshot: TelemetrySnapshot, policy: Policy, ctx: DecisionContext, offer: Offer
    ) -> ProposalResult:
        result = self._propose(snapshot, policy, ctx, offer)
        if "skipped" in result.audit:
            self._warm(policy)
        return result

    def _warm(self, policy: Policy) -> None:
        """Once per policy, while the model is not needed (a healthy run, a remedy being measured): load
        it and evaluate the brief prompt's system message on a thread of its own, so that the first
        decision that asks the model finds both ready (an in-process model keeps the prefix in its KV
        cache). A backend without ``warm`` (a server) is left alone; a failure here is the first
        decision's to report."""
        if not self.variant.brief or policy.name in self._warmed:
            return
        self._warmed.add(policy.name)
        warm = getattr(getattr(self.client, "backend", None), "warm", None)
        if warm is not None:
            system = [{"role": "system", "content": policy_prompt(policy)}]
            threading.Thread(target=warm, args=(system,), name="atm-llm-warm", daemon=True).start()

    def _propose(
        self, snapshot: TelemetrySnapshot, policy: Policy, ctx: DecisionContext, offer: Offer
    ) -> ProposalResult:
        from atm.adapters.llm import LLMError

        # Setting back a change measured to hurt, and waiting for a remedy's effect, are the policy's
        # pace, not a judgement call: they are the same whoever proposes.
        back = revert_proposal(snapshot, ctx, offer)
        if back is not None:
            return ProposalResult(proposal=back, source=self.name,
                                  audit={"variant": self.variant.name, "skipped": "a change measured hurt is set back",
                                         "latency_s": 0.0})
        evidence = self._evidence(snapshot, policy, offer)
        waiting = waiting_for(evidence[0], policy, ctx) if evidence is not None else ""
        if waiting and evidence is not None:
            return ProposalResult(proposal=Proposal(diagnosis=evidence[0], rationale=f"{evidence[1]}; {waiting}"),
                                  source=self.name, audit={"variant": self.variant.name, "skipped": waiting,
                                                           "latency_s": 0.0})
        only = evidence[0] if (self.variant.anchored and evidence is not None) else None
        max_tokens = None
        if self.variant.brief and evidence is not None:
            brief = _brief(snapshot, policy, offer, evidence, ctx.history)
            msgs = self._brief_messages(snapshot, policy, brief)
            model = brief.model(snapshot, policy, offer)
            max_tokens = BRIEF_MAX_TOKENS
        else:
            msgs = self.messages(snapshot, policy, offer)
            model = response_model(snapshot, policy, offer, coherent=self.variant.coherent, only=only)
        audit: dict[str, Any] = {"variant": self.variant.name, "prompt": msgs[-1]["content"]}
        if evidence is not None:
            audit["evidence"] = {"diagnosis": evidence[0].value, "text": evidence[1]}
        if only is not None and evidence is not None and not has_choice(model):
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
            answer = client.ask(msgs, model, context={"policy": policy, "offer": offer, "ctx": ctx},
                                max_tokens=max_tokens)
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
        if self.variant.brief and evidence is not None:
            # The brief answer has no room for them; the rules' words for this diagnosis fit any remedy of it.
            ruled = RulesProposer().propose(snapshot, policy, ctx, offer).proposal
            proposal = proposal.model_copy(update={"expected_outcome": ruled.expected_outcome,
                                                   "watch_next": ruled.watch_next})
        if proposal.action == Action.STOP and evidence is not None:
            # A stop names the problem it ends, as the rules' does (overfitting -> stop, not "converged").
            proposal = proposal.model_copy(update={"problem": stop_problem(proposal.diagnosis, evidence[1])})
        return ProposalResult(proposal=proposal, source=self.name, audit=audit)


__all__ = ["LLMProposer"]
