"""Corpus sources (generated, local files, a saved dataset, the hub), a word-level tokenizer and the split.

``load_corpus(source)`` always returns stories plus a description of where they came from, so a run
can record in its params which data it trained on. The split is by story, never by character, so no
validation story is ever partly seen in training.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from atm.training.workloads.tinystories._stories import generate_stories

HUB_DATASET = "roneneldan/TinyStories"
#: TinyStories' own story separator in its raw text dumps.
END_OF_TEXT = "<|endoftext|>"
UNK = "<unk>"
EOS = "<eos>"
DEFAULT_CORPUS_KB = 36

# Every character of the input falls into exactly one piece: a word or a punctuation mark (each with
# the space before it, GPT-2 style) or a lone whitespace character. Joining the pieces gives the text
# back, so decoding is exact for any text whose pieces are in the vocabulary.
_PIECE = re.compile(r" ?\w+| ?[^\w\s]|\s")
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class CorpusError(RuntimeError):
    """A data source could not be read; the message says what to do instead."""


class Corpus(BaseModel):
    """Stories and a one-line description of their source (recorded in the run's params)."""

    model_config = ConfigDict(frozen=True)

    stories: list[str]
    source: str

    @property
    def text(self) -> str:
        return "\n\n".join(self.stories)


def load_corpus(source: str | Path = "generated", *, size_kb: int = DEFAULT_CORPUS_KB, seed: int = 0) -> Corpus:
    """Load stories from ``source``.

    Args:
        source: ``"generated"`` (offline, deterministic), ``"hub"`` (``roneneldan/TinyStories`` through the
            ``datasets`` package), or a local path: a ``.txt`` file, a folder of ``.txt`` files, or a folder
            written by ``datasets.Dataset.save_to_disk``. Text files are split into stories on
            ``<|endoftext|>`` when present, else on blank lines.
        size_kb: size of the generated corpus, and how much of the hub dataset to stream. Local files are
            read whole.
        seed: seed of the generated corpus.

    Raises:
        CorpusError: the path does not exist or holds no stories, ``datasets`` is missing for the hub, or
            the hub cannot be reached.
    """
    if size_kb <= 0:
        raise ValueError(f"size_kb must be positive, got {size_kb}")
    if str(source) == "generated":
        stories = generate_stories(size_kb * 1024, seed)
        return Corpus(stories=stories, source=f"generated(seed={seed}, size_kb={size_kb})")
    if str(source) == "hub":
        return _load_hub(size_kb)
    return _load_path(Path(source).expanduser())


def split_stories(text: str) -> list[str]:
    """Stories of a raw text: on ``<|endoftext|>`` when it appears, else on blank lines."""
    parts = text.split(END_OF_TEXT) if END_OF_TEXT in text else re.split(r"\n\s*\n", text)
    return [p.strip() for p in parts if p.strip()]


def _load_path(path: Path) -> Corpus:
    if not path.exists():
        raise CorpusError(f"data path {path} does not exist; pass a .txt file, a folder of .txt files, a "
                          "folder written by datasets' save_to_disk, 'generated' or 'hub'")
    if path.is_file():
        stories = split_stories(path.read_text(encoding="utf-8"))
        kind = "txt"
    elif any((path / m).exists() for m in _SAVED_DATASET_MARKERS):
        stories = _read_saved_dataset(path)
        kind = "saved-dataset"
    else:
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise CorpusError(f"folder {path} holds no .txt files and is not a saved dataset "
                              f"(none of {', '.join(_SAVED_DATASET_MARKERS)} found)")
        stories = [s for f in files for s in split_stories(f.read_text(encoding="utf-8"))]
        kind = f"txt-folder({len(files)} files)"
    if not stories:
        raise CorpusError(f"no stories found in {path}")
    return Corpus(stories=stories, source=f"{kind}:{path.resolve()}")


def _read_saved_dataset(path: Path) -> list[str]:
    """Text column of a ``save_to_disk`` folder: through ``datasets`` when installed, else its Arrow files."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency
    except ImportError:
        return _read_arrow_files(path)
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
    column = _text_column(loaded.column_names, path)
    return [s.strip() for s in loaded[column] if s and s.strip()]


def _read_arrow_files(path: Path) -> list[str]:
    # A save_to_disk folder is Arrow IPC streams plus JSON metadata; a DatasetDict has one folder per
    # split, and "train" is the one to use when there are several.
    import pyarrow as pa  # noqa: PLC0415 - comes with mlflow; only needed here

    split_dir = path / "train" if (path / "dataset_dict.json").exists() and (path / "train").is_dir() else path
    files = sorted(split_dir.rglob("*.arrow"))
    if not files:
        raise CorpusError(f"saved dataset {path} has no .arrow files; install datasets "
                          "(pip install datasets) to read it, or pass a .txt file")
    stories: list[str] = []
    for f in files:
        with pa.memory_map(str(f)) as source:
            table = pa.ipc.open_stream(source).read_all()
        column = _text_column(table.column_names, path)
        stories += [s.strip() for s in table.column(column).to_pylist() if s and s.strip()]
    return stories


def _text_column(names: Sequence[str], path: Path) -> str:
    if "text" in names:
        return "text"
    if len(names) == 1:
        return names[0]
    raise CorpusError(f"saved dataset {path} has columns {list(names)}; expected a 'text' column")


def _load_hub(size_kb: int) -> Corpus:
    try:
        import datasets  # noqa: PLC0415 - optional dependency, large
    except ImportError as exc:
        raise CorpusError("--data hub needs the datasets package: pip install datasets (or pip install "
                          "'atm[data]'); or use --data generated (offline) or --data PATH") from exc
    budget = size_kb * 1024
    stories: list[str] = []
    try:
        # Streaming reads only the first shard's worth instead of downloading the full dataset (~2 GB).
        for row in datasets.load_dataset(HUB_DATASET, split="train", streaming=True):
            text = (row.get("text") or "").strip()
            if text:
                stories.append(text)
                budget -= len(text.encode()) + 2
            if budget <= 0:
                break
    except Exception as exc:  # datasets raises many types (ConnectionError, HfHubHTTPError, ...)
        raise CorpusError(f"could not read {HUB_DATASET} from the Hugging Face hub ({type(exc).__name__}: "
                          f"{exc}); check network access (HF_HUB_OFFLINE, proxies), or use --data generated "
                          "or --data PATH to a local copy") from exc
    if not stories:
        raise CorpusError(f"{HUB_DATASET} returned no stories")
    return Corpus(stories=stories, source=f"hub:{HUB_DATASET}(train, first {len(stories)} stories, "
                                          f"size_kb={size_kb})")


# --------------------------------------------------------------------------- tokenizer


class WordTokenizer:
    """Word-level tokenizer: words and punctuation with their leading space, plus ``<unk>`` and ``<eos>``.

    Built from training stories only. Pieces seen fewer than ``min_count`` times become ``<unk>`` in
    training too, so the model learns where unseen words go instead of meeting ``<unk>`` first in
    validation. Ties in frequency are broken alphabetically so the same stories always give the same ids.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        if list(vocab[:2]) != [UNK, EOS]:
            raise ValueError(f"vocab must start with {UNK!r}, {EOS!r}; got {list(vocab[:2])}")
        self.vocab = list(vocab)
        self.index = {piece: i for i, piece in enumerate(self.vocab)}

    @classmethod
    def build(cls, stories: Iterable[str], max_vocab: int = 8192, min_count: int = 3) -> WordTokenizer:
        counts = Counter(p for s in stories for p in _PIECE.findall(s))
        kept = [p for p in counts if counts[p] >= min_count]
        ranked = sorted(kept, key=lambda p: (-counts[p], p))[: max(0, max_vocab - 2)]
        return cls([UNK, EOS, *ranked])

    @property
    def unk_id(self) -> int:
        return 0

    @property
    def eos_id(self) -> int:
        return 1

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(p, 0) for p in _PIECE.findall(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join("\n\n" if i == 1 else self.vocab[i] for i in ids)

    def encode_stories(self, stories: Iterable[str]) -> torch.Tensor:
        """One token stream: each story followed by ``<eos>``."""
        ids: list[int] = []
        for s in stories:
            ids += self.encode(s)
            ids.append(self.eos_id)
        return torch.tensor(ids, dtype=torch.long)


def train_val_split(stories: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint train and validation stories, chosen by a seeded shuffle of story indices."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(stories) < 2:
        raise ValueError(f"need at least 2 stories to split, got {len(stories)}")
    order = list(range(len(stories)))
    random.Random(seed).shuffle(order)
    n_val = min(len(stories) - 1, max(1, round(len(stories) * val_fraction)))
    val_idx = set(order[:n_val])
    train = [s for i, s in enumerate(stories) if i not in val_idx]
    val = [s for i, s in enumerate(stories) if i in val_idx]
    return train, val


class Prepared(BaseModel):
    """Token streams ready for training, with what the run's params should record about them."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    tokenizer: WordTokenizer
    train_ids: torch.Tensor
    val_ids: torch.Tensor
    source: str
    n_train_stories: int
    n_val_stories: int

    @property
    def val_unk_rate(self) -> float:
        return float((self.val_ids == 0).float().mean()) if len(self.val_ids) else 0.0


def prepare(corpus: Corpus, *, val_fraction: float = 0.2, seed: int = 0, max_vocab: int = 8192) -> Prepared:
    """Split by story, build the tokenizer from the training stories, encode both sides."""
    train, val = train_val_split(corpus.stories, val_fraction, seed)
    tok = WordTokenizer.build(train, max_vocab=max_vocab)
    return Prepared(tokenizer=tok, train_ids=tok.encode_stories(train), val_ids=tok.encode_stories(val),
                    source=corpus.source, n_train_stories=len(train), n_val_stories=len(val))
