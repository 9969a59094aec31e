"""Model specs resolved in one table, and the instructor border: typed answers with re-asks and an audit.

A spec is ``embedded``, ``local:/path/model.gguf`` or ``openai/<model>``. Every backend is driven
the same way: instructor patches the backend's ``create`` (wrapped to record each attempt and to
send the structured-output form that server honours), validates the answer against a pydantic
response model with a validation context (the policy and the offer), and re-asks with the
error until ``max_retries`` runs out.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from atm.adapters.llm._base import Attempt, ChatBackend, LLMError
from atm.adapters.llm._config import LLMConfig, LLMConfigError
from atm.adapters.llm._llama import LlamaBackend, embedded_model_path
from atm.adapters.llm._openai import OpenAIBackend

#: Sampling temperature of re-asks after an invalid answer.
RETRY_TEMPERATURE = 0.7


def _embedded(rest: str, cfg: LLMConfig) -> ChatBackend:
    path = embedded_model_path()
    return LlamaBackend(
        path, label=f"embedded:{path.stem}", timeout_s=cfg.timeout_s, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads
    )


def _local(rest: str, cfg: LLMConfig) -> ChatBackend:
    if not rest:
        raise LLMConfigError("local: needs a path: --llm local:/path/to/model.gguf")
    path = Path(rest).expanduser()
    return LlamaBackend(
        path, label=f"local:{path.name}", timeout_s=cfg.timeout_s, n_ctx=cfg.n_ctx, n_threads=cfg.n_threads
    )


def _openai(rest: str, cfg: LLMConfig) -> ChatBackend:
    return OpenAIBackend(
        rest, base_url=cfg.base_url, api_key=cfg.api_key, timeout_s=cfg.timeout_s, json_mode=cfg.json_mode
    )


#: Spec prefix -> backend factory. ``embedded`` must match whole; the others take the rest of the spec.
PROVIDERS: dict[str, Callable[[str, LLMConfig], ChatBackend]] = {
    "embedded": _embedded,
    "local:": _local,
    "openai/": _openai,
}


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a model spec into (provider prefix, rest).

    Raises:
        LLMConfigError: the spec matches no provider; the message lists the forms.
    """
    spec = spec.strip()
    if spec == "embedded":
        return "embedded", ""
    for prefix in PROVIDERS:
        if prefix != "embedded" and spec.startswith(prefix):
            return prefix, spec[len(prefix) :]
    raise LLMConfigError(
        f"unknown LLM spec {spec!r}: use `embedded`, `local:/path/model.gguf` or `openai/<model>` "
        "(with --llm-base-url for vLLM, Ollama or a llama.cpp server)"
    )


def resolve_backend(cfg: LLMConfig) -> ChatBackend:
    prefix, rest = parse_spec(cfg.model)
    return PROVIDERS[prefix](rest, cfg)


@dataclass
class Answer:
    """A validated answer (a model instance, or text for :meth:`LLMClient.chat`) and its transcript."""

    value: Any
    transcript: dict[str, Any] = field(default_factory=dict)


