"""The proposer contract: snapshot + policy -> a typed :class:`Proposal`.

Rules every proposer keeps:

- ``propose`` never raises for a bad answer from its model or a lost connection: it raises
  :class:`ProposerError`, and the daemon falls back to the rules proposer and says so.
- It only proposes values from ``available_choices`` (the validator re-checks anyway).
- It returns an audit dictionary (prompts, raw answers, errors, latency, tokens) that the
  daemon stores verbatim in the decision record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from atm.policies import DecisionContext, Policy
from atm.schema import Action, Proposal, TelemetrySnapshot


@dataclass(frozen=True)
class Offer:
    """The action surface for one decision: what the proposer may choose from right now."""

    choices: dict[str, list[float]]
    actions: list[Action]


@dataclass
class ProposalResult:
    proposal: Proposal
    source: str
    audit: dict[str, Any] = field(default_factory=dict)


class ProposerError(RuntimeError):
    """The proposer could not produce a proposal; ``audit`` says what was tried."""

    def __init__(self, message: str, audit: dict[str, Any] | None = None):
        super().__init__(message)
        self.audit = audit or {}


class Proposer(Protocol):
    name: str

    def propose(
        self, snapshot: TelemetrySnapshot, policy: Policy, ctx: DecisionContext, offer: Offer
    ) -> ProposalResult: ...
