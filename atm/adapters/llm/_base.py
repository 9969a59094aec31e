"""The contract every LLM backend keeps, the errors they raise and the per-attempt audit record.

Rules every backend keeps:

- ``create(**kwargs)`` takes OpenAI chat-completion arguments and returns an
  ``openai.types.chat.ChatCompletion`` (usage filled in when the server reports it).
- It honours its deadline: it raises :class:`LLMTimeout` rather than answering late.
- Transport failures are translated here, at the edge: :class:`LLMConnectionError`,
  :class:`LLMTimeout` or :class:`LLMServerError`, chained ``from`` the library's exception.
- It is safe to call from several threads (an in-process model serialises calls on one lock).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

#: The request forms a backend can be asked to use (``auto`` is resolved before any call).
Wire = Literal["json_schema", "json_object", "tools"]


class LLMError(RuntimeError):
    """An LLM call produced no valid answer. ``audit`` holds the prompt, every attempt and the errors."""

    def __init__(self, message: str, audit: dict[str, Any] | None = None):
        super().__init__(message)
        self.audit: dict[str, Any] = audit or {}


class LLMConnectionError(LLMError):
    """The server could not be reached (refused, DNS, reset)."""


class LLMTimeout(LLMError):
    """The model did not answer within the configured timeout."""


class LLMServerError(LLMError):
    """The server answered with an error status or a body that is not a chat completion."""


@dataclass
class Attempt:
    """One call to the model, as the audit log keeps it."""

    raw: str
    latency_s: float
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Prompt tokens the server took from its cache instead of evaluating (None: not reported).
    cached_tokens: int | None = None
    #: Why the answer was refused (validation error) or why the call failed (transport error).
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ChatBackend(Protocol):
    """One model behind an OpenAI-shaped ``create``."""

    #: The model name as reported in audits (``embedded:SmolLM2-135M-Instruct.Q4_1``, ``openai/gpt-4o-mini``).
    name: str

    def wire(self) -> Wire:
        """The structured-output form this server honours."""
        ...

    def create(self, **kwargs: Any) -> Any:
        """An OpenAI ``ChatCompletion`` for these chat-completion arguments."""
        ...
