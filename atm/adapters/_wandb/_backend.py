"""The W&B backend (daemon side) and channel (listener side)."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from atm.adapters.base import (
    BackendError,
    BackendUnavailable,
    KeySelector,
    MessageMemo,
    MessageProblem,
    RunMessages,
    RunNotFound,
    RunView,
    highest_taken,
    records_from_jsonl,
    records_to_jsonl,
    verified,
)
from atm.adapters._wandb._local import (
    ACK_FILE_RE,
    APPROVAL_FILE_RE,
    UPDATE_FILE_RE,
    MessageFolder,
    RunLayout,
    ack_name,
    approval_name,
    default_wandb_dir,
    find_run_dir,
    process_alive,
    read_seq,
    read_text,
    run_dirs,
    update_name,
    write_atomic,
)
from atm.adapters._wandb._online import (
    ApiHandle,
    OnlineRun,
    Pacer,
    RemoteInbox,
    default_api_factory,
    is_run_path,
    online_runs,
)
from atm.adapters._wandb._txlog import LogFormatError, LogTail, RunLog, exit_code_at_end, read_run_record
from atm.adapters._wandb._ui import RunUI
from atm.schema import Ack, Approval, DecisionRecord, ListenerInfo, Status, Update
from atm.signing import KeySource, SigningKey, sign

log = logging.getLogger("atm.wandb")

#: Set to 1 to watch the inbox by polling (network filesystems, where inotify misses other hosts' writes).
POLLING_ENV = "ATM_WANDB_POLLING"
#: Set to 0 to stop an online job's listener from also polling W&B for updates from a remote daemon.
REMOTE_ENV = "ATM_WANDB_REMOTE"
#: Seconds between an online listener's looks at its run's inbox files on the W&B server.
REMOTE_INTERVAL_S = 5.0
#: Seconds a point may have been logged before a read that did not see it yet (it was not on disk):
#: past this, on ``LATE_READS`` reads in a row, the run's flush interval is said once with the fix.
HIDDEN_S = 5.0
LATE_READS = 2
#: The setting that makes wandb write an offline run's transaction log to disk every second.
FLUSH_FIX = ("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1 in the job's environment (or wandb.init(settings="
             "wandb.Settings(x_transaction_log_flush_interval=1)))")


def hidden_for(previous_read: float | None, new_times: Sequence[float]) -> float:
    """How long the oldest of the points a read brought had been logged before the previous read, which
    did not see it: the time wandb held it back before writing it to disk (0 when none). Pure."""
    if previous_read is None or not new_times:
        return 0.0
    return max(0.0, previous_read - min(new_times))


class UnreadableRun(RunNotFound):
    """The run exists but its transaction log is in a format this reader does not know."""


def run_status(exit_code: int | None, listener_alive: bool | None) -> str:
    """A local run's state in RunView's words. Pure.

    An exit record means the job called ``finish`` (or exited through wandb's hooks). A job killed
    by a signal leaves none; when its listener announced a pid on this host and that process is
    gone, the run is over. Otherwise it counts as running, and the daemon's idle rule (no new
    metric for ``limits.idle_minutes``) ends the watch.
    """
    if exit_code is not None:
        return "FINISHED" if exit_code == 0 else "FAILED"
    if listener_alive is False:
        return "KILLED"
    return "RUNNING"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class _LocalRun:
    """The daemon's view of one run directory. Not thread-safe: one daemon thread per run."""

    def __init__(self, layout: RunLayout, keys: KeySource):
        self.layout = layout
        self.keys = keys
        self.tail: LogTail | None = None
        self.state = RunLog()
        self.inbox = MessageFolder(layout.inbox, UPDATE_FILE_RE, Update, "update")
        self.outbox = MessageFolder(layout.outbox, ACK_FILE_RE, Ack, "ack")
        self.approvals = MessageFolder(layout.approvals, APPROVAL_FILE_RE, Approval, "approval")
        #: When this run was last read (this machine's clock), and the reads in a row that brought points
        #: held back from the one before (see :func:`hidden_for`); the lag is said once per run.
        self.read_at: float | None = None
        self.late_reads = 0
        self.noted_lag = False
        #: The messages' signature checks so far: a poll checks only the new ones.
        self.checked = MessageMemo()

    def poll(self, run_id: str, select: KeySelector | None = None) -> RunView:
        """``select`` is not needed here: the transaction log is read whole, every key alike, from the disk."""
        if self.tail is None:
            path = self.layout.transaction_log()
            if path is None:
                raise RunNotFound(f"{self.layout.run_dir} holds no run-*.wandb transaction log")
            self.tail = LogTail(path)
        newest_before = self.state.last_time
        try:
            added = self.state.apply(self.tail.read())
        except LogFormatError as exc:
            raise UnreadableRun(str(exc)) from exc
        except OSError as exc:
            raise BackendUnavailable(f"reading {self.tail.path}: {exc}") from exc
        self._measure_lag(newest_before, added)
        listener = self.listener()
        updates = self.inbox.read()
        acks = self.outbox.read()
        approvals = list(self.approvals.read().values())
        taken = [*updates, *(p.seq for p in self.inbox.problems if p.seq is not None)]
        msgs = verified(
            RunMessages(updates, acks, listener, highest_taken([read_seq(self.layout.seq_file), *taken]),
                        [*self.inbox.problems, *self.outbox.problems, *self.approvals.problems], approvals),
            self.keys.get_or_none(), key_problem=self.keys.problem, run_id=self.layout.run_id, memo=self.checked,
        )
        alive = process_alive(listener.pid, listener.host) if listener else None
        return RunView(
            run_id=run_id,
            name=self.state.display_name or self.layout.run_id,
            status=run_status(self.state.exit_code, alive),
            history=self.state.history,
            last_metric_time=self.state.last_time,
            moved=added > 0,
            listener=listener,
            acks=msgs.acks,
            updates=msgs.updates,
            last_seq=msgs.seq,
            timeline=self.state.timeline.points,
            problems=msgs.problems,
            approvals=msgs.approvals,
            keys=list(self.state.history),
        )

    def _measure_lag(self, newest_before: float, added: int) -> None:
        """Say once when the job's points reach the disk late: wandb writes an offline run's log every
        15 s by default (or when 32 KiB fill), so decisions would be made on data that old."""
        now = time.time()
        if added:
            new_times = [t for t, _ in self.state.timeline.points[-added:] if t > newest_before]
            hidden = hidden_for(self.read_at, new_times)
            self.late_reads = self.late_reads + 1 if hidden > HIDDEN_S else 0
            if self.late_reads >= LATE_READS and not self.noted_lag and self.state.exit_code is None:
                self.noted_lag = True
                log.warning(
                    "W&B run %s: its metrics reach the disk up to %.0f s after the job logs them (wandb writes an "
                    "offline run's log every 15 s by default), so atm decides on data that old. Set %s and "
                    "restart the job", self.layout.run_id, now - min(new_times), FLUSH_FIX)
        self.read_at = now

    def listener(self) -> ListenerInfo | None:
        text = read_text(self.layout.listener_file)
        if not text:
            return None
        try:
            return ListenerInfo.model_validate_json(text)
        except ValueError:
            return None

    def reserve_seq(self, seq: int) -> None:
        write_atomic(self.layout.seq_file, f"{seq}\n")

    def publish(self, record: DecisionRecord) -> None:
        if record.status == Status.PENDING:
            # The job knows its run by W&B's id, not by the folder or `latest-run` link the daemon was given.
            update = sign(record.to_update(run_id=self.layout.run_id or record.run_id), self.keys.get())
            write_atomic(self.layout.inbox / update_name(record.seq), update.model_dump_json())

    def write_log(self, records: Sequence[DecisionRecord]) -> None:
        write_atomic(self.layout.log_file, records_to_jsonl(records, self.keys.get()))

    def write_approval(self, approval: Approval) -> None:
        signed = sign(approval.model_copy(update={"run_id": self.layout.run_id}), self.keys.get())
        write_atomic(self.layout.approvals / approval_name(approval.seq), signed.model_dump_json())

    def read_log(self) -> list[DecisionRecord]:
        return records_from_jsonl(read_text(self.layout.log_file) or "")


