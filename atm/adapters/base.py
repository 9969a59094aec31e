"""The tracker contracts: :class:`Backend` for the daemon, :class:`Channel` for the in-job listener.

Rules every implementation keeps:

- Errors from the tracker library are translated at this edge: :class:`RunNotFound` for a run
  that does not exist, :class:`BackendUnavailable` for anything worth retrying (server down,
  timeouts, rate limits), chained with ``from exc``. Nothing else escapes.
- Reads are incremental: a backend keeps what it already read per run and key and fetches only
  what is new. It keeps each metric as a :class:`PointSeries`, which the daemon releases once
  folded (a series rewritten after that, by a resumed job, is read whole again).
- Reads are selective: :meth:`Backend.poll` given ``select`` reads only the metric keys it picks
  (and every ``atm/*`` key, the listener's own); a key it leaves out costs no request. A key picked
  for the first time is read from its start. ``RunView.keys`` and ``last_metric_time`` cover
  every key, read or not.
- Writes are idempotent by ``seq``: publishing the same update twice leaves one update.
- Messages are signed at this edge (:mod:`atm.signing`): a backend signs the updates it publishes
  and the records it logs, a channel signs its acks, with the key given to it or resolved from the
  environment on first use. A backend's :meth:`Backend.poll` returns only updates and acks that
  check with its key; everything else on the run (malformed, unsigned, foreign) is listed in
  ``RunView.problems``. A channel returns what parses and lists the rest in its ``problems``; the
  listener checks signatures itself, so it can acknowledge what it refuses and why. With no key to
  sign with, publishing and logging raise :class:`atm.signing.KeyUnavailable` (a setting to fix, not
  worth retrying; the daemon should resolve the key when it starts and pass it in).
- Thread safety: a Backend is used by the daemon's poll workers at once, each run by one worker
  at a time; a Channel by the listener's own thread only.
"""

from __future__ import annotations

import bisect
import json
import re
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pydantic import BaseModel

from atm.schema import Ack, Approval, DecisionRecord, ListenerInfo, Update
from atm.signing import SignatureCheck, SigningKey, sign, verify

M = TypeVar("M", bound=BaseModel)
U = TypeVar("U", Update, Ack)

Points = Sequence[tuple[int, float]]

#: Given every metric key a run has, the keys to read (see :meth:`Backend.poll`).
KeySelector = Callable[[Sequence[str]], Collection[str]]


class HistoryTrimmed(LookupError):
    """Points a :class:`PointSeries` no longer holds were asked for: its owner released them after
    folding them (:meth:`PointSeries.release`). Whoever needs a whole series again (a series that
    was rewritten, a metric that became mapped late) must read the run anew: ``Backend.forget``."""


