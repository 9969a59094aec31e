"""OpenAI-compatible HTTP servers: OpenAI itself, vLLM, Ollama, llama.cpp servers, ...

Servers disagree on how structured output is requested (OpenAI and vLLM take ``json_schema``;
llama.cpp servers build a grammar only for ``json_object`` plus ``schema``), so the wire form
is a setting. ``auto`` asks ``GET /models`` once: llama.cpp servers name themselves in
``owned_by`` (``llamacpp`` for llama-server, ``me`` for llama-cpp-python's server).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from atm.adapters.llm._base import LLMConnectionError, LLMError, LLMServerError, LLMTimeout, Wire

log = logging.getLogger("atm.llm")

#: ``owned_by`` values of llama.cpp servers in ``GET /models``.
LLAMA_CPP_OWNERS = frozenset({"llamacpp", "me"})

#: Key sent to servers that need none (local servers ignore it; the client refuses an empty one).
DUMMY_KEY = "sk-no-key-required"


class OpenAIBackend:
    """One model behind an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout_s: float,
        json_mode: str = "auto",
    ):
        try:
            import openai
        except ImportError as exc:
            raise LLMError("openai/<model> needs the openai package: pip install 'atm[llm]'") from exc
        if not model:
            raise LLMError(
                "give a model name after the prefix: --llm openai/<model> (for example openai/gpt-4o-mini)"
            )
        if api_key is None:
            if base_url is None:
                raise LLMError(
                    "openai/<model> needs OPENAI_API_KEY, or --llm-base-url / ATM_LLM_BASE_URL for a local "
                    "OpenAI-compatible server (vLLM, Ollama, llama.cpp)"
                )
            api_key = DUMMY_KEY
        self.placeholder_key = api_key == DUMMY_KEY
        self.model = model
        self.base_url = base_url
        self.name = f"openai/{model}" + (f"@{base_url}" if base_url else "")
        self.timeout_s = timeout_s
        self._json_mode = json_mode
        self._wire: Wire | None = None if json_mode == "auto" else json_mode  # type: ignore[assignment]
        self._lock = threading.Lock()
        # Retries of lost connections are not ours to make: the daemon falls back to the rules at once.
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)
        self._openai = openai

    def wire(self) -> Wire:
        with self._lock:
            if self._wire is None:
                self._wire = self._detect()
            return self._wire

    def _detect(self) -> Wire:
        if self.base_url is None:
            return "json_schema"
        try:
            models = self._client.models.list()
            owners = {str(getattr(m, "owned_by", "")).lower() for m in models.data}
            ids = sorted(str(getattr(m, "id", "")) for m in models.data)
        except (self._openai.OpenAIError, ValueError, AttributeError):
            # Unknown server (no /models, or an odd body): the chat call itself will report a connection problem, if any.
            return "json_schema"
        if ids and self.model not in ids:
            # Single-model servers (llama.cpp, some vLLM set-ups) answer whatever name is asked for, and
            # the audit would then name a model that never answered.
            log.warning("%s lists the models %s, not %r; it may answer with another model than the one named "
                        "(fix --llm openai/MODEL)", self.base_url, ", ".join(ids[:5]), self.model)
        return "json_object" if owners & LLAMA_CPP_OWNERS else "json_schema"

    def create(self, **kwargs: Any) -> Any:
        from openai.types.chat import ChatCompletion

        kwargs["model"] = self.model
        o = self._openai
        where = self.base_url or "api.openai.com"
        try:
            response = self._client.chat.completions.create(**kwargs)
        except o.APITimeoutError as exc:
            raise LLMTimeout(
                f"{self.name} did not answer within {self.timeout_s:g} s; raise timeout_s "
                "(policy llm.timeout_s or ATM_LLM_TIMEOUT) or check the server's load"
            ) from exc
        except o.APIConnectionError as exc:
            raise LLMConnectionError(
                f"cannot reach {where} ({exc.__cause__ or exc}); start the server or fix --llm-base-url / ATM_LLM_BASE_URL"
            ) from exc
        except o.APIStatusError as exc:
            raise LLMServerError(
                f"{where} answered HTTP {exc.status_code}: {_short(exc.message)}{self._status_hint(exc.status_code)}"
            ) from exc
        except o.APIResponseValidationError as exc:
            raise LLMServerError(
                f"{where} sent a body that is not a chat completion: {_short(str(exc))}"
            ) from exc
        except ValueError as exc:  # a 200 answer whose body is not JSON
            raise LLMServerError(f"{where} sent a body that is not JSON: {_short(str(exc))}") from exc
        if not isinstance(response, ChatCompletion) or not response.choices:
            raise LLMServerError(
                f"{where} sent a body that is not a chat completion: {_short(repr(response))}"
            )
        return response

    def _status_hint(self, status: int) -> str:
        """What usually causes an HTTP error from a chat endpoint, and what to change."""
        if status in (401, 403):
            sent = "a placeholder key (OPENAI_API_KEY is not set)" if self.placeholder_key else "OPENAI_API_KEY"
            return f"; the server refused {sent}: set OPENAI_API_KEY to a key it accepts"
        if status == 404:
            base = (self.base_url or "").rstrip("/")
            if base and not base.endswith("/v1"):
                return f"; OpenAI-compatible servers serve under /v1: try --llm-base-url {base}/v1"
            return f"; check the base URL, and that the server knows the model {self.model!r}"
        if status in (400, 422, 500):
            return ("; if the server cannot do structured output the way it was asked, set ATM_LLM_JSON_MODE "
                    "(json_schema, json_object or tools)")
        return ""


def _short(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"