class LLMClient:
    """Typed calls to one model. Thread-safe when its backend is."""

    def __init__(self, backend: ChatBackend, config: LLMConfig):
        self.backend = backend
        self.config = config

    @classmethod
    def from_config(cls, config: LLMConfig) -> LLMClient:
        return cls(resolve_backend(config), config)

    @property
    def name(self) -> str:
        return self.backend.name

    def ask(
        self,
        messages: list[dict[str, str]],
        response_model: type[BaseModel],
        *,
        context: dict[str, Any] | None = None,
        max_retries: int | None = None,
        max_tokens: int | None = None,
    ) -> Answer:
        """A ``response_model`` instance validated with ``context``; invalid answers are re-asked.

        Raises:
            LLMError: (or a subclass: timeout, connection, server) no valid answer; ``audit``
                holds the messages, every attempt's raw answer and error, latency and tokens.
        """
        import instructor
        from instructor.core.hooks import Hooks

        wire = self.backend.wire()
        attempts: list[Attempt] = []
        record = self._recorder(attempts, wire)
        hooks = Hooks()

        def on_parse_error(error: Exception, **_: Any) -> None:
            if attempts:
                attempts[-1].error = _error_text(error)

        hooks.on("parse:error", on_parse_error)
        mode = instructor.Mode.TOOLS if wire == "tools" else instructor.Mode.JSON_SCHEMA
        create = instructor.patch(create=record, mode=mode)
        retries = self.config.max_retries if max_retries is None else max_retries
        t0 = time.perf_counter()
        try:
            value = create(
                response_model=response_model,
                messages=messages,
                context=context,
                max_retries=retries,
                max_tokens=max_tokens or self.config.max_tokens,
                temperature=self.config.temperature,
                hooks=hooks,
            )
        except Exception as exc:  # instructor wraps everything; find our own error in the chain
            audit = self._transcript(messages, attempts, wire, t0)
            raise _as_llm_error(exc, attempts, audit) from exc
        return Answer(value=value, transcript=self._transcript(messages, attempts, wire, t0))

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int | None = None) -> Answer:
        """Free text (no schema), for a reasoning step.

        Raises:
            LLMError: the call failed; ``audit`` as for :meth:`ask`.
        """
        attempts: list[Attempt] = []
        wire = self.backend.wire()
        record = self._recorder(attempts, wire)
        t0 = time.perf_counter()
        try:
            record(
                messages=messages,
                max_tokens=max_tokens or self.config.max_tokens,
                temperature=self.config.temperature,
            )
        except LLMError as exc:
            exc.audit = self._transcript(messages, attempts, wire, t0)
            raise
        return Answer(value=attempts[-1].raw, transcript=self._transcript(messages, attempts, wire, t0))

    def _recorder(self, attempts: list[Attempt], wire: str) -> Callable[..., Any]:
        backend = self.backend

        def create(*args: Any, **kwargs: Any) -> Any:
            if attempts and kwargs.get("temperature", 0) < RETRY_TEMPERATURE:
                # A re-ask at temperature 0 mostly repeats the refused answer (measured with SmolLM2).
                kwargs["temperature"] = RETRY_TEMPERATURE
                kwargs["seed"] = len(attempts)
            rf = kwargs.get("response_format")
            if wire == "json_object" and isinstance(rf, dict) and rf.get("type") == "json_schema":
                kwargs["response_format"] = {"type": "json_object", "schema": rf["json_schema"]["schema"]}
            t0 = time.perf_counter()
            try:
                response = backend.create(**kwargs)
            except LLMError as exc:
                attempts.append(Attempt(raw="", latency_s=time.perf_counter() - t0, error=str(exc)))
                raise
            choice = response.choices[0]
            raw = choice.message.content or ""
            if not raw and choice.message.tool_calls:
                raw = choice.message.tool_calls[0].function.arguments or ""
                choice.message.tool_calls[0].function.arguments = json_whitespace(raw)
            elif raw:
                choice.message.content = json_whitespace(raw)
            usage = response.usage
            attempts.append(
                Attempt(
                    raw=raw,
                    latency_s=round(time.perf_counter() - t0, 3),
                    finish_reason=choice.finish_reason,
                    prompt_tokens=getattr(usage, "prompt_tokens", None),
                    completion_tokens=getattr(usage, "completion_tokens", None),
                    cached_tokens=getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None),
                )
            )
            return response

        return create

    def _transcript(
        self, messages: list[dict[str, str]], attempts: list[Attempt], wire: str, t0: float
    ) -> dict[str, Any]:
        def total(key: str) -> int | None:
            vals = [getattr(a, key) for a in attempts]
            return sum(vals) if vals and all(v is not None for v in vals) else None

        return {
            "model": self.name,
            "wire": wire,
            "messages": messages,
            "attempts": [a.as_dict() for a in attempts],
            "latency_s": round(time.perf_counter() - t0, 3),
            "prompt_tokens": total("prompt_tokens"),
            "completion_tokens": total("completion_tokens"),
            "cached_tokens": total("cached_tokens"),
        }


_CONTROL = re.compile(r"[\x00-\x1f]")


def json_whitespace(text: str) -> str:
    """``text`` with raw control characters turned into spaces.

    llama-cpp-python's JSON grammar lets raw newlines and tabs into strings, which strict JSON
    refuses. Outside strings they are whitespace anyway, so a space means the same there;
    inside a string it keeps the answer readable. The audit keeps the raw text.
    """
    return _CONTROL.sub(" ", text)


def _error_text(error: BaseException) -> str:
    # pydantic appends a documentation URL to each error; the audit keeps the message only.
    lines = [ln for ln in str(error).splitlines() if "errors.pydantic.dev" not in ln]
    return "\n".join(lines).strip()


def _as_llm_error(exc: BaseException, attempts: list[Attempt], audit: dict[str, Any]) -> LLMError:
    cur: BaseException | None = exc
    while cur is not None:
        if isinstance(cur, LLMError):
            cur.audit = audit
            return cur
        cur = cur.__cause__ or cur.__context__
    last = next((a.error for a in reversed(attempts) if a.error), _error_text(exc))
    return LLMError(f"no valid answer after {len(attempts)} attempt(s); last error: {last}", audit)