class PointSeries(Sequence[tuple[int, float]]):
    """A metric's points, ``(step, value)`` in step order, kept in two typed arrays: 16 bytes a point
    where a list of tuples takes about 100.

    A backend appends what each poll reads; the daemon, once it has folded them into its running
    statistics, releases all but the newest (:meth:`release`), so a run's memory does not grow with
    its length. A released series keeps its length, its first point and its newest points: indexes
    and slices into what it still holds work as before, and touching a released point raises
    :class:`HistoryTrimmed` (never a silently shorter series).
    """

    __slots__ = ("steps", "values", "dropped", "head")

    def __init__(self, points: Iterable[tuple[int, float]] = ()) -> None:
        self.steps = array("q")
        self.values = array("d")
        #: Points released from the front, and the first point ever (what tells a rewritten series).
        self.dropped = 0
        self.head: tuple[int, float] | None = None
        self.extend(points)

    def __len__(self) -> int:
        return self.dropped + len(self.steps)

    def _local(self, i: int) -> int:
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"point {i} of a series of {n}")
        if j < self.dropped:
            raise HistoryTrimmed(f"point {j} was released (the series holds points {self.dropped} to {n - 1})")
        return j - self.dropped

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            start, stop, stride = i.indices(len(self))
            if stride != 1:
                raise ValueError("a PointSeries slices with step 1 only")
            if start < stop and start < self.dropped:
                raise HistoryTrimmed(
                    f"points {start} to {stop - 1} asked for; the series holds {self.dropped} to {len(self) - 1}")
            lo, hi = max(start - self.dropped, 0), max(stop - self.dropped, 0)
            return list(zip(self.steps[lo:hi], self.values[lo:hi]))
        if i == 0 and self.dropped:
            return self.head
        j = self._local(i)
        return self.steps[j], self.values[j]

    def __iter__(self) -> Iterator[tuple[int, float]]:
        if self.dropped:
            raise HistoryTrimmed(f"the series' first {self.dropped} points were released; it cannot be read whole")
        return zip(self.steps, self.values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        held = list(zip(self.steps, self.values))
        return f"PointSeries({held!r}, released={self.dropped})" if self.dropped else f"PointSeries({held!r})"

    def append(self, point: tuple[int, float]) -> None:
        step, value = int(point[0]), float(point[1])
        if self.head is None:
            self.head = (step, value)
        self.steps.append(step)
        self.values.append(value)

    def extend(self, points: Iterable[tuple[int, float]]) -> None:
        for point in points:
            self.append(point)

    def release(self, keep: int) -> None:
        """Let go of all but the newest ``keep`` points (they were folded; see the class notes). Cheap
        when there is little to release: the arrays are cut only once they hold twice ``keep``."""
        excess = len(self.steps) - keep
        if excess > max(keep, 0):
            del self.steps[:excess]
            del self.values[:excess]
            self.dropped += excess

    def drop_above(self, step: int) -> int:
        """Remove the newest held points whose step is past ``step`` (a point from outside the job's
        own steps, :func:`~atm.adapters.mlflow_backend.stray_rows`); returns how many went."""
        n = 0
        while self.steps and self.steps[-1] > step:
            self.steps.pop()
            self.values.pop()
            n += 1
        return n

    def sort_by_step(self) -> None:
        """Put the points in step order (stable: points of one step keep their order)."""
        if self.dropped:
            raise HistoryTrimmed("a released series cannot be sorted whole; read the run anew")
        pairs = sorted(self, key=lambda p: p[0])
        self.steps, self.values = array("q", (s for s, _ in pairs)), array("d", (v for _, v in pairs))
        if pairs:
            self.head = pairs[0]


# Keys shared by every backend's run-side representation (tags on MLflow, files on W&B).
UPDATE_PREFIX = "atm.update."
ACK_PREFIX = "atm.ack."
LISTENER_KEY = "atm.listener"
SEQ_KEY = "atm.seq"
LATEST_KEY = "atm.latest"
#: ``atm.effect.NNNNNN``: what an applied change did, in words, once measured (shown in the tracker's UI).
EFFECT_PREFIX = "atm.effect."
LOG_ARTIFACT = "atm/interventions.jsonl"
#: The highest number of a run's messages the watcher numbers its decisions past. A larger one in a
#: name or in ``atm.seq`` (only another client writes one) is not taken: the watcher's next number,
#: past it, would not fit a tag's name (MLflow: 250 characters) and nothing could be published.
MAX_SEQ = 10**9

#: Run tags a person adds in the tracker's UI to answer a decision held for approval: value ``<seq>``.
APPROVE_KEY = "atm.approve"
REJECT_KEY = "atm.reject"
#: ``atm.approval.NNNNNN``: a signed :class:`~atm.schema.Approval` written by ``atm approve`` / ``atm reject``.
APPROVAL_PREFIX = "atm.approval."
#: A W&B run folder, ``offline-run-20260101_120000-abc123`` or ``run-20260101_120000-abc123``: its
#: time and run id. Here rather than in the W&B backend, which imports ``wandb``, so that naming a
#: run (the daemon's status lines) does not.
WANDB_RUN_DIR_RE = re.compile(r"^(?:offline-)?run-(\d{8}_\d{6})-([A-Za-z0-9_-]+)$")


@dataclass(frozen=True)
class MessageProblem:
    """A message on a run that atm did not take: malformed, not signed with this side's key, or
    filed under another number than its own. Reported, never acted on."""

    #: Where it is: ``tag atm.update.000007``, ``file atm/inbox/update-000007.json``.
    where: str
    reason: str
    #: ``update``, ``ack``, ``listener``, ``seq`` or ``approval``.
    kind: str
    #: The number its name gives, when it has one.
    seq: int | None = None

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}" if self.where else self.reason


@dataclass
class RunMessages:
    """A run's atm messages, split by kind: what :func:`parse_messages` returns."""

    updates: dict[int, Update] = field(default_factory=dict)
    acks: dict[int, Ack] = field(default_factory=dict)
    listener: ListenerInfo | None = None
    #: The highest number taken: the reserved seq, every update's, and any a malformed update's name holds.
    seq: int = 0
    problems: list[MessageProblem] = field(default_factory=list)
    #: Answers to decisions held for approval: signed ones (``atm approve``) and unsigned ones (UI tags).
    approvals: list[Approval] = field(default_factory=list)


