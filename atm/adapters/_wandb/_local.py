"""A W&B run directory on disk: where atm keeps its messages, how runs are found, atomic file writes.

A run directory is ``<wandb dir>/offline-run-<time>-<id>`` (offline) or ``<wandb dir>/run-<time>-<id>``
(online; wandb writes the same transaction log for those). atm keeps:

- ``atm/inbox/update-NNNNNN.json``: the daemon's updates for the job. Outside ``files/``, so they
  stay local: they are messages, not results;
- ``atm/seq``: the last sequence number the daemon took;
- ``atm/approvals/approval-NNNNNN.json``: a person's answer to a decision held for approval
  (``atm approve``/``atm reject`` write it signed);
- ``files/atm/outbox/ack-NNNNNN.json``: the listener's acks;
- ``files/atm/listener.json``: what the listener announced (knobs, current values, pid, host);
- ``files/atm/interventions.jsonl``: the daemon's decision log.

Everything under ``files/`` is uploaded with the run: at the end of an online run, and by
``wandb sync`` for an offline one (wandb-core uploads the whole files directory when a run ends).
So the decision log, acks and listener state travel with the run to W&B; the inbox does not.

Every file is written whole to a temporary name in the same folder, then renamed over the final
name (``os.replace``), so a reader sees the old content or the new, never half of it. Readers
ignore the temporary names.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from atm.adapters.base import LOG_ARTIFACT, WANDB_RUN_DIR_RE, MessageProblem, parse_message

M = TypeVar("M", bound=BaseModel)

RUN_DIR_RE = WANDB_RUN_DIR_RE
UPDATE_FILE_RE = re.compile(r"^update-(\d+)\.json$")
ACK_FILE_RE = re.compile(r"^ack-(\d+)\.json$")
APPROVAL_FILE_RE = re.compile(r"^approval-(\d+)\.json$")

LISTENER_FILE = "listener.json"


def update_name(seq: int) -> str:
    return f"update-{seq:06d}.json"


def ack_name(seq: int) -> str:
    return f"ack-{seq:06d}.json"


def approval_name(seq: int) -> str:
    return f"approval-{seq:06d}.json"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    run_dir: Path

    @property
    def files_dir(self) -> Path:
        return self.run_dir / "files"

    @property
    def inbox(self) -> Path:
        return self.run_dir / "atm" / "inbox"

    @property
    def approvals(self) -> Path:
        return self.run_dir / "atm" / "approvals"

    @property
    def seq_file(self) -> Path:
        return self.run_dir / "atm" / "seq"

    @property
    def outbox(self) -> Path:
        return self.files_dir / "atm" / "outbox"

    @property
    def listener_file(self) -> Path:
        return self.files_dir / "atm" / LISTENER_FILE

    @property
    def log_file(self) -> Path:
        return self.files_dir / LOG_ARTIFACT

    @property
    def run_id(self) -> str:
        m = RUN_DIR_RE.match(self.run_dir.name)
        return m.group(2) if m else self.run_dir.name

    def transaction_log(self) -> Path | None:
        """The run's ``run-<id>.wandb`` file, or None before wandb created it."""
        exact = self.run_dir / f"run-{self.run_id}.wandb"
        if exact.is_file():
            return exact
        found = sorted(self.run_dir.glob("run-*.wandb"))
        return found[0] if found else None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and RUN_DIR_RE.match(path.name) is not None and any(path.glob("run-*.wandb"))


def run_dirs(wandb_dir: Path) -> list[Path]:
    """Run directories directly under ``wandb_dir``, oldest first (``latest-run`` is a link: skipped)."""
    if not wandb_dir.is_dir():
        return []
    found = [p for p in wandb_dir.iterdir() if not p.is_symlink() and is_run_dir(p)]
    return sorted(found, key=lambda p: (RUN_DIR_RE.match(p.name).group(1), p.stat().st_mtime))  # type: ignore[union-attr]


def find_run_dir(spec: str, wandb_dir: Path) -> Path | None:
    """Resolve ``--run``: a run directory, a ``.wandb`` file, or a bare run id under ``wandb_dir``.

    A resumed run has one directory per process; the newest one is the live one.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".wandb":
        return path.parent
    if path.is_dir() and any(path.glob("run-*.wandb")):
        return path
    if "/" in spec or os.sep in spec:
        return None
    matches = [p for p in run_dirs(wandb_dir) if RUN_DIR_RE.match(p.name).group(2) == spec]  # type: ignore[union-attr]
    return matches[-1] if matches else None


def default_wandb_dir() -> Path:
    """Where ``wandb.init`` puts runs by default: ``$WANDB_DIR/wandb``, else ``./wandb``."""
    base = os.environ.get("WANDB_DIR")
    return Path(base) / "wandb" if base else Path("wandb")


# --------------------------------------------------------------------------- files


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None


class MessageFolder:
    """The numbered JSON messages in one folder (the inbox or the outbox), parsed once each.

    Messages are written once and never change (a re-publish writes identical content), so a
    parsed message is cached by file name and size. Malformed files (and a file holding another
    number's message) are not returned but listed in :attr:`problems`: a hand-edited or foreign
    file must not stop the daemon or the job, nor go unsaid.
    """

    def __init__(self, folder: Path, pattern: re.Pattern[str], model: type[M], kind: str):
        self.folder = folder
        self.pattern = pattern
        self.model = model
        #: ``update`` or ``ack``, for problem reports.
        self.kind = kind
        #: The malformed messages above ``after`` seen by the last :meth:`read`.
        self.problems: list[MessageProblem] = []
        self._cache: dict[str, tuple[int, BaseModel | MessageProblem | None]] = {}

    def read(self, after: int = 0) -> dict[int, M]:
        """Messages with a sequence number above ``after``, by sequence number."""
        self.problems = []
        try:
            entries = list(os.scandir(self.folder))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        out: dict[int, M] = {}
        for entry in entries:
            m = self.pattern.match(entry.name)
            if not m or int(m.group(1)) <= after:
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            hit = self._cache.get(entry.name)
            if hit is None or hit[0] != size:
                hit = (size, self._parse(Path(entry.path), int(m.group(1))))
                self._cache[entry.name] = hit
            msg = hit[1]
            if isinstance(msg, MessageProblem):
                self.problems.append(msg)
            elif msg is not None:
                out[int(m.group(1))] = msg  # type: ignore[assignment]
        return out

    def _parse(self, path: Path, seq: int) -> BaseModel | MessageProblem | None:
        text = read_text(path)
        if text is None:
            return None  # removed meanwhile
        where = f"file {path.parent.name}/{path.name}"
        return parse_message(self.model, text, where, self.kind, seq)


def read_seq(path: Path) -> int:
    text = read_text(path)
    try:
        return int((text or "0").strip() or 0)
    except ValueError:
        return 0


def process_alive(pid: int, host: str, this_host: Callable[[], str] = socket.gethostname) -> bool | None:
    """Whether a process still runs: True/False on this host, None (unknown) for another host."""
    if not pid or host != this_host():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
