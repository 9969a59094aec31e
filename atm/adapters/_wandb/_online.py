"""Online W&B runs (``entity/project/run_id``) through the public API: metrics in, updates out.

Reading: one run query per poll gives the state, ``historyKeys`` (the last step and every
key's value types) and the summary (whose ``_timestamp`` is when the job last logged); only when
the last step moved is each numeric key scanned, one key per ``scan_history(keys=[k],
min_step=...)`` (several keys in one scan return only the rows that hold all of them), from just
after the last step already read. Given ``select``, only the keys it picks and ``atm/*`` are
scanned; a key picked later is scanned from its start then.

Delivering updates: each update is uploaded as a run file, ``atm/inbox/update-NNNNNN.json``, and
the job's listener lists ``atm/inbox/update-%`` files through the public API and downloads the new
ones. Why files, not the run's config, summary or tags: the live process owns those and writes
them back whole (wandb issue 4377: config or summary edited through the API is overwritten by the
running job; the job also re-sends its full tag list whenever it changes tags, and atm's listener
does exactly that to name the latest interventions). A run file written by the daemon is one the
job never has locally, so the job neither overwrites nor deletes it. The file listing is the
pointer: its names carry the sequence numbers, so a poll is one small query and a download
happens only for an update not seen yet. Acks and the listener's state go the other way as files
the job saves into its own run (``files/atm/outbox/...``, ``files/atm/listener.json``, uploaded
at once with ``run.save(policy="now")``); the daemon reads them from the same listing.

Pacing: W&B allows about 2 requests/s per run; calls for one run are spaced ``min_interval``
apart, and a 429 answer is retried after ``Retry-After`` (or 1, 2, 4 s) before it is reported as
:class:`~atm.adapters.base.BackendUnavailable`. Every API object is built with ``timeout=``, so a
dead server or slow credential check fails within that time instead of wandb's ~20 s default.

Not exercised against a live W&B server here (none is reachable from the test machine): the
tests drive this module through recorded-shape fakes of the public API (``FakeWandbApi``).
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from atm.adapters.base import (
    LOG_ARTIFACT,
    BackendError,
    BackendUnavailable,
    KeySelector,
    MessageMemo,
    MessageProblem,
    PointSeries,
    RunMessages,
    RunNotFound,
    RunView,
    Timeline,
    highest_taken,
    parse_message,
    records_from_jsonl,
    records_to_jsonl,
    verified,
)
from atm.adapters._wandb._local import LISTENER_FILE, approval_name, update_name
from atm.schema import Ack, Approval, DecisionRecord, ListenerInfo, Status, Update
from atm.signing import KeySource, sign

log = logging.getLogger("atm.wandb")

T = TypeVar("T")

INBOX_PREFIX = "atm/inbox/"
OUTBOX_PREFIX = "atm/outbox/"
LISTENER_NAME = "atm/" + LISTENER_FILE
SEQ_NAME = "atm/seq"
UPDATE_NAME_RE = re.compile(r"^atm/inbox/update-(\d+)\.json$")
ACK_NAME_RE = re.compile(r"^atm/outbox/ack-(\d+)\.json$")
APPROVALS_PREFIX = "atm/approvals/"
APPROVAL_NAME_RE = re.compile(r"^atm/approvals/approval-(\d+)\.json$")
RUN_PATH_RE = re.compile(r"^[^/\s]+/[^/\s]+/[^/\s]+$")

#: W&B run states -> the words RunView uses.
STATES = {
    "running": "RUNNING",
    "pending": "RUNNING",
    "preempting": "RUNNING",
    "finished": "FINISHED",
    "failed": "FAILED",
    "crashed": "KILLED",
    "killed": "KILLED",
    "preempted": "KILLED",
}


def is_run_path(spec: str) -> bool:
    """Whether ``--run`` names an online run (``entity/project/run_id``)."""
    return RUN_PATH_RE.match(spec) is not None


# --------------------------------------------------------------------------- errors and pacing


def _status_code(exc: BaseException) -> int | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        for holder in (cur, getattr(cur, "exc", None)):
            response = getattr(holder, "response", None)
            code = getattr(response, "status_code", None) or getattr(holder, "status_code", None)
            if isinstance(code, int):
                return code
        cur = getattr(cur, "exc", None) or cur.__cause__
    m = re.search(r"\bHTTP (\d{3})\b", str(exc))
    return int(m.group(1)) if m else None


def is_rate_limited(exc: BaseException) -> bool:
    return _status_code(exc) == 429 or "rate limit" in str(exc).lower()


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None) or getattr(getattr(exc, "exc", None), "response", None)
    value = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


_UNREACHABLE = re.compile(r"connection refused|dial tcp|no such host|timed? ?out|did not respond|giving up", re.I)


def translate(what: str, exc: BaseException) -> BackendError:
    """Map a public-API error onto the backend contract, with what to do about it."""
    name = type(exc).__name__
    text = str(exc) or name
    if isinstance(exc, BackendError):
        return exc
    if name == "UsageError" and "api key" in text.lower():
        return RunNotFound(
            f"{what}: no W&B API key. Set WANDB_API_KEY (and WANDB_BASE_URL for a private server) or run "
            "`wandb login`; for an offline run pass its directory or id with --wandb-dir instead."
        )
    if isinstance(exc, ServerUnreachable):
        return RunNotFound(
            f"{what}: could not reach the W&B server ({text}). "
            "Check WANDB_BASE_URL and the network; for an offline run pass its directory or id with --wandb-dir."
        )
    if name == "AuthenticationError":
        if _UNREACHABLE.search(text):
            return RunNotFound(
                f"{what}: could not reach the W&B server to check the credentials ({text}). "
                "Check WANDB_BASE_URL and the network; for an offline run pass its directory or id with --wandb-dir."
            )
        return RunNotFound(f"{what}: W&B did not accept the credentials ({text}). Check WANDB_API_KEY and WANDB_BASE_URL.")
    code = _status_code(exc)
    if name == "RunNotFoundError" or code == 404 or re.search(r"could not find|not found", text, re.I):
        return RunNotFound(f"{what}: {text}")
    if code in (401, 403):
        return RunNotFound(f"{what}: W&B refused access (HTTP {code}); check WANDB_API_KEY and the run path.")
    return BackendUnavailable(f"{what}: {text}")


class Pacer:
    """Spaces one run's API calls ``min_interval`` apart and retries rate-limited ones. Thread-safe."""

    def __init__(
        self,
        min_interval: float = 0.5,
        retries: int = 3,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if min_interval < 0:
            raise ValueError(f"min_interval must be >= 0, got {min_interval}")
        self.min_interval = min_interval
        self.retries = retries
        self.clock = clock
        self.sleep = sleep
        self.calls = 0
        self._next = 0.0
        self._lock = threading.Lock()

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (one API request) in turn. Raises RunNotFound or BackendUnavailable."""
        for attempt in range(self.retries + 1):
            with self._lock:
                wait = self._next - self.clock()
                if wait > 0:
                    self.sleep(wait)
                self._next = self.clock() + self.min_interval
                self.calls += 1
            try:
                return fn()
            except Exception as exc:
                if is_rate_limited(exc) and attempt < self.retries:
                    delay = _retry_after(exc) or float(2**attempt)
                    log.info("%s: W&B rate limit; retrying in %.0f s", what, delay)
                    self.sleep(delay)
                    continue
                error = translate(what, exc)
                if is_rate_limited(exc):
                    error = BackendUnavailable(f"{what}: W&B kept answering 429 (rate limit) after {self.retries} retries")
                raise error from exc
        raise AssertionError("unreachable")


class ApiHandle:
    """A lazily built ``wandb.Api`` shared by the runs of one backend or channel."""

    def __init__(self, factory: Callable[[], Any]):
        self._factory = factory
        self._api: Any = None
        self._lock = threading.Lock()

    def get(self, what: str) -> Any:
        with self._lock:
            if self._api is None:
                try:
                    self._api = self._factory()
                except Exception as exc:
                    raise translate(what, exc) from exc
            return self._api


#: wandb-core's GraphQL retries for the daemon's API calls. Unset, wandb-core retries a dead
#: server for hours, and the process then cannot exit: wandb's exit hook waits for its service
#: process, which is still retrying. The daemon polls again anyway, so a few retries are enough.
GRAPHQL_RETRIES = 2


class ServerUnreachable(Exception):
    """The W&B server gave no HTTP answer at all (refused, unresolvable, silent)."""


def probe_server(base_url: str, timeout: float) -> None:
    """Raise :class:`ServerUnreachable` unless ``base_url`` answers HTTP (any status) within ``timeout``.

    Checked before ``wandb.Api`` exists: once wandb-core is asked and the server is down, wandb-core
    keeps retrying in the background, and wandb's exit hook then waits for it (minutes to hours,
    retry limit or not), so a daemon that should fail in seconds could not exit.
    """
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(base_url, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # it answered: whatever the status, the server is there
    except (OSError, ValueError) as exc:  # URLError, timeouts, resets; ValueError: not a URL
        reason = getattr(exc, "reason", None) or exc
        raise ServerUnreachable(f"{base_url}: {reason}") from exc


def default_api_factory(timeout: float) -> Callable[[], Any]:
    def make() -> Any:
        import wandb
        from wandb.sdk import wandb_setup

        # Only in a process without a live run (the daemon, `atm history`): a training job's own
        # wandb settings are the user's, and its run keeps the copy it started with anyway.
        if wandb.run is None:
            settings = wandb_setup.singleton().settings
            probe_server(settings.base_url, timeout)
            if settings.x_graphql_retry_max is None:
                wandb.setup(settings=wandb.Settings(x_graphql_retry_max=GRAPHQL_RETRIES))
        return wandb.Api(timeout=int(math.ceil(timeout)))

    return make


# --------------------------------------------------------------------------- file helpers


def _download_text(file: Any) -> str:
    with tempfile.TemporaryDirectory(prefix="atm-wandb-") as tmp:
        fh = file.download(root=tmp, replace=True)
        try:
            return fh.read()
        finally:
            fh.close()


def _upload_text(run: Any, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory(prefix="atm-wandb-") as tmp:
        path = Path(tmp) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        run.upload_file(str(path), root=tmp)


def _file_version(file: Any) -> str:
    return str(getattr(file, "md5", "") or getattr(file, "updated_at", "") or getattr(file, "size", ""))


# --------------------------------------------------------------------------- daemon side


class OnlineRun:
    """The daemon's view of one online run. Not thread-safe: one daemon thread per run."""

    def __init__(self, path: str, api: ApiHandle, pacer: Pacer | None = None, scan_page_size: int = 1000,
                 keys: KeySource | None = None):
        self.path = path
        self.keys = keys or KeySource()
        self.api = api
        self.pacer = pacer or Pacer()
        self.scan_page_size = scan_page_size
        self.history: dict[str, PointSeries] = {}
        self.last_time = 0.0
        self.timeline = Timeline()
        #: key -> last step read.
        self._read_through: dict[str, int] = {}
        self._run: Any = None
        self._versions: dict[str, str] = {}
        self._updates: dict[int, Update] = {}
        self._acks: dict[int, Ack] = {}
        self._approvals: dict[int, Approval] = {}
        self._listener: ListenerInfo | None = None
        self._seq = 0
        self._log_listed = False
        #: file name -> why it was not taken (malformed, or filed under another number).
        self._problems: dict[str, MessageProblem] = {}
        #: The messages' signature checks so far: a poll checks only the new ones.
        self._checked = MessageMemo()

    def _refresh(self) -> Any:
        if self._run is None:
            api = self.api.get(f"W&B run {self.path}")
            self._run = self.pacer.call(f"W&B run {self.path}", lambda: api.run(self.path))
        else:
            run = self._run
            self.pacer.call(f"W&B run {self.path}", lambda: run.load(force=True))
        return self._run

    def poll(self, run_id: str, select: KeySelector | None = None) -> RunView:
        run = self._refresh()
        last_step, keys = self._history_keys(run)
        wanted = None if select is None else set(select(keys))
        moved = False
        for key in keys:
            if wanted is not None and key not in wanted and not key.startswith("atm/"):
                continue  # not scanned at all; scanned from its start if a later poll picks it
            if self._read_through.get(key, -1) < last_step:
                moved |= self._scan(run, key, last_step)
        self.last_time = max(self.last_time, _summary_time(run))
        self._read_messages(run)
        taken = [*self._updates, *(p.seq for p in self._problems.values() if p.kind == "update" and p.seq is not None)]
        msgs = verified(
            RunMessages(dict(self._updates), dict(self._acks), self._listener, highest_taken([self._seq, *taken]),
                        list(self._problems.values()), list(self._approvals.values())),
            self.keys.get_or_none(), key_problem=self.keys.problem, run_id=self.path, memo=self._checked,
        )
        return RunView(
            run_id=run_id,
            name=str(getattr(run, "display_name", None) or getattr(run, "name", "") or ""),
            status=STATES.get(str(run.state).lower(), "RUNNING"),
            history=self.history,
            last_metric_time=self.last_time,
            moved=moved,
            listener=msgs.listener,
            acks=msgs.acks,
            updates=msgs.updates,
            last_seq=msgs.seq,
            timeline=self.timeline.points,
            problems=msgs.problems,
            approvals=msgs.approvals,
            keys=keys,
        )

    def _history_keys(self, run: Any) -> tuple[int, list[str]]:
        try:
            info = run.history_keys
        except AttributeError:
            info = None
        if not isinstance(info, dict):
            info = {}
        last = info.get("lastStep")
        if not isinstance(last, int):
            last = self.pacer.call(f"W&B run {self.path} last step", lambda: run.lastHistoryStep)
        keys = [k for k, v in (info.get("keys") or {}).items() if _numeric_key(k, v)]
        return int(last), sorted(keys)

    def _scan(self, run: Any, key: str, last_step: int) -> bool:
        start = self._read_through.get(key, -1) + 1
        rows = self.pacer.call(
            f"W&B history {key}",
            lambda: list(run.scan_history(keys=[key], min_step=start, page_size=self.scan_page_size, use_cache=False)),
        )
        pts = self.history.setdefault(key, PointSeries())
        added = 0
        logged: list[tuple[float, int]] = []
        for row in rows:
            step, value = row.get("_step"), row.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not isinstance(step, (int, float)):
                continue
            if pts and int(step) <= pts[-1][0]:
                continue  # a page boundary or a repeated scan: never count a point twice
            pts.append((int(step), float(value)))
            added += 1
            ts = row.get("_timestamp")
            if isinstance(ts, (int, float)):
                self.last_time = max(self.last_time, float(ts))
                if not key.startswith("atm/"):
                    logged.append((float(ts), int(step)))
        self.timeline.add(logged)
        # Rows up to the last step are complete once the server reports that step.
        self._read_through[key] = last_step
        return added > 0

    def _read_messages(self, run: Any) -> None:
        files = self.pacer.call(f"W&B files of {self.path}", lambda: list(run.files(pattern="atm/%")))
        for f in files:
            name = str(f.name)
            version = _file_version(f)
            if name == LOG_ARTIFACT:
                self._log_listed = True
            if self._versions.get(name) == version:
                continue
            if (UPDATE_NAME_RE.match(name) or ACK_NAME_RE.match(name) or APPROVAL_NAME_RE.match(name)
                    or name in (LISTENER_NAME, SEQ_NAME)):
                text = self.pacer.call(f"W&B file {name}", lambda f=f: _download_text(f))
                self._versions[name] = version
                self._take(name, text)

    def _take(self, name: str, text: str) -> None:
        self._problems.pop(name, None)
        numbered = UPDATE_NAME_RE.match(name) or ACK_NAME_RE.match(name)
        got: Any
        if numbered and UPDATE_NAME_RE.match(name):
            got = parse_message(Update, text, f"file {name}", "update", int(numbered.group(1)))
            if isinstance(got, Update):
                self._updates[got.seq] = got
            else:
                self._updates.pop(int(numbered.group(1)), None)  # replaced by something else
        elif (answered := APPROVAL_NAME_RE.match(name)) is not None:
            got = parse_message(Approval, text, f"file {name}", "approval", int(answered.group(1)))
            if isinstance(got, Approval):
                self._approvals[got.seq] = got
        elif numbered:
            got = parse_message(Ack, text, f"file {name}", "ack", int(numbered.group(1)))
            if isinstance(got, Ack):
                self._acks[got.seq] = got
        elif name == LISTENER_NAME:
            got = parse_message(ListenerInfo, text, f"file {name}", "listener", None)
            if isinstance(got, ListenerInfo):
                self._listener = got
        else:  # SEQ_NAME
            try:
                self._seq = int(text.strip() or 0)
                got = None
            except ValueError:
                got = MessageProblem(f"file {name}", f"is not a number ({text[:40]!r}); ignored", "seq")
        if isinstance(got, MessageProblem):
            self._problems[name] = got

    def reserve_seq(self, seq: int) -> None:
        self._upload(SEQ_NAME, str(seq))
        self._seq = max(self._seq, seq)

    def publish(self, record: DecisionRecord) -> None:
        if record.status == Status.PENDING:
            update = sign(record.to_update(), self.keys.get())
            self._upload(INBOX_PREFIX + update_name(record.seq), update.model_dump_json())
            self._updates[record.seq] = update

    def write_log(self, records: Sequence[DecisionRecord]) -> None:
        self._upload(LOG_ARTIFACT, records_to_jsonl(records, self.keys.get()))
        self._log_listed = True

    def write_approval(self, approval: Approval) -> None:
        signed = sign(approval.model_copy(update={"run_id": self.path}), self.keys.get())
        self._upload(APPROVALS_PREFIX + approval_name(approval.seq), signed.model_dump_json())

    def read_log(self) -> list[DecisionRecord]:
        run = self._refresh()
        files = self.pacer.call(f"W&B file {LOG_ARTIFACT}", lambda: list(run.files(names=[LOG_ARTIFACT])))
        files = [f for f in files if str(f.name) == LOG_ARTIFACT and getattr(f, "size", 1)]
        if not files:
            return []
        text = self.pacer.call(f"W&B file {LOG_ARTIFACT}", lambda: _download_text(files[0]))
        return records_from_jsonl(text)

    def _upload(self, name: str, text: str) -> None:
        run = self._run if self._run is not None else self._refresh()
        self.pacer.call(f"upload {name} to W&B run {self.path}", lambda: _upload_text(run, name, text))


