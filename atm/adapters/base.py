"""The tracker contracts: :class:`Backend` for the daemon, :class:`Channel` for the in-job listener.

Rules every implementation keeps:

- Errors from the tracker library are translated at this edge: :class:`RunNotFound` for a run
  that does not exist, :class:`BackendUnavailable` for anything worth retrying (server down,
  timeouts, rate limits), chained with ``from exc``. Nothing else escapes.
- Reads are incremental: a backend keeps what it already read per run and key and fetches only
  what is new.
- Writes are idempotent by ``seq``: publishing the same update twice leaves one update.
- Thread safety: a Backend is used by the daemon's poll workers at once, each run by one worker
  at a time; a Channel by the listener's own thread only.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from atm.schema import Ack, DecisionRecord, ListenerInfo, Update

Points = list[tuple[int, float]]

# Keys shared by every backend's run-side representation (tags on MLflow, files on W&B).
UPDATE_PREFIX = "atm.update."
ACK_PREFIX = "atm.ack."
LISTENER_KEY = "atm.listener"
SEQ_KEY = "atm.seq"
LATEST_KEY = "atm.latest"
LOG_ARTIFACT = "atm/interventions.jsonl"
#: A W&B run folder, ``offline-run-20260101_120000-abc123`` or ``run-20260101_120000-abc123``: its
#: time and run id. Here rather than in the W&B backend, which imports ``wandb``, so that naming a
#: run (the daemon's status lines) does not.
WANDB_RUN_DIR_RE = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")


class BackendError(RuntimeError):
    """Base of the errors a backend raises."""


class RunNotFound(BackendError):
    """The run does not exist (or is not visible with these credentials)."""


class BackendUnavailable(BackendError):
    """The tracker could not be reached or refused for now; worth retrying later."""


class PoolExhausted(BackendUnavailable):
    """The tracker answers, but this process ran out of connections to it (more calls at once than
    its client's pool allows). Retried like an outage; its message says which setting to raise."""


class Timeline:
    """When the job logged its most recent points: (wall time, step), oldest first, at most ``keep``.

    The job's clock stamps both its metric points and its listener's acks, so an ack's wall time
    places a change on the run's own step axis, whatever the listener counts (optimizer steps, a
    W&B job that logs without ``step=``, an epoch axis). ``atm/*`` points are the listener's own
    and are not added.
    """

    def __init__(self, keep: int = 20_000) -> None:
        self.keep = keep
        self.points: list[tuple[float, int]] = []

    def add(self, batch: Sequence[tuple[float, int]]) -> None:
        if not batch:
            return
        tail = self.points[-1][0] if self.points else float("-inf")
        self.points.extend(batch)
        if min(t for t, _ in batch) < tail or len(batch) > 1:
            self.points.sort(key=lambda p: p[0])  # nearly sorted: linear
        del self.points[: max(0, len(self.points) - self.keep)]


@dataclass
class RunView:
    """What the daemon knows about one run after a poll."""

    run_id: str
    name: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED (tracker's words, upper case)
    #: Metric key -> all points read so far, sorted by step.
    history: Mapping[str, Points]
    #: Wall time (seconds) of the newest metric point; 0 when none.
    last_metric_time: float
    #: Whether anything new arrived since the previous poll.
    moved: bool
    listener: ListenerInfo | None = None
    acks: dict[int, Ack] = field(default_factory=dict)
    updates: dict[int, Update] = field(default_factory=dict)
    last_seq: int = 0
    #: (wall time on the job's clock, step) of the newest points logged, oldest first: see :class:`Timeline`.
    timeline: Sequence[tuple[float, int]] = ()


class Backend(Protocol):
    """The daemon's view of a tracker."""

    name: str

    def running_runs(self, experiment: str) -> list[str]:
        """IDs of the RUNNING runs of an experiment (by name)."""
        ...

    def poll(self, run_id: str) -> RunView:
        """Read what is new for a run (metrics, listener state, acks, published updates)."""
        ...

    def publish(self, record: DecisionRecord) -> None:
        """Make a decision visible: the update message (if it is one) and the summary tags."""
        ...

    def write_log(self, run_id: str, records: Sequence[DecisionRecord]) -> None:
        """Replace the run's decision log (``atm/interventions.jsonl``) with ``records``."""
        ...

    def read_log(self, run_id: str) -> list[DecisionRecord]:
        """The run's decision log as last written; empty when there is none."""
        ...

    def reserve_seq(self, run_id: str, seq: int) -> None:
        """Record that ``seq`` is taken, before anything with that number is written."""
        ...


class Channel(Protocol):
    """The listener's view of its own run."""

    run_id: str

    def announce(self, info: ListenerInfo) -> None: ...

    def fetch(self, after_seq: int) -> list[Update]:
        """Published updates with ``seq > after_seq``, in ascending order."""
        ...

    def acked(self) -> dict[int, Ack]:
        """Acks already written for this run (a restarted listener resumes after them)."""
        ...

    def ack(self, ack: Ack) -> None: ...

    def log_values(self, values: Mapping[str, float], step: int | None) -> None:
        """Log applied values as metrics (``atm/<name>``) at the job's step."""
        ...

    def close(self) -> None: ...


def update_key(seq: int) -> str:
    return f"{UPDATE_PREFIX}{seq:06d}"


def ack_key(seq: int) -> str:
    return f"{ACK_PREFIX}{seq:06d}"


def parse_messages(tags: Mapping[str, str]) -> tuple[dict[int, Update], dict[int, Ack], ListenerInfo | None, int]:
    """Split a run's key/value state into updates, acks, listener info and the reserved seq.

    Malformed entries are skipped: a hand-edited tag must not stop the daemon or the job.
    """
    updates: dict[int, Update] = {}
    acks: dict[int, Ack] = {}
    listener = None
    for key, value in tags.items():
        try:
            if key.startswith(UPDATE_PREFIX):
                u = Update.model_validate_json(value)
                updates[u.seq] = u
            elif key.startswith(ACK_PREFIX):
                a = Ack.model_validate_json(value)
                acks[a.seq] = a
            elif key == LISTENER_KEY:
                listener = ListenerInfo.model_validate_json(value)
        except ValueError:
            continue
    try:
        seq = int(tags.get(SEQ_KEY, "0"))
    except ValueError:
        seq = 0
    seq = max([seq, *updates])
    return updates, acks, listener, seq


def records_to_jsonl(records: Sequence[DecisionRecord]) -> str:
    return "".join(r.model_dump_json() + "\n" for r in records)


def records_from_jsonl(text: str) -> list[DecisionRecord]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(DecisionRecord.model_validate(json.loads(line)))
        except ValueError:
            # A torn last line (killed mid-write) must not lose the rest of the log.
            continue
    return out
