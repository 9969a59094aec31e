"""LLM settings: where a model spec, base URL, timeout and retry count come from, in one place.

Precedence, highest first: explicit arguments (command-line flags), ``ATM_LLM*`` environment
variables, the policy file's ``llm:`` section, then the defaults below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: How a structured answer is requested from a server:
#: ``json_schema`` - OpenAI structured outputs (``response_format={"type": "json_schema", ...}``): OpenAI, vLLM.
#: ``json_object`` - ``{"type": "json_object", "schema": ...}``: what llama.cpp (in-process and its servers) honours.
#: ``tools``       - a forced function call: servers that constrain tool arguments but not response formats.
#: ``auto``        - ``json_object`` when the server identifies as llama.cpp (``GET /models``), else ``json_schema``.
JsonMode = Literal["auto", "json_schema", "json_object", "tools"]
JSON_MODES: tuple[str, ...] = ("auto", "json_schema", "json_object", "tools")

DEFAULT_MODEL = "embedded"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RETRIES = 2

#: Environment variables read by :meth:`LLMConfig.resolve`, with what each sets.
ENV_VARS = {
    "ATM_LLM": "model spec: embedded | local:/path/model.gguf | openai/<model>",
    "ATM_LLM_BASE_URL": "base URL of an OpenAI-compatible server (http://host:port/v1); OPENAI_BASE_URL is read too",
    "ATM_LLM_TIMEOUT": "seconds per request before giving up; a decision makes at most 1 + ATM_LLM_MAX_RETRIES "
                       "requests, then falls back to the rules proposer",
    "ATM_LLM_MAX_RETRIES": "re-asks after an invalid or out-of-policy answer",
    "ATM_LLM_JSON_MODE": "auto | json_schema | json_object | tools (how structured output is requested)",
    "ATM_LLM_THREADS": "CPU threads of an in-process model (default: half the usable cores, at least 1)",
    "OPENAI_API_KEY": "API key for openai/<model> (a dummy key is used when a base URL is given)",
}


class LLMConfigError(ValueError):
    """A setting has a value atm cannot use. The message names the setting and the value."""


class LLMConfig(BaseModel):
    """Resolved settings for one LLM provider."""

    model_config = ConfigDict(frozen=True)

    model: str = DEFAULT_MODEL
    base_url: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    timeout_s: float = Field(DEFAULT_TIMEOUT_S, gt=0)
    max_retries: int = Field(DEFAULT_MAX_RETRIES, ge=0)
    json_mode: JsonMode = "auto"
    #: Cap on generated tokens per call; small, because answers are small and time is short.
    max_tokens: int = Field(256, ge=16)
    temperature: float = Field(0.0, ge=0)
    #: Context window for in-process GGUF models.
    n_ctx: int = Field(4096, ge=512)
    #: Threads for in-process GGUF models, prompt evaluation included (None: half the usable cores).
    n_threads: int | None = Field(None, ge=1)

    @classmethod
    def resolve(
        cls,
        model: str | None = None,
        base_url: str | None = None,
        *,
        policy_llm: Any = None,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> LLMConfig:
        """Merge arguments, environment and the policy's ``llm`` section (an ``LLMSettings``).

        Raises:
            LLMConfigError: a numeric environment variable does not parse, or a value is out of range.
        """
        env = os.environ if environ is None else environ
        pol = policy_llm
        merged: dict[str, Any] = {
            "model": model or env.get("ATM_LLM") or getattr(pol, "model", None) or DEFAULT_MODEL,
            "base_url": base_url or env.get("ATM_LLM_BASE_URL") or getattr(pol, "base_url", None),
            "api_key": env.get("OPENAI_API_KEY") or None,
        }
        remote = str(merged["model"]).startswith("openai/")
        if remote and not merged["base_url"] and env.get("OPENAI_BASE_URL"):
            # The openai SDK reads it anyway: atm must know which server it is talking to.
            merged["base_url"] = env["OPENAI_BASE_URL"]
        if not remote and (base_url or env.get("ATM_LLM_BASE_URL")):
            # Given for this run with a model that runs in-process, it would be ignored in silence: no
            # request would reach the server, and the audit would name a model the user did not mean.
            where = "--llm-base-url" if base_url else "ATM_LLM_BASE_URL"
            raise LLMConfigError(
                f"{where} is {base_url or env.get('ATM_LLM_BASE_URL')} but the model is {merged['model']!r}, "
                "which runs in-process; to use the server, name its model: --llm openai/MODEL (or ATM_LLM=openai/MODEL)"
            )
        if not remote:
            merged["base_url"] = None  # a policy's base_url belongs to its openai/ model, not to this one
        timeout = _env_number(env, "ATM_LLM_TIMEOUT", float)
        merged["timeout_s"] = (
            timeout if timeout is not None else getattr(pol, "timeout_s", None) or DEFAULT_TIMEOUT_S
        )
        retries = _env_number(env, "ATM_LLM_MAX_RETRIES", int)
        pol_retries = getattr(pol, "max_retries", None)
        merged["max_retries"] = (
            retries
            if retries is not None
            else pol_retries
            if pol_retries is not None
            else DEFAULT_MAX_RETRIES
        )
        threads = _env_number(env, "ATM_LLM_THREADS", int)
        if threads is not None:
            merged["n_threads"] = threads
        mode = env.get("ATM_LLM_JSON_MODE")
        if mode:
            if mode not in JSON_MODES:
                raise LLMConfigError(f"ATM_LLM_JSON_MODE={mode!r}: use one of {', '.join(JSON_MODES)}")
            merged["json_mode"] = mode
        merged.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**merged)
        except ValueError as exc:
            raise LLMConfigError(f"invalid LLM settings: {exc}") from exc


def _env_number(env: Mapping[str, str], name: str, kind: type) -> Any:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    try:
        return kind(raw)
    except ValueError as exc:
        raise LLMConfigError(f"{name}={raw!r} is not a {kind.__name__}; unset it or give a number") from exc