def _summary_time(run: Any) -> float:
    """When the job last logged a row, by the run's summary (``_timestamp``, seconds): of every key, scanned
    or not; 0 when the summary does not say."""
    try:
        summary = run.summary_metrics
    except AttributeError:
        return 0.0
    ts = summary.get("_timestamp") if isinstance(summary, dict) else None
    return float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0.0


def _numeric_key(key: str, info: Any) -> bool:
    if key.startswith("_") or key.startswith("system/"):
        return False
    counts = info.get("typeCounts") if isinstance(info, dict) else None
    if not counts:
        return True  # no type information: let the scan decide
    return any(c.get("type") == "number" for c in counts if isinstance(c, dict))


def online_runs(project_path: str, api: ApiHandle, pacer: Pacer, *, running: bool) -> list[str]:
    """``entity/project/run_id`` of the runs of ``entity/project``, oldest first: the running ones, or
    (``running=False``) every one."""
    wandb_api = api.get(f"W&B project {project_path}")
    filters = {"state": "running"} if running else None
    runs = pacer.call(
        f"W&B project {project_path}",
        lambda: list(wandb_api.runs(project_path, filters=filters, order="+created_at", per_page=100)),
    )
    return [f"{project_path}/{r.id}" for r in runs]


# --------------------------------------------------------------------------- listener side