class WandbBackend:
    """The daemon's W&B access: local run directories (offline or online runs on a shared disk) and
    online runs through the public API. One instance may serve many runs.

    Args:
        wandb_dir: the folder holding run directories (``offline-run-*``, ``run-*``); default
            ``$WANDB_DIR/wandb`` or ``./wandb``. A ``--run`` may also be a run directory, its
            ``.wandb`` file, a bare run id found here, or ``entity/project/run_id`` (online).
        idle_seconds: a local run whose transaction log has not grown for this long is not listed
            by :meth:`running_runs` (wandb writes system stats every 15 s while a job lives).
        api_timeout: seconds each W&B API request may take, the credential check included.
        api_factory: builds the ``wandb.Api`` (tests pass a fake); default ``wandb.Api(timeout=...)``.
        min_request_interval: seconds between two API requests for one run (W&B allows ~2/s).
        key: signs what is published and logged, checks what is read; default from the
            environment on first use (:func:`atm.signing.resolve_key`).
    """

    name = "wandb"

    def __init__(
        self,
        wandb_dir: str | os.PathLike[str] | None = None,
        *,
        idle_seconds: float = 300.0,
        api_timeout: float = 10.0,
        api_factory: Callable[[], Any] | None = None,
        min_request_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        key: SigningKey | None = None,
    ):
        if idle_seconds <= 0:
            raise ValueError(f"idle_seconds must be positive, got {idle_seconds}")
        if api_timeout <= 0:
            raise ValueError(f"api_timeout must be positive, got {api_timeout}")
        if min_request_interval < 0:
            raise ValueError(f"min_request_interval must be >= 0, got {min_request_interval}")
        self.wandb_dir = Path(wandb_dir) if wandb_dir else default_wandb_dir()
        self.idle_seconds = idle_seconds
        self.min_request_interval = min_request_interval
        self.clock = clock
        self._api = ApiHandle(api_factory or default_api_factory(api_timeout))
        self.keys = KeySource(key)
        self._runs: dict[str, _LocalRun | OnlineRun] = {}
        self._projects: dict[Path, str] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ discovery

    def _target(self, run_id: str) -> _LocalRun | OnlineRun:
        with self._lock:
            hit = self._runs.get(run_id)
        if hit is not None:
            return hit
        found: _LocalRun | OnlineRun
        run_dir = find_run_dir(run_id, self.wandb_dir)
        if run_dir is not None:
            found = _LocalRun(RunLayout(run_dir.resolve()), self.keys)
        elif is_run_path(run_id):
            found = OnlineRun(run_id, self._api, Pacer(self.min_request_interval), keys=self.keys)
        else:
            if "/" in run_id or os.sep in run_id:
                where = f"{run_id!r} is not a W&B run directory (one holding a run-*.wandb file)"
            else:
                where = f"no offline-run-*-{run_id} or run-*-{run_id} under {self.wandb_dir.resolve()}"
            raise RunNotFound(
                f"no W&B run {run_id!r}: {where}. Pass the run directory, --wandb-dir, or entity/project/run_id "
                "for an online run."
            )
        with self._lock:
            return self._runs.setdefault(run_id, found)

    def running_runs(self, experiment: str) -> list[str]:
        """Run ids of the live runs of a project: local ones by name, online ones as ``entity/project``."""
        if "/" in experiment:
            return online_runs(experiment, self._api, Pacer(self.min_request_interval), running=True)
        out: list[str] = []
        for layout, path in self._local_runs(experiment, idle_after=self.clock() - self.idle_seconds):
            try:
                if exit_code_at_end(path) is not None:
                    continue
            except (OSError, LogFormatError) as exc:
                log.debug("skipping %s: %s", layout.run_dir, exc)
                continue
            info = _LocalRun(layout, self.keys).listener()
            if info is not None and process_alive(info.pid, info.host) is False:
                continue
            if layout.run_id not in out:
                out.append(layout.run_id)
        return out

    def experiment_runs(self, experiment: str) -> list[str]:
        """Every run of a project, ended or not: local ones (under ``wandb_dir``) by id, a resumed run's
        folders once; online ones as ``entity/project/id`` when ``experiment`` is ``entity/project``."""
        if "/" in experiment:
            return online_runs(experiment, self._api, Pacer(self.min_request_interval), running=False)
        out: list[str] = []
        for layout, _ in self._local_runs(experiment):
            if layout.run_id not in out:
                out.append(layout.run_id)
        if not out:
            # A local project exists only through its runs' folders.
            raise RunNotFound(f"no W&B run of project {experiment!r} under {self.wandb_dir.resolve()}; pass --wandb-dir "
                              "(the folder holding the job's offline-run-* folders), or entity/project for online runs")
        return out

    def _local_runs(self, experiment: str, idle_after: float | None = None) -> Iterator[tuple[RunLayout, Path]]:
        """The offline run folders under ``wandb_dir`` of project ``experiment``, with their transaction
        logs; with ``idle_after``, only those whose log was written after that time (checked first: it
        costs a stat, where the project costs reading the log's run record). A folder that cannot be
        read is skipped."""
        for run_dir in run_dirs(self.wandb_dir):
            layout = RunLayout(run_dir)
            path = layout.transaction_log()
            try:
                if path is None or (idle_after is not None and path.stat().st_mtime < idle_after):
                    continue
                if self._project(path) != experiment:
                    continue
            except (OSError, LogFormatError) as exc:
                log.debug("skipping %s: %s", run_dir, exc)
                continue
            yield layout, path

    def _project(self, path: Path) -> str:
        if path not in self._projects:
            record = read_run_record(path)
            if record is None:
                return ""  # not written yet: look again next time
            self._projects[path] = record.project
        return self._projects[path]

    # ------------------------------------------------------------------ the contract

    def poll(self, run_id: str, select: KeySelector | None = None) -> RunView:
        return self._target(run_id).poll(run_id, select)

    def publish(self, record: DecisionRecord) -> None:
        self._write(record.run_id, lambda t: t.publish(record))

    def write_log(self, run_id: str, records: Sequence[DecisionRecord]) -> None:
        self._write(run_id, lambda t: t.write_log(records))

    def read_log(self, run_id: str) -> list[DecisionRecord]:
        target = self._target(run_id)
        try:
            return target.read_log()
        except OSError as exc:
            raise BackendUnavailable(f"reading the decision log of W&B run {run_id}: {exc}") from exc

    def reserve_seq(self, run_id: str, seq: int) -> None:
        self._write(run_id, lambda t: t.reserve_seq(seq))

    def write_approval(self, run_id: str, approval: Approval) -> None:
        self._write(run_id, lambda t: t.write_approval(approval))

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def _write(self, run_id: str, fn: Callable[[Any], None]) -> None:
        target = self._target(run_id)
        try:
            fn(target)
        except BackendError:
            raise
        except OSError as exc:
            raise BackendUnavailable(f"writing to W&B run {run_id}: {exc}") from exc


