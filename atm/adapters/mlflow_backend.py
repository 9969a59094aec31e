"""The MLflow backend (daemon side) and channel (listener side).

On the run, atm keeps:

- ``atm.update.NNNNNN`` tags: one signed :class:`~atm.schema.Update` each, the messages the listener applies;
- ``atm.ack.NNNNNN`` tags: the listener's signed :class:`~atm.schema.Ack` for each;
- ``atm.listener``: what the listener announced (knobs, current values);
- ``atm.seq`` (last number taken) and ``atm.latest`` (a one-line summary for the runs table);
- ``atm.approval.NNNNNN``: a signed :class:`~atm.schema.Approval` from ``atm approve`` / ``atm reject``,
  and ``atm.approve`` / ``atm.reject`` = ``<seq>``, the same answers added by hand in MLflow's UI;
- the artifact ``atm/interventions.jsonl``: every decision with its full context;
- metrics ``atm/<param>`` logged by the listener at the step each change took effect.

Reading is incremental: one ``get_run`` per poll gives every metric key with its latest step
and time; only keys that moved are read, and only the new step window of each (through the
store's step-window query, the same one MLflow's UI uses), falling back to the full history; of a
key logged without ``step=`` (every point at step 0), the points past the last one read, by offset.
Given ``select`` (the daemon passes the keys its policy maps), only the keys it picks and the
listener's ``atm/*`` are read; the others cost no request, and a key picked later is read from
its first point then.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from atm.adapters.base import (
    APPROVAL_PREFIX,
    EFFECT_PREFIX,
    LATEST_KEY,
    LISTENER_KEY,
    LOG_ARTIFACT,
    SEQ_KEY,
    BackendUnavailable,
    KeySelector,
    MessageMemo,
    PoolExhausted,
    MessageProblem,
    PointSeries,
    RunNotFound,
    RunView,
    Timeline,
    ack_key,
    parse_messages,
    records_from_jsonl,
    records_to_jsonl,
    update_key,
    verified,
)
from atm.adapters.notes import MLFLOW_NOTE_TAG, notable, run_note
from atm.schema import Ack, Approval, DecisionRecord, ListenerInfo, Status, Update
from atm.signing import KeySource, SigningKey, sign

try:
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the MLflow backend needs mlflow: pip install 'atm[mlflow]'") from exc

log = logging.getLogger("atm.mlflow")

#: MLflow caps tag values at 8000 characters (older servers at 5000) and truncates silently.
TAG_LIMIT = 5000
#: Runs a search for an experiment's running runs returns at a time (MLflow's own limit is 50,000).
LIST_PAGE = 1000
#: Most points the step-window query returns before it starts to downsample.
WINDOW_MAX = 2500

T = TypeVar("T")


def _translate(what: str, fn: Callable[[], T]) -> T:
    """Run one MLflow call, mapping its errors onto the backend contract."""
    try:
        return fn()
    except Exception as exc:
        advice = _pool_advice(exc)
        if advice is not None:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PoolExhausted(f"{what}: {advice} ({first[:200]})") from exc
        if isinstance(exc, MlflowException):
            code = getattr(exc, "error_code", "")
            if code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower():
                raise RunNotFound(f"{what}: {exc.message if hasattr(exc, 'message') else exc}") from exc
            raise BackendUnavailable(f"{what}: {exc}") from exc
        # OS and network errors, and requests' and sqlalchemy's: all transient from our side.
        if isinstance(exc, (OSError, ConnectionError, TimeoutError)) or (
            type(exc).__module__.split(".")[0] in ("requests", "urllib3", "sqlalchemy")
        ):
            raise BackendUnavailable(f"{what}: {exc}") from exc
        raise


def _pool_advice(exc: BaseException) -> str | None:
    """What to change when ``exc`` is a connection pool that ran dry (SQLAlchemy's ``QueuePool limit
    of size N overflow M reached``), in this process or in the MLflow server; None for any other error.

    A database store opened in this process raises SQLAlchemy's TimeoutError (MLflow wraps it); a
    server whose own pool ran dry answers with its text. Either way the tracker works but is asked
    for more at once than it was sized for: "unreachable" would send the user looking at the network.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    here = any(type(c).__name__ == "TimeoutError" and type(c).__module__.startswith("sqlalchemy") for c in chain)
    if not here and not any("QueuePool limit" in str(c) for c in chain):
        return None
    if here:
        size = os.environ.get("MLFLOW_SQLALCHEMYSTORE_POOL_SIZE", "unset: 5")
        overflow = os.environ.get("MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW", "unset: 10")
        return (f"this process ran out of connections to the tracking database (MLFLOW_SQLALCHEMYSTORE_POOL_SIZE "
                f"{size}, MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW {overflow}): raise them, or lower atm-watch --workers")
    return ("the MLflow server ran out of connections to its database: raise MLFLOW_SQLALCHEMYSTORE_POOL_SIZE and "
            "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW in the server's environment, or lower atm-watch --workers")