class BackendError(RuntimeError):
    """Base of the errors a backend raises."""


class RunNotFound(BackendError):
    """The run does not exist (or is not visible with these credentials)."""


class BackendUnavailable(BackendError):
    """The tracker could not be reached or refused for now; worth retrying later."""


class PoolExhausted(BackendUnavailable):
    """The tracker answers, but this process ran out of connections to it (more calls at once than
    its client's pool allows). Retried like an outage; its message says which setting to raise."""



def release_history(history: Mapping[str, Points], keep: int) -> None:
    """Release all but the newest ``keep`` points of every :class:`PointSeries` in ``history`` (other
    sequences are left as they are): for the daemon, once it has folded them."""
    for pts in history.values():
        if isinstance(pts, PointSeries):
            pts.release(keep)

class Timeline(Sequence[tuple[float, int]]):
    """When the job logged its most recent points: (wall time, step), oldest first, about ``keep``.

    The job's clock stamps both its metric points and its listener's acks, so an ack's wall time
    places a change on the run's own step axis, whatever the listener counts (optimizer steps, a
    W&B job that logs without ``step=``, an epoch axis). ``atm/*`` points are the listener's own
    and are not added. Metrics logged together (one ``log_batch``, one ``wandb.log``) share one
    entry. Two typed arrays: 16 bytes an entry, where a list of tuples took about 100 (200 runs
    kept 400 MB of them).
    """

    def __init__(self, keep: int = 20_000) -> None:
        self.keep = keep
        self.times = array("d")
        self.steps = array("q")

    @property
    def points(self) -> "Timeline":
        """The entries (this object: a sequence of (time, step))."""
        return self

    def __len__(self) -> int:
        return len(self.times)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        if isinstance(i, slice):
            return list(zip(self.times[i], self.steps[i]))
        return self.times[i], self.steps[i]

    def __iter__(self) -> Iterator[tuple[float, int]]:
        return zip(self.times, self.steps)

    def __reversed__(self) -> Iterator[tuple[float, int]]:
        return zip(reversed(self.times), reversed(self.steps))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    def add(self, batch: Sequence[tuple[float, int]]) -> None:
        if not batch:
            return
        new = sorted((float(t), int(s)) for t, s in batch)
        # Merge with the held entries from the batch's first time on (usually none, or the few of
        # the same log call): the cost is the batch's, not the timeline's.
        i = bisect.bisect_left(self.times, new[0][0])
        merged = sorted([*zip(self.times[i:], self.steps[i:]), *new]) if i < len(self.times) else new
        del self.times[i:]
        del self.steps[i:]
        last = (self.times[-1], self.steps[-1]) if self.times else None
        for t, s in merged:
            if (t, s) != last:
                self.times.append(t)
                self.steps.append(s)
                last = (t, s)
        excess = len(self.times) - self.keep
        if excess > self.keep // 4:  # cut in batches: deleting from an array's front moves the rest
            del self.times[:excess]
            del self.steps[:excess]