class RemoteInbox:
    """The listener's view of updates uploaded to its online run by a daemon on another machine.

    Lists the run's inbox files at most every ``min_interval`` seconds (the listener may ask more
    often) and downloads each new update once.
    """

    def __init__(self, path: str, api: ApiHandle, min_interval: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.api = api
        self.min_interval = min_interval
        self.clock = clock
        self.pacer = Pacer(min_interval=0.5, retries=1)
        self._updates: dict[int, Update] = {}
        #: file name -> version downloaded (malformed ones too, so they are not fetched again).
        self._seen: dict[str, str] = {}
        #: Malformed update files, by name: reported by the listener once each.
        self._problems: dict[str, MessageProblem] = {}
        self._last = -math.inf
        self._run: Any = None

    def fetch(self, after: int) -> dict[int, Update]:
        now = self.clock()
        if now - self._last >= self.min_interval:
            self._last = now
            self._list(after)
        return {s: u for s, u in self._updates.items() if s > after}

    def _list(self, after: int) -> None:
        if self._run is None:
            api = self.api.get(f"W&B run {self.path}")
            self._run = self.pacer.call(f"W&B run {self.path}", lambda: api.run(self.path))
        run = self._run
        files = self.pacer.call(f"W&B inbox of {self.path}", lambda: list(run.files(pattern=INBOX_PREFIX + "update-%")))
        for f in files:
            m = UPDATE_NAME_RE.match(str(f.name))
            if not m or int(m.group(1)) <= after or self._seen.get(str(f.name)) == _file_version(f):
                continue
            text = self.pacer.call(f"W&B file {f.name}", lambda f=f: _download_text(f))
            self._seen[str(f.name)] = _file_version(f)
            got = parse_message(Update, text, f"file {f.name} on W&B run {self.path}", "update", int(m.group(1)))
            if isinstance(got, MessageProblem):
                self._problems[str(f.name)] = got
                self._updates.pop(int(m.group(1)), None)
                continue
            self._problems.pop(str(f.name), None)
            self._updates[got.seq] = got

    @property
    def problems(self) -> list[MessageProblem]:
        """Malformed update files seen so far (the listener reports each once)."""
        return list(self._problems.values())


__all__ = [
    "ACK_NAME_RE",
    "ApiHandle",
    "OnlineRun",
    "Pacer",
    "RemoteInbox",
    "default_api_factory",
    "is_run_path",
    "online_runs",
    "translate",
]