@dataclass
class _RunCache:
    history: dict[str, PointSeries] = field(default_factory=dict)
    #: key -> (step, timestamp ms) of the newest point read.
    seen: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Keys logged without ``step=`` (every point at step 0), numbered by arrival instead: the time (ms)
    #: of the last point read of each.
    stepless: dict[str, int] = field(default_factory=dict)
    log_records: list[DecisionRecord] | None = None
    timeline: Timeline = field(default_factory=Timeline)
    #: The run's tags as parsed and checked so far: a poll parses and checks only the new ones.
    messages: MessageMemo = field(default_factory=MessageMemo)
    #: (key, step) of points left out as stray (:func:`stray_rows`), each said once in the log.
    strays: set[tuple[str, int]] = field(default_factory=set)


def stray_rows(rows: Sequence[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """The rows (step, value, time ms) of one metric that are not where the job is now: past the step of
    the newest row by time, and logged before it. Pure.

    A job's steps only grow, and one resumed from a checkpoint logs its steps again from there, so a
    point its later points went back under is not the run's present: another client's point at an
    odd step (a colleague or a CI bot logging ``val_loss`` at step 1000 of a job at step 5), or an
    abandoned attempt's tail. Kept, it was the run's latest evaluation for as long as the job stayed
    below its step: the daemon decided on it, then saw none of the job's evaluations (MLflow's latest
    point of a metric is its highest step, so nothing looked new). An evaluator that logs its results
    out of step order loses the later step of each such pair, and the daemon's log says so.
    """
    if not rows:
        return []
    newest = max(rows, key=lambda r: r[2])
    return [r for r in rows if r[0] > newest[0] and r[2] < newest[2]]


class MlflowBackend:
    """The daemon's MLflow access. One instance may serve many runs."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, existing: bool = False, key: SigningKey | None = None):
        """``existing``: refuse (ValueError) a local sqlite store that does not exist yet, rather than
        create it empty: a run id can only be found in a store that exists, so it is a mistyped path.
        ``key``: signs what is published and logged, checks what is read; default from the
        environment on first use (:func:`atm.signing.resolve_key`)."""
        self.tracking_uri = tracking_uri or mlflow.get_tracking_uri()
        path = self.tracking_uri[len("sqlite:///"):] if self.tracking_uri.startswith("sqlite:///") else ""
        if existing and path and path != ":memory:" and not os.path.exists(path):
            raise ValueError(
                f"no MLflow store at {path} (from {self.tracking_uri}); pass the job's tracking URI with "
                "--tracking-uri or MLFLOW_TRACKING_URI (a job that logs to W&B: --backend wandb)"
            )
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        # The daemon's and `atm history`'s reads of the decision log would each print a download
        # progress bar into their own output. This backend runs in atm's processes, not the job's.
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self._cache: dict[str, _RunCache] = {}
        self._lock = threading.Lock()
        self.keys = KeySource(key)

    # ------------------------------------------------------------------ discovery

    def running_runs(self, experiment: str) -> list[str]:
        return self._search(experiment, "attributes.status = 'RUNNING'")

    def experiment_runs(self, experiment: str) -> list[str]:
        return self._search(experiment, "", order_by=["attributes.start_time ASC"])

    def _search(self, experiment: str, where: str, order_by: list[str] | None = None) -> list[str]:
        """The ids of the runs of ``experiment`` that ``where`` (an MLflow filter string) selects."""
        exp = _translate(f"experiment {experiment!r}", lambda: self.client.get_experiment_by_name(experiment))
        if exp is None:
            raise RunNotFound(f"no MLflow experiment named {experiment!r} at {self.tracking_uri}")
        ids: list[str] = []
        token: str | None = None
        while True:  # in pages: one search returns at most LIST_PAGE runs, and an experiment may hold more
            page = _translate("search runs", lambda: self.client.search_runs(
                [exp.experiment_id], where, max_results=LIST_PAGE, order_by=order_by, page_token=token))
            ids += [r.info.run_id for r in page]
            token = page.token
            if not token:
                return ids

    # ------------------------------------------------------------------ reading

    def poll(self, run_id: str, select: KeySelector | None = None) -> RunView:
        try:
            run = _translate(f"run {run_id}", lambda: self.client.get_run(run_id))
        except RunNotFound as exc:
            raise self._not_found(run_id) from exc
        with self._lock:
            cache = self._cache.setdefault(run_id, _RunCache())
        latest = run.data._metric_objs
        keys = [m.key for m in latest]
        wanted = None if select is None else set(select(keys))
        moved = False
        last_time = 0.0
        stuck: list[str] = []
        #: (step, time ms) of the newest point of each of the job's own keys that moved in this poll.
        progress: list[tuple[int, int]] = []
        for m in latest:
            last_time = max(last_time, m.timestamp / 1000.0)
            if wanted is not None and m.key not in wanted and not m.key.startswith("atm/"):
                continue  # not read at all; read from its start if a later poll picks it
            prev = cache.seen.get(m.key)
            if prev is not None and (m.step, m.timestamp) <= prev:
                stuck.append(m.key)
                continue
            self._read_new(run_id, m.key, m.step, m.timestamp, cache)
            moved = True
            if not m.key.startswith("atm/"):
                progress.append((m.step, m.timestamp))
        for key in stuck:
            if not key.startswith("atm/") and self._read_below_latest(run_id, key, cache, progress):
                moved = True
        msgs = verified(parse_messages(run.data.tags, cache.messages), self.keys.get_or_none(),
                        key_problem=self.keys.problem, run_id=run_id, memo=cache.messages)
        return RunView(
            run_id=run_id,
            name=run.info.run_name or "",
            status=run.info.status,
            history=cache.history,
            last_metric_time=last_time,
            moved=moved,
            listener=msgs.listener,
            acks=msgs.acks,
            updates=msgs.updates,
            last_seq=msgs.seq,
            timeline=cache.timeline.points,
            problems=msgs.problems,
            approvals=msgs.approvals,
            keys=keys,
        )

    def _not_found(self, run_id: str) -> RunNotFound:
        """The error for a run id this store does not hold, naming the whole id when it is the start of
        one (ids are often copied cut short, as tables show them) and else where to look. Its ``matches``
        lists those whole ids."""
        where = f"no MLflow run {run_id!r} at {self.tracking_uri}"
        matches = self.runs_starting_with(run_id)
        if len(matches) == 1:
            text = f"{where}; it is the start of run {matches[0]}: pass the whole id, --run {matches[0]}"
        elif matches:
            text = f"{where}; it is the start of {len(matches)} runs' ids ({', '.join(matches)}): pass one whole"
        else:
            text = (f"{where}: check the id (32 hex characters: the run page's URL ends with it) and that "
                    "--tracking-uri (or MLFLOW_TRACKING_URI) is the store the job logs to")
        err = RunNotFound(text)
        err.matches = matches  # type: ignore[attr-defined]
        return err

    def runs_starting_with(self, prefix: str, limit: int = 5) -> list[str]:
        """Ids of runs in the store's active experiments that start with ``prefix`` (a cut-off id), newest
        first, at most ``limit``; empty for anything that is not the start of an id, or when the search fails."""
        if not re.fullmatch(r"[0-9a-fA-F]{4,31}", prefix):
            return []
        try:
            exps = [e.experiment_id for e in self.client.search_experiments()]
            runs = self.client.search_runs(exps, f"attributes.run_id LIKE '{prefix.lower()}%'", max_results=limit,
                                           order_by=["attributes.start_time DESC"]) if exps else []
        except Exception as exc:  # a hint only: the error it adds to is the one to report
            log.debug("searching runs starting with %s failed: %s", prefix, exc)
            return []
        return [r.info.run_id for r in runs]

    def _read_new(self, run_id: str, key: str, latest_step: int, latest_ts: int, cache: _RunCache) -> None:
        pts = cache.history.setdefault(key, PointSeries())
        prev_step, prev_ts = cache.seen.get(key, (-1, -1))
        tail = None
        if key in cache.stepless and pts:
            tail = self._stepless_tail(run_id, key, pts, cache.stepless[key])
        if tail is not None:
            # The points past those read, numbered on: a poll reads what is new, not the whole metric.
            first = len(pts)
            pts.extend((first + i, v) for i, (_, v, _) in enumerate(tail))
            new = [(ts / 1000.0, first + i) for i, (_, _, ts) in enumerate(tail)]
            if tail:
                cache.stepless[key] = tail[-1][2]
        elif key in cache.stepless or (pts and latest_step <= prev_step):
            full = self._full_history(run_id, key)
            if key in cache.stepless or _stepless(full):
                # Logged without step= (every point at step 0): the window query cannot find new
                # points by step, and the points' order is their only axis.
                cache.stepless[key] = full[-1][2]
                cache.history[key] = PointSeries((i, v) for i, (_, v, _) in enumerate(full))
                new = [(ts / 1000.0, i) for i, (_, _, ts) in enumerate(full) if i >= len(pts)]
            else:
                # The step went back: a job resumed from a checkpoint logs its steps again. The newest
                # point of each step is the run as it is (read as row numbers, the run's step axis
                # was lost and the daemon waited for evaluations past the old steps for good).
                newest = {s: v for s, v, _ in full}  # full is in time order: later points win
                cache.history[key] = PointSeries(sorted(newest.items()))
                new = [(ts / 1000.0, s) for s, _, ts in full if ts > prev_ts]
        else:
            if pts and pts[-1][0] < prev_step:  # the store's latest was left out as stray: read on from ours
                prev_step = pts[-1][0]
            got = self._window(run_id, key, prev_step + 1, latest_step)
            if got is None:
                got = [p for p in self._full_history(run_id, key) if p[0] > prev_step]
            got = self._without_strays(run_id, key, got, cache)
            fresh = sorted(((s, v) for s, v, _ in got), key=lambda p: p[0])
            pts.extend(fresh)
            if fresh and len(pts) > len(fresh) and fresh[0][0] < pts[-len(fresh) - 1][0]:
                # Rare: a point older than the ones already read. Sorting the whole series on every poll
                # made a poll cost the run's length, not what is new.
                if pts.dropped:  # the daemon let go of the folded points: sort the series the store holds
                    whole = sorted(((s, v) for s, v, _ in self._full_history(run_id, key)), key=lambda p: p[0])
                    cache.history[key] = PointSeries(whole)
                else:
                    pts.sort_by_step()
            new = [(ts / 1000.0, s) for s, _, ts in got]
        if not key.startswith("atm/"):
            cache.timeline.add(new)
        cache.seen[key] = (latest_step, latest_ts)

    def _read_below_latest(
        self, run_id: str, key: str, cache: _RunCache, progress: Sequence[tuple[int, int]]
    ) -> bool:
        """Read the points of ``key`` logged under its store-latest point, when the job's other keys
        moved past the last one held but not up to it; returns whether any came.

        MLflow's latest point of a metric is its highest step, so a point at a step ahead of the job
        hides every later one below it: nothing looks new. A key whose latest stands still while
        another key of the run moved into the steps between is read in that window (one read, only
        while this holds; a job that logs its evaluations at the global step and its training loss
        at the epoch never does)."""
        pts = cache.history.get(key)
        if key in cache.stepless or pts is None or not len(pts):
            return False
        top_step, top_ts = cache.seen[key]
        held = pts[-1][0] if pts[-1][0] < top_step else (pts[-2][0] if len(pts) > 1 else -1)
        if not any(ts > top_ts and held < step < top_step for step, ts in progress):
            return False
        rows = self._window(run_id, key, held + 1, top_step - 1)
        if rows is None:
            rows = [r for r in self._full_history(run_id, key) if held < r[0] < top_step]
        if not rows:
            return False
        if pts[-1][0] == top_step:  # the latest is still held: is it past where the job is now?
            top = (top_step, pts[-1][1], top_ts)
            if self._without_strays(run_id, key, [*rows, top], cache)[-1] != top:
                pts.drop_above(held)
        rows = sorted(rows, key=lambda r: r[0])
        if pts[-1][0] == top_step:
            return False  # the points under it are not the job's now: already read, or not stray at all
        pts.extend((s, v) for s, v, _ in rows)
        cache.timeline.add([(ts / 1000.0, s) for s, _, ts in rows])
        return True

    def _without_strays(
        self, run_id: str, key: str, rows: list[tuple[int, float, int]], cache: _RunCache
    ) -> list[tuple[int, float, int]]:
        """``rows`` without the stray ones (:func:`stray_rows`), each said once in the log."""
        strays = stray_rows(rows)
        if not strays:
            return rows
        for step, value, ts in strays:
            if (key, step) not in cache.strays:
                cache.strays.add((key, step))
                log.warning(
                    "run %s: %s = %.4g at step %d (logged at %s) is left out: the run logged %s at lower steps "
                    "after it, so it is not where the job is now (another client writing to this run, or an "
                    "abandoned attempt's tail); delete it in MLflow if it is a mistake",
                    run_id, key, value, step, time.strftime("%H:%M:%S", time.localtime(ts / 1000.0)), key,
                )
        gone = {(s, ts) for s, _, ts in strays}
        return [r for r in rows if (r[0], r[2]) not in gone]

    def _stepless_tail(
        self, run_id: str, key: str, pts: PointSeries, last_ts: int
    ) -> list[tuple[int, float, int]] | None:
        """The points of a metric logged without ``step=`` past the ``len(pts)`` already read, in the
        store's order, as (step, value, time ms), or None when they cannot be told from the store's offsets:
        the page read from the last point read on (logged at ``last_ts``) must start with that point (a
        point logged with an earlier time than it shifts the offsets: the caller reads the metric whole
        then).

        Pages by offset through the store's ``page_token`` (the offset, base64 JSON, in the SQL and
        file stores and the server that serves them): MLflow's step-window query cannot find the new
        points of a metric whose every point is at step 0.
        """
        from mlflow.utils.search_utils import SearchUtils

        store = self.client._tracking_client.store
        rows: list[tuple[int, float, int]] = []
        token: str | None = SearchUtils.create_page_token(len(pts) - 1).decode("ascii")
        try:
            while token:
                page = store.get_metric_history(run_id, key, max_results=WINDOW_MAX, page_token=token)
                rows += [(m.step, _as_float(m.value), m.timestamp) for m in page]
                token = page.token
        except Exception as exc:  # an optimisation only: any failure means "read the metric whole"
            log.debug("offset read of %s failed (%s); using full history", key, exc)
            return None
        last = pts[-1][1]
        same = rows and rows[0][2] == last_ts and (rows[0][1] == last or math.isnan(rows[0][1]) and math.isnan(last))
        if not same:
            return None
        return rows[1:]

    def _window(self, run_id: str, key: str, start: int, end: int) -> list[tuple[int, float, int]] | None:
        """Points with start <= step <= end, or None when the fast path is unavailable (or a single step
        holds more points than one read returns).

        One read when few points are new. A range the store would downsample (a first read of a long
        run) is read in pages of steps sized to hold fewer than ``WINDOW_MAX`` points each, which keeps
        a first poll of a 100k-point metric to tens of reads instead of the whole-history call.
        """
        rows = self._window_rows(run_id, key, start, end)
        if rows is None or len(rows) < WINDOW_MAX:
            return rows
        out: list[tuple[int, float, int]] = []
        lo, span = start, WINDOW_MAX - 1
        while lo <= end:
            hi = min(end, lo + span - 1)
            page = self._window_rows(run_id, key, lo, hi)
            if page is None:
                return None
            if len(page) >= WINDOW_MAX:  # more than one point a step here: a smaller page
                if span == 1:
                    return None
                span = max(1, span // 2)
                continue
            out.extend(page)
            lo = hi + 1
            # Sparse steps (an evaluation every 100 steps): widen the page to the density just seen.
            span = max(span, int(span * (WINDOW_MAX - 1) / max(len(page), 1) * 0.8))
        return out

    def _window_rows(self, run_id: str, key: str, start: int, end: int) -> list[tuple[int, float, int]] | None:
        """One step-window read (downsampled by the store past ``WINDOW_MAX`` points), or None when the
        fast path is unavailable."""
        store = self.client._tracking_client.store
        try:
            if hasattr(store, "get_host_creds"):
                rows = self._window_rest(store, run_id, key, start, end)
            elif type(store).__name__ == "SqlAlchemyStore":
                rows = [
                    (m.step, _as_float(m.value), m.timestamp)
                    for m in store.get_metric_history_bulk_interval([run_id], key, WINDOW_MAX, start, end)
                ]
            else:
                return None
        except Exception as exc:  # an optimisation only: any failure means "use the public API"
            log.debug("step-window read of %s failed (%s); using full history", key, exc)
            return None
        return rows

    @staticmethod
    def _window_rest(store: Any, run_id: str, key: str, start: int, end: int) -> list[tuple[int, float, int]]:
        from mlflow.utils.rest_utils import http_request

        resp = http_request(
            store.get_host_creds(),
            "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval",
            "GET",
            params={"run_ids": run_id, "metric_key": key, "start_step": start, "end_step": end, "max_results": WINDOW_MAX},
            timeout=10,
        )
        resp.raise_for_status()
        return [(int(m.get("step", 0)), _as_float(m["value"]), int(m.get("timestamp", 0))) for m in resp.json().get("metrics", [])]

    def _full_history(self, run_id: str, key: str) -> list[tuple[int, float, int]]:
        ms = _translate(f"metric history {key}", lambda: self.client.get_metric_history(run_id, key))
        rows = [(m.step, _as_float(m.value), m.timestamp) for m in ms]
        rows.sort(key=lambda r: (r[2], r[0]))
        return rows

    # ------------------------------------------------------------------ writing

    def reserve_seq(self, run_id: str, seq: int) -> None:
        _translate("set tag", lambda: self.client.set_tag(run_id, SEQ_KEY, str(seq)))

    def forget(self, run_id: str) -> None:
        with self._lock:
            self._cache.pop(run_id, None)

    def write_approval(self, run_id: str, approval: Approval) -> None:
        text = sign(approval.model_copy(update={"run_id": run_id}), self.keys.get()).model_dump_json()[:TAG_LIMIT]
        _translate("set tag", lambda: self.client.set_tag(run_id, f"{APPROVAL_PREFIX}{approval.seq:06d}", text))

    def publish(self, record: DecisionRecord) -> None:
        run_id = record.run_id
        if record.status == Status.PENDING:
            msg = sign(record.to_update(), self.keys.get()).model_dump_json()
            if len(msg) > TAG_LIMIT:
                raise ValueError(f"update #{record.seq} is {len(msg)} characters; tags hold {TAG_LIMIT}")
            _translate("set tag", lambda: self.client.set_tag(run_id, update_key(record.seq), msg))
        if record.effect is not None:
            effect = f"#{record.seq} {record.effect.summary()}"[:TAG_LIMIT]
            _translate("set tag", lambda: self.client.set_tag(run_id, f"{EFFECT_PREFIX}{record.seq:06d}", effect))
        _translate("set tag", lambda: self.client.set_tag(run_id, LATEST_KEY, record.summary()[:TAG_LIMIT]))
        if notable(record):
            # The run page's description, shown at the top of the run: a stop, rollback, revert or
            # rejection is seen there without opening the tags. The user's own text above atm's is kept.
            tags = _translate(f"run {run_id}", lambda: self.client.get_run(run_id)).data.tags
            current = tags.get(MLFLOW_NOTE_TAG, "")
            note = run_note(record, current)
            if note is not None and note != current:
                _translate("set tag", lambda: self.client.set_tag(run_id, MLFLOW_NOTE_TAG, note))

    def write_log(self, run_id: str, records: Sequence[DecisionRecord]) -> None:
        text = records_to_jsonl(records, self.keys.get())
        _translate("log artifact", lambda: self.client.log_text(run_id, text, LOG_ARTIFACT))
        with self._lock:
            self._cache.setdefault(run_id, _RunCache()).log_records = list(records)

    def read_log(self, run_id: str) -> list[DecisionRecord]:
        folder = LOG_ARTIFACT.rsplit("/", 1)[0]
        listed = _translate("list artifacts", lambda: self.client.list_artifacts(run_id, folder))
        if LOG_ARTIFACT not in {f.path for f in listed}:
            return []
        with tempfile.TemporaryDirectory(prefix="atm-") as tmp:
            path = _translate("download log", lambda: self.client.download_artifacts(run_id, LOG_ARTIFACT, tmp))
            with open(path) as fh:
                return records_from_jsonl(fh.read())


class MlflowChannel:
    """The listener's MLflow access: reads update tags, writes signed acks, info and ``atm/*`` metrics.

    ``key`` signs the acks; default from the environment on first use.
    """

    def __init__(self, run_id: str, tracking_uri: str | None = None, key: SigningKey | None = None):
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri or mlflow.get_tracking_uri())
        self.keys = KeySource(key)
        #: Malformed update tags seen by the last fetch (see :class:`~atm.adapters.base.Channel`).
        self.problems: list[MessageProblem] = []
        self._run_step: int | None = None

    @classmethod
    def from_environment(cls, key: SigningKey | None = None) -> "MlflowChannel | None":
        """The job's active MLflow run, or ``MLFLOW_RUN_ID``; None when there is neither."""
        run = mlflow.active_run()
        run_id = run.info.run_id if run is not None else os.environ.get("MLFLOW_RUN_ID")
        return cls(run_id, key=key) if run_id else None

    def _tags(self) -> Mapping[str, str]:
        run = _translate(f"run {self.run_id}", lambda: self.client.get_run(self.run_id))
        # The job's own metrics: not atm's, nor MLflow's system metrics (numbered by sample, not by the job).
        own = [m.step for m in run.data._metric_objs if not m.key.startswith(("atm/", "system/"))]
        self._run_step = max(own) if own and max(own) > 0 else None  # all at 0: logged without step=
        return run.data.tags

    def run_step(self) -> int | None:
        """The step of the job's latest logged point (its own metrics), as of the last read of the run; None
        before it logged any with a step. The listener logs ``atm/*`` there, on the job's own axis."""
        return self._run_step

    def announce(self, info: ListenerInfo) -> None:
        _translate("set tag", lambda: self.client.set_tag(self.run_id, LISTENER_KEY, info.model_dump_json()[:TAG_LIMIT]))

    def fetch(self, after_seq: int) -> list[Update]:
        msgs = parse_messages(self._tags())
        self.problems = [p for p in msgs.problems if p.kind == "update" and (p.seq is None or p.seq > after_seq)]
        return [msgs.updates[s] for s in sorted(msgs.updates) if s > after_seq]

    def acked(self) -> dict[int, Ack]:
        return parse_messages(self._tags()).acks

    def ack(self, ack: Ack) -> None:
        key = self.keys.get_or_none()  # without one the listener has said why; the ack still tells the watcher
        text = (sign(ack, key) if key is not None else ack).model_dump_json()[:TAG_LIMIT]
        _translate("set tag", lambda: self.client.set_tag(self.run_id, ack_key(ack.seq), text))

    def log_values(self, values: Mapping[str, float], step: int | None) -> None:
        ts = int(time.time() * 1000)
        metrics = [Metric(f"atm/{k}", float(v), ts, int(step or 0)) for k, v in values.items() if math.isfinite(v)]
        if metrics:
            _translate("log metrics", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def close(self) -> None:
        pass


def _stepless(points: Sequence[tuple[int, float, int]]) -> bool:
    """Whether a metric's points were logged without ``step=``: most of them share a step (MLflow's 0).

    A resumed job repeats some steps too, but most of its steps stay distinct.
    """
    return len({s for s, _, _ in points}) * 2 <= len(points)


def _as_float(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    # MLflow stores an infinite value as the largest float: read back, it would look finite, and
    # the loss that blew up would break every statistic instead of being seen as divergence.
    return math.copysign(math.inf, x) if abs(x) >= sys.float_info.max else x



def ensure_experiment(tracking_uri: str, name: str, artifact_dir: str) -> None:
    """Create experiment ``name`` with its artifacts under ``artifact_dir``, unless it exists.

    A sqlite store's experiments otherwise keep their artifacts in ``./mlruns`` of whichever folder
    the process that created them ran in, away from the store.
    """
    client = MlflowClient(tracking_uri=tracking_uri)
    if _translate(f"experiment {name!r}", lambda: client.get_experiment_by_name(name)) is None:
        location = Path(artifact_dir).resolve().as_uri()
        _translate(f"create experiment {name!r}", lambda: client.create_experiment(name, artifact_location=location))
