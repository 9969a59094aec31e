"""The supervised reference workload: a small GPT on TinyStories-style stories that overfits on purpose.

``train(TrainConfig(...))`` runs one arm; ``atm-train tinystories`` is its command line.
"""

from __future__ import annotations

from atm.training.workloads.tinystories.data import Corpus, CorpusError, WordTokenizer, load_corpus, prepare
from atm.training.workloads.tinystories.model import GPT, GPTConfig
from atm.training.workloads.tinystories.train import (
    EarlyStopOutcome,
    EvalPoint,
    ScriptedIntervention,
    TrainConfig,
    TrainResult,
    early_stop_with_restore,
    train,
)

__all__ = [
    "GPT",
    "Corpus",
    "CorpusError",
    "EarlyStopOutcome",
    "EvalPoint",
    "GPTConfig",
    "ScriptedIntervention",
    "TrainConfig",
    "TrainResult",
    "WordTokenizer",
    "early_stop_with_restore",
    "load_corpus",
    "prepare",
    "train",
]