# --------------------------------------------------------------------------- listener side


class WandbChannel:
    """The listener's W&B access: the run directory's inbox, plus the W&B server for online runs.

    Updates arrive as files in ``<run dir>/atm/inbox`` (from a daemon on this machine or a shared
    disk) and, for an online run, as run files on the W&B server (from a daemon anywhere). The
    inbox is watched with ``watchdog`` (inotify; polling with ``ATM_WANDB_POLLING=1`` or where
    inotify is unavailable) so :meth:`on_update` callbacks fire as soon as a file lands; every
    :meth:`fetch` also lists the folder, so nothing depends on an event arriving.

    Args:
        run_dir: the run directory (``wandb.run.settings.sync_dir``).
        run: the live ``wandb`` run, through which charts, the table, tags and files are written;
            None writes only the message files.
        run_id: the run's id; defaults to the one in the directory name.
        remote_path: ``entity/project/run_id`` to also fetch updates through the public API.
        api_factory: builds the ``wandb.Api`` for ``remote_path`` (tests pass a fake).
        polling: force (True) or forbid (False) the polling observer; default from ``ATM_WANDB_POLLING``.
        key: signs the acks; default from the environment on first use.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        *,
        run: Any = None,
        run_id: str | None = None,
        remote_path: str | None = None,
        api_factory: Callable[[], Any] | None = None,
        polling: bool | None = None,
        remote_interval: float = REMOTE_INTERVAL_S,
        key: SigningKey | None = None,
    ):
        self.layout = RunLayout(Path(run_dir))
        if not self.layout.run_dir.is_dir():
            raise ValueError(f"run_dir {str(run_dir)!r} is not a directory")
        self.run_id = run_id or self.layout.run_id
        self.keys = KeySource(key)
        self.inbox = MessageFolder(self.layout.inbox, UPDATE_FILE_RE, Update, "update")
        self.outbox = MessageFolder(self.layout.outbox, ACK_FILE_RE, Ack, "ack")
        #: Malformed update files seen by the last fetch (see :class:`~atm.adapters.base.Channel`).
        self.problems: list[MessageProblem] = []
        self.ui = RunUI(run, self.layout.files_dir, online=remote_path is not None) if run is not None else None
        self.remote = (
            RemoteInbox(remote_path, ApiHandle(api_factory or default_api_factory(10.0)), min_interval=remote_interval)
            if remote_path
            else None
        )
        self._updates: dict[int, Update] = {}
        self._to_show: list[Ack] = []
        self._callbacks: list[Callable[[], None]] = []
        self._remote_errors = 0
        self.observer_kind: str | None = None
        self._observer = self._watch(_truthy(os.environ.get(POLLING_ENV)) if polling is None else polling)

    @classmethod
    def from_run(cls, run: Any, key: SigningKey | None = None) -> "WandbChannel | None":
        """The channel of a live ``wandb`` run (``wandb.run``); None for a disabled run."""
        settings = getattr(run, "settings", None)
        mode = str(getattr(settings, "mode", "") or "")
        if mode == "disabled" or getattr(run, "disabled", False):
            return None
        sync_dir = getattr(settings, "sync_dir", None)
        run_dir = Path(sync_dir) if sync_dir else Path(run.dir).parent
        offline = bool(getattr(run, "offline", False)) or mode in ("offline", "dryrun")
        interval = getattr(settings, "x_transaction_log_flush_interval", None)
        if offline and isinstance(interval, (int, float)) and interval > 2:
            # wandb takes its settings when the run starts: a live run's flush interval cannot be changed
            # from here, so the job is told, as the watcher would tell it after measuring the lag.
            log.warning("atm: this offline W&B run writes its metrics to disk every %g s, so the watcher sees them "
                        "that late and decides on old data; set %s", interval, FLUSH_FIX)
        remote_path = None
        if not offline and os.environ.get(REMOTE_ENV, "1").strip() != "0":
            remote_path = f"{run.entity}/{run.project}/{run.id}"
        return cls(run_dir, run=run, run_id=run.id, remote_path=remote_path, key=key)

    # ------------------------------------------------------------------ inbox watch

    def on_update(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the watcher's thread) whenever an update file lands in the inbox."""
        self._callbacks.append(callback)

    def _notify(self) -> None:
        for cb in list(self._callbacks):
            try:
                cb()
            except Exception as exc:  # a callback's trouble is its own
                log.debug("atm: inbox callback failed: %r", exc)

    def _watch(self, polling: bool) -> Any:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
            from watchdog.observers.polling import PollingObserver
        except ImportError:
            log.info("atm: watchdog is not installed; updates are picked up at each listener poll")
            return None
        channel = self

        class _InboxEvents(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                name = os.path.basename(str(getattr(event, "dest_path", "") or event.src_path))
                if UPDATE_FILE_RE.match(name):
                    channel._notify()

        self.layout.inbox.mkdir(parents=True, exist_ok=True)
        kinds: list[tuple[str, Any]] = [("polling", PollingObserver)] if polling else [("native", Observer), ("polling", PollingObserver)]
        for kind, observer_cls in kinds:
            observer = observer_cls(timeout=0.5) if kind == "polling" else observer_cls()
            try:
                observer.schedule(_InboxEvents(), str(self.layout.inbox), recursive=False)
                observer.start()
            except OSError as exc:  # inotify watch or instance limits
                log.info("atm: cannot watch %s natively (%s); polling it instead", self.layout.inbox, exc)
                continue
            self.observer_kind = kind
            return observer
        return None

    # ------------------------------------------------------------------ the contract

    def announce(self, info: ListenerInfo) -> None:
        write_atomic(self.layout.listener_file, info.model_dump_json())
        if self.ui is not None and self.ui.online:
            self.ui.save(self.layout.listener_file, "now")

    def fetch(self, after_seq: int) -> list[Update]:
        found = self.inbox.read(after_seq)
        problems = list(self.inbox.problems)
        if self.remote is not None:
            try:
                for seq, update in self.remote.fetch(after_seq).items():
                    found.setdefault(seq, update)
            except BackendError as exc:
                self._remote_errors += 1
                level = logging.WARNING if self._remote_errors == 1 else logging.DEBUG
                log.log(level, "atm: could not read updates from the W&B server (%s); the local inbox still works", exc)
                if isinstance(exc, RunNotFound):
                    self.remote = None  # credentials or run missing: asking again will not help
            if self.remote is not None:
                problems += [p for p in self.remote.problems if p.seq is None or p.seq > after_seq]
        self.problems = problems
        self._updates.update(found)
        self._show_acked()  # an update with an action only gets no log_values call
        if self.ui is not None:
            # The daemon's decision log, once it exists, goes up with the run even if nothing is ever
            # applied (--dry-run, or only rejected proposals). Registered once; a stat per cycle after.
            self.ui.save(self.layout.log_file, "end")
        return [found[s] for s in sorted(found)]

    def acked(self) -> dict[int, Ack]:
        return self.outbox.read()

    def ack(self, ack: Ack) -> None:
        path = self.layout.outbox / ack_name(ack.seq)
        key = self.keys.get_or_none()  # without one the listener has said why; the ack still tells the watcher
        write_atomic(path, (sign(ack, key) if key is not None else ack).model_dump_json())
        if self.ui is None:
            return
        if self.ui.online:
            self.ui.save(path, "now")
        # The table and tags wait until the new values are charted (log_values comes next), so
        # the charts land at the job's current step; building the first table takes ~1 s.
        self._to_show.append(ack)

    def log_values(self, values: Mapping[str, float], step: int | None) -> None:
        if self.ui is not None:
            self.ui.log_values(values, step)
            self._show_acked()

    def run_step(self) -> int | None:
        """The row the job's next ``wandb.log`` commits (W&B's ``_step``), where ``atm/*`` values logged now
        land (``commit=False``); None without a live run object."""
        step = getattr(self.ui.run, "step", None) if self.ui is not None else None
        return step if isinstance(step, int) else None

    def alert(self, title: str, text: str, level: str) -> None:
        """A W&B alert on the run (``run.alert``: only the job's own process can raise one), recorded in
        ``files/atm/alerts.jsonl`` too; nothing without a live run object."""
        if self.ui is not None:
            self.ui.alert(title, text, level)

    def _show_acked(self) -> None:
        ui = self.ui
        if ui is None or not self._to_show:
            return
        acks, self._to_show = self._to_show, []
        for ack in acks:
            update = self._updates.get(ack.seq) or self.inbox.read(ack.seq - 1).get(ack.seq)
            if update is not None:
                ui.record(update, ack, self._decision(ack.seq))
        ui.save(self.layout.log_file, "end")

    def close(self) -> None:
        self._show_acked()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout=5)

    def _decision(self, seq: int) -> DecisionRecord | None:
        for record in records_from_jsonl(read_text(self.layout.log_file) or ""):
            if record.seq == seq:
                return record
        return None


__all__ = ["UnreadableRun", "WandbBackend", "WandbChannel", "run_status"]