@dataclass
class RunView:
    """What the daemon knows about one run after a poll."""

    run_id: str
    name: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED (tracker's words, upper case)
    #: Metric key -> the points read so far, sorted by step: every key, or those a poll's ``select``
    #: picked (and ``atm/*``). A backend keeps them whole until its owner releases the folded ones
    #: (:meth:`PointSeries.release`): the daemon keeps the newest few.
    history: Mapping[str, Points]
    #: Wall time (seconds) of the newest metric point of any key, read or not; 0 when none.
    last_metric_time: float
    #: Whether new points of the keys read arrived since the previous poll.
    moved: bool
    listener: ListenerInfo | None = None
    acks: dict[int, Ack] = field(default_factory=dict)
    updates: dict[int, Update] = field(default_factory=dict)
    last_seq: int = 0
    #: (wall time on the job's clock, step) of the newest points logged, oldest first: see :class:`Timeline`.
    timeline: Sequence[tuple[float, int]] = ()
    #: Messages on the run that were not taken (malformed, unsigned, signed with another key), each
    #: reported by every poll: the daemon says each one once. ``updates`` and ``acks`` hold none of them.
    problems: list[MessageProblem] = field(default_factory=list)
    #: A person's answers to decisions held for approval: those signed with this side's key and
    #: unsigned ones (a tag added in the tracker's UI), which the daemon takes only under stricter
    #: conditions (:mod:`atm.watcher.approval`). Wrongly signed ones are in ``problems`` instead.
    approvals: list[Approval] = field(default_factory=list)
    #: Every metric key the run has, read or not (``atm/*`` too); empty from a backend that does not say,
    #: when the keys of ``history`` are all there is (:func:`metric_keys`).
    keys: Sequence[str] = ()


def metric_keys(view: RunView) -> list[str]:
    """Every metric key the run has: ``view.keys``, or the keys of ``view.history`` when the backend gave none."""
    return list(view.keys) if view.keys else list(view.history)


class Backend(Protocol):
    """The daemon's view of a tracker."""

    name: str

    def running_runs(self, experiment: str) -> list[str]:
        """IDs of the RUNNING runs of an experiment (by name)."""
        ...

    def experiment_runs(self, experiment: str) -> list[str]:
        """IDs of every run of an experiment (by name), running or ended, oldest first (``atm history
        --experiment``). Raises :class:`RunNotFound` when the tracker has no such experiment."""
        ...

    def poll(self, run_id: str, select: KeySelector | None = None) -> RunView:
        """Read what is new for a run (metrics, listener state, acks, published updates).

        ``select``: given every metric key the run has, the keys to read; the others are not read
        at all (``atm/*`` keys always are). None reads every key.
        """
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

    def forget(self, run_id: str) -> None:
        """Drop what is kept for a run the daemon stopped watching (the points read so far); a later poll
        reads it anew. A daemon watching an experiment for months sees thousands of runs end."""
        ...

    def write_approval(self, run_id: str, approval: Approval) -> None:
        """Sign ``approval`` (naming the run as this backend checks it) and put it on the run, where
        :meth:`poll` reads it back in ``RunView.approvals``. One per seq: a later answer replaces it."""
        ...


class Channel(Protocol):
    """The listener's view of its own run.

    ``ack`` signs the ack with the channel's key. ``fetch`` returns every update that parses,
    signed or not (the listener checks signatures and acknowledges what it refuses); a channel may
    also keep ``problems``, the :class:`MessageProblem` list of malformed messages seen by its last
    fetch, which the listener reports once each (and acknowledges as rejected when the name gives a seq).
    """

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


_NUMBERED_TAG = re.compile(r"^(atm\.(?:update|ack)\.)(\d+)$")
_APPROVAL_TAG = re.compile(r"^atm\.approval\.(\d+)$")


def parse_message(model: type[M], text: str, where: str, kind: str, seq: int | None) -> M | MessageProblem:
    """One message, or the problem with it: text that is not a valid ``model``, or a numbered
    message whose own ``seq`` is not the number it is filed under (a copy cannot stand in for
    another number's message). Pure."""
    try:
        msg = model.model_validate_json(text)
    except ValueError as exc:
        first = str(exc).splitlines()
        detail = first[1].strip() if len(first) > 1 else (first[0] if first else "")
        return MessageProblem(where, f"not a valid {kind} ({detail[:200]}); ignored", kind, seq)
    own = getattr(msg, "seq", None)
    if seq is not None and own != seq:
        return MessageProblem(where, f"holds {kind} #{own}, filed under #{seq}; ignored", kind, seq)
    return msg


class MessageMemo:
    """One run's messages as parsed and checked at the polls before: a run holds an update and an ack
    for every decision ever made, and every poll reads them all, so a poll parses (:func:`parse_messages`)
    and checks (:func:`verified`) only those that are new or changed since. A backend keeps one per run."""

    def __init__(self) -> None:
        #: tag -> (its text, what parsing it gave): the same message object while the text is the same.
        self.parsed: dict[str, tuple[str, BaseModel | MessageProblem | None]] = {}
        #: id of a message -> (the message, what it was checked with, the check). The message is held,
        #: so that its id is not another's.
        self.checked: dict[int, tuple[BaseModel, tuple[str | None, str], SignatureCheck]] = {}


def parse_messages(tags: Mapping[str, str], memo: MessageMemo | None = None) -> RunMessages:
    """Split a run's key/value state into updates, acks, listener info and the highest seq taken.

    Malformed entries do not stop the daemon or the job; each is listed in ``problems`` for the
    caller to report. Signatures are not checked here (see :func:`verified`). With ``memo``, a tag
    whose text is the one parsed before gives the message parsed then.
    """
    out = RunMessages()
    taken: list[int] = []
    if memo is not None:
        memo.parsed = {k: v for k, v in memo.parsed.items() if k in tags}
    for key, value in tags.items():
        if not key.startswith("atm."):
            continue
        if key.startswith(UPDATE_PREFIX) and (numbered := _NUMBERED_TAG.match(key)) is not None:
            taken.append(int(numbered.group(2)))
        hit = memo.parsed.get(key) if memo is not None else None
        if hit is not None and hit[0] == value:
            _file(out, hit[1])
            continue
        got = _parse_tag(key, value)
        if memo is not None:
            memo.parsed[key] = (value, got)
        _file(out, got)
    try:
        reserved = int(tags.get(SEQ_KEY, "0"))
    except ValueError:
        reserved = 0
        out.problems.append(MessageProblem(f"tag {SEQ_KEY}", f"is not a number ({tags.get(SEQ_KEY)!r}); ignored", "seq"))
    if reserved > MAX_SEQ:
        out.problems.append(MessageProblem(f"tag {SEQ_KEY}", f"is past the numbers atm uses (a number of {len(str(reserved))} "
                                           "digits); ignored", "seq"))
    out.seq = highest_taken([reserved, *taken])
    return out


def highest_taken(numbers: Iterable[int]) -> int:
    """The highest of ``numbers`` the watcher numbers past: those up to :data:`MAX_SEQ`; 0 for none. Pure."""
    return max((n for n in numbers if n <= MAX_SEQ), default=0)


def _parse_tag(key: str, value: str) -> BaseModel | MessageProblem | None:
    """What one ``atm.*`` tag holds: a message, the problem with it, or None (not a message). Pure."""
    numbered = _NUMBERED_TAG.match(key)
    if key.startswith((UPDATE_PREFIX, ACK_PREFIX)) and numbered is None:
        kind = "update" if key.startswith(UPDATE_PREFIX) else "ack"
        return MessageProblem(f"tag {key}", f"is not an atm {kind} name ({kind} tags are "
                              f"{UPDATE_PREFIX if kind == 'update' else ACK_PREFIX}NNNNNN); ignored", kind)
    if key in (APPROVE_KEY, REJECT_KEY):
        return ui_approval(key, value, f"tag {key}")
    if key.startswith(APPROVAL_PREFIX):
        numbered_approval = _APPROVAL_TAG.match(key)
        return (parse_message(Approval, value, f"tag {key}", "approval", int(numbered_approval.group(1)))
                if numbered_approval else
                MessageProblem(f"tag {key}", f"is not an atm approval name ({APPROVAL_PREFIX}NNNNNN); ignored",
                               "approval"))
    if numbered is not None and numbered.group(1) == UPDATE_PREFIX:
        return parse_message(Update, value, f"tag {key}", "update", int(numbered.group(2)))
    if numbered is not None:
        return parse_message(Ack, value, f"tag {key}", "ack", int(numbered.group(2)))
    if key == LISTENER_KEY:
        return parse_message(ListenerInfo, value, f"tag {key}", "listener", None)
    return None


def _file(out: RunMessages, got: BaseModel | MessageProblem | None) -> None:
    """Put one parsed tag where it belongs in ``out``."""
    if isinstance(got, MessageProblem):
        out.problems.append(got)
    elif isinstance(got, Update):
        out.updates[got.seq] = got
    elif isinstance(got, Ack):
        out.acks[got.seq] = got
    elif isinstance(got, ListenerInfo):
        out.listener = got
    elif isinstance(got, Approval):
        out.approvals.append(got)


def ui_approval(key: str, value: str, where: str) -> Approval | MessageProblem:
    """The answer a person gave by adding ``atm.approve`` or ``atm.reject`` = ``<seq>`` in the
    tracker's UI: an unsigned :class:`Approval`, or the problem with its value. Pure."""
    decision = "approve" if key.endswith("approve") else "reject"
    text = value.strip().lstrip("#")
    if not text.isdigit():
        return MessageProblem(where, f"should be the number of the decision to {decision} (e.g. 7), not {value[:40]!r}; "
                              "ignored", "approval")
    return Approval(seq=int(text), decision=decision, by=f"{where} (tracker UI, unsigned)", created_at=0.0)


def verified(
    messages: RunMessages, key: SigningKey | None, *, key_problem: str = "", run_id: str | None = None,
    memo: MessageMemo | None = None,
) -> RunMessages:
    """``messages`` with only the updates and acks signed with ``key``; the others join ``problems``. Pure
    but for ``memo``, whose checks of the same message objects (a backend's, kept from the poll before)
    are not made again.

    The daemon's side: what it takes for its own updates, and for the job's acks, is what checks and,
    when ``run_id`` is given, names this run (:func:`names_run`): every run of one key signs alike, so a
    signed update or ack copied from another run would otherwise pass for this run's (settle its
    pending update, or pass for another watcher's update and make the daemon step back).
    Approvals: unsigned ones (UI tags) are kept as such, for the daemon's stricter rules; a signed
    one is kept when it checks with ``key`` and, when ``run_id`` is given, names this run as updates
    and acks do (:func:`names_run`: an approval naming the run by its W&B folder, ``.wandb`` file,
    ``entity/project/id`` or bare id counts; a copy from another run does not).
    """
    against = (key.key_id if key is not None else None, key_problem)
    seen: dict[int, tuple[BaseModel, tuple[str | None, str], SignatureCheck]] = {}

    def checked(message: BaseModel) -> SignatureCheck:
        hit = memo.checked.get(id(message)) if memo is not None else None
        if hit is not None and hit[0] is message and hit[1] == against:
            check = hit[2]
        else:
            check = verify(message, key, key_problem=key_problem, here="this watcher")
        seen[id(message)] = (message, against, check)
        return check

    problems = list(messages.problems)
    approvals: list[Approval] = []
    for a in messages.approvals:
        if a.signature is None and a.key_id is None:
            approvals.append(a)
            continue
        check = checked(a)
        if not check:
            problems.append(MessageProblem("", check.reason, "approval", a.seq))
        elif run_id and not names_run(a.run_id, run_id):
            problems.append(MessageProblem("", f"approval #{a.seq} is for run {a.run_id}, not this one: a copy "
                                           "from another run; ignored", "approval", a.seq))
        else:
            approvals.append(a)

    def own(kind: str, given: Mapping[int, U]) -> dict[int, U]:
        taken: dict[int, U] = {}
        for seq, m in given.items():
            check = checked(m)
            if not check:
                problems.append(MessageProblem("", check.reason, kind, seq))
            elif run_id and not names_run(m.run_id, run_id):
                problems.append(MessageProblem("", f"{kind} #{seq} is for run {m.run_id}, not this one: a copy from "
                                               "another run; ignored", kind, seq))
            else:
                taken[seq] = m
        return taken

    updates, acks = own("update", messages.updates), own("ack", messages.acks)
    if memo is not None:
        memo.checked = seen
    return RunMessages(updates=updates, acks=acks, listener=messages.listener, seq=messages.seq, problems=problems,
                       approvals=approvals)


def names_run(named: str, run_id: str) -> bool:
    """Whether a message's ``run_id`` names the run ``run_id``: the same id, or one of them a path ending
    in the other (W&B's ``entity/project/id`` and the bare id a job knows its run by), or a W&B run
    folder or ``.wandb`` file and the run's id (``wandb/offline-run-20260101_120000-abc123`` and
    ``abc123``; a resumed run's folders differ in their time: a watcher restarted on the newer one
    keeps its decisions). Pure."""
    if named == run_id or named.endswith("/" + run_id) or run_id.endswith("/" + named):
        return True
    a, b = _wandb_dir_id(named), _wandb_dir_id(run_id)
    return (a is not None or b is not None) and (a or named) == (b or run_id)


def _wandb_dir_id(spec: str) -> str | None:
    """The run id a W&B run folder or ``.wandb`` file names (``.../offline-run-<time>-<id>[/run-<id>.wandb]``),
    or None for anything else. Pure."""
    parts = spec.rstrip("/").split("/")
    if parts[-1].endswith(".wandb") and len(parts) > 1:
        parts.pop()
    m = WANDB_RUN_DIR_RE.match(parts[-1])
    return m.group(2) if m else None


def records_to_jsonl(records: Sequence[DecisionRecord], key: SigningKey | None = None) -> str:
    """The decision log's text; each record signed with ``key`` when one is given (backends always give it)."""
    return "".join((sign(r, key) if key is not None else r).model_dump_json() + "\n" for r in records)


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
