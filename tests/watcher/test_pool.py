"""The daemon's poll workers: a fixed pool for many runs, one worker per run at a time, shards, stop, errors by kind.

The tracker here is a fake (named as such) that counts polls and notices two polls of one run at once;
the real MLflow server with 50 runs is in test_pool_server.py.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import pytest

from atm.adapters.base import BackendUnavailable, KeySelector, PoolExhausted, RunView
from atm.policies import load_policy
from atm.testing import wait_for
from atm.watcher.daemon import Daemon
from atm.watcher.service import ErrorKind, Hooks
from atm.watcher.shard import Shard, owns


class CountingTracker:
    """Fake tracker: RUNNING runs with no listener (``finished`` ones FINISHED). Counts polls, records any run
    polled by two threads at once and the runs forgotten, and holds the polls of runs in ``held`` until
    ``release`` is set."""

    name = "fake"

    def __init__(self, runs: list[str], held: set[str] = frozenset(), fail: BaseException | None = None,
                 finished: set[str] = frozenset()) -> None:
        self.runs = runs
        self.held = held
        self.finished = finished
        self.forgotten: list[str] = []
        self.release = threading.Event()
        self.fail = fail
        self.polls: Counter[str] = Counter()
        self.overlaps: list[str] = []
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def running_runs(self, experiment: str) -> list[str]:
        return list(self.runs)

    def poll(self, run_id: str, select: KeySelector | None = None) -> RunView:
        with self._lock:
            if run_id in self._active:
                self.overlaps.append(run_id)
            self._active.add(run_id)
        try:
            if run_id in self.held:
                self.release.wait(60)
            if self.fail is not None:
                raise self.fail
            status = "FINISHED" if run_id in self.finished else "RUNNING"
            return RunView(run_id=run_id, name=run_id, status=status, history={}, last_metric_time=0.0, moved=False)
        finally:
            with self._lock:
                self._active.discard(run_id)
                self.polls[run_id] += 1

    def read_log(self, run_id: str) -> list:
        return []

    def write_log(self, run_id: str, records: object) -> None:
        pass

    def publish(self, record: object) -> None:
        pass

    def reserve_seq(self, run_id: str, seq: int) -> None:
        pass

    def forget(self, run_id: str) -> None:
        self.forgotten.append(run_id)


class RecordingHooks(Hooks):
    """Keeps what the daemon reports."""

    def __init__(self) -> None:
        self.errors: Counter[ErrorKind] = Counter()
        self.watched: list[int] = []
        self.finished = 0

    def poll_finished(self, run_id: str, seconds: float, error: ErrorKind | None = None) -> None:
        self.finished += 1
        if error is not None:
            self.errors[error] += 1

    def watching(self, runs: int) -> None:
        self.watched.append(runs)


def ids(n: int) -> list[str]:
    return [uuid.UUID(int=i * 7919 + 1).hex for i in range(n)]


def watching(daemon: Daemon, **kw: object) -> threading.Thread:
    t = threading.Thread(target=daemon.watch, kwargs=kw, daemon=True)
    t.start()
    return t


def poll_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("atm-poll-")]


def test_a_fixed_pool_polls_every_run_and_never_one_run_twice_at_once() -> None:
    tracker = CountingTracker(ids(40))
    hooks = RecordingHooks()
    daemon = Daemon(tracker, load_policy("lm"), interval=0.02, workers=3, hooks=hooks)
    watcher = watching(daemon, experiment="e")
    try:
        wait_for(lambda: len(tracker.polls) == 40 and min(tracker.polls.values()) >= 5, timeout=60)
        assert len(poll_threads()) == 3  # not a thread per run
    finally:
        daemon.stop()
        watcher.join(timeout=30)
    assert not watcher.is_alive() and not poll_threads()
    assert tracker.overlaps == []
    assert hooks.watched[-1] == 40 and not hooks.errors
    assert {s.state for s in daemon.status.values()} == {"no listener"}


def test_a_run_whose_poll_hangs_holds_up_one_worker_not_the_others() -> None:
    runs = ids(6)
    tracker = CountingTracker(runs, held={runs[0]})
    daemon = Daemon(tracker, load_policy("lm"), interval=0.02, workers=2)
    watcher = watching(daemon, run_ids=runs)
    try:
        wait_for(lambda: min(tracker.polls[r] for r in runs[1:]) >= 5, timeout=60)
        assert tracker.polls[runs[0]] == 0  # still in its first poll
    finally:
        tracker.release.set()
        daemon.stop()
        watcher.join(timeout=30)
    assert tracker.overlaps == [] and tracker.polls[runs[0]] == 1


def test_a_run_whose_watch_ended_is_forgotten_and_not_picked_up_again() -> None:
    runs = ids(3)
    tracker = CountingTracker(runs, finished={runs[0]})  # still listed by the experiment, as an idle run would be
    daemon = Daemon(tracker, load_policy("lm"), interval=0.02, workers=2)
    watcher = watching(daemon, experiment="e")
    try:
        wait_for(lambda: tracker.forgotten == [runs[0]] and min(tracker.polls[r] for r in runs[1:]) >= 5, timeout=60)
    finally:
        daemon.stop()
        watcher.join(timeout=30)
    assert daemon.status[runs[0]].state == "finished" and tracker.polls[runs[0]] == 1
    assert daemon._states[runs[0]].telemetry is None


def test_stop_ends_the_waits_of_idle_workers() -> None:
    # An hour between polls: the workers wait on the schedule, and stop must not wait that out.
    tracker = CountingTracker(ids(3))
    daemon = Daemon(tracker, load_policy("lm"), interval=3600, workers=4)
    watcher = watching(daemon, experiment="e")
    wait_for(lambda: len(daemon.status) == 3 and len(poll_threads()) == 4)
    daemon.stop_event.set()  # as the SIGTERM handler does: no notify, the waits are sliced
    watcher.join(timeout=30)
    assert not watcher.is_alive() and not poll_threads()


@pytest.mark.parametrize("count", [1, 3])
def test_shards_split_an_experiment_between_replicas(count: int) -> None:
    runs = ids(30)
    seen: list[str] = []
    for k in range(count):
        daemon = Daemon(CountingTracker(runs), load_policy("lm"), interval=0.02, workers=2, shard=Shard(k, count))
        watcher = watching(daemon, experiment="e")
        mine = {r for r in runs if owns(r, Shard(k, count))}
        try:
            wait_for(lambda d=daemon, m=mine: set(d.status) == m and all(s.state != "starting" for s in d.status.values()),
                     timeout=60)
        finally:
            daemon.stop()
            watcher.join(timeout=30)
        seen += list(daemon.status)
    assert sorted(seen) == sorted(runs)  # every run watched by exactly one replica


def test_pool_exhaustion_is_not_called_an_unreachable_tracker(caplog: pytest.LogCaptureFixture) -> None:
    cause = PoolExhausted("run r: this process ran out of connections to the tracker's database (raise it)")
    tracker = CountingTracker(["r"], fail=cause)
    hooks = RecordingHooks()
    daemon = Daemon(tracker, load_policy("lm"), interval=0.01, workers=1, hooks=hooks)
    with caplog.at_level("WARNING", logger="atm.watch"):
        watcher = watching(daemon, run_ids=["r"])
        try:
            wait_for(lambda: tracker.polls["r"] >= 2, timeout=60)
        finally:
            daemon.stop()
            watcher.join(timeout=30)
    said = [r.getMessage() for r in caplog.records]
    assert not any("unreachable" in m for m in said)
    assert sum("ran out of connections" in m for m in said) == 1
    assert daemon.status["r"].state == "pool exhausted"
    assert set(hooks.errors) == {ErrorKind.POOL_EXHAUSTED}


def test_an_unreachable_tracker_is_counted_as_such() -> None:
    tracker = CountingTracker(["r"], fail=BackendUnavailable("connection refused (fake)"))
    hooks = RecordingHooks()
    daemon = Daemon(tracker, load_policy("lm"), interval=0.01, workers=1, hooks=hooks)
    watcher = watching(daemon, run_ids=["r"])
    try:
        wait_for(lambda: hooks.errors[ErrorKind.UNREACHABLE] >= 1, timeout=60)
    finally:
        daemon.stop()
        watcher.join(timeout=30)
    assert daemon.status["r"].state == "unreachable"


def test_workers_must_be_at_least_one() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        Daemon(CountingTracker([]), load_policy("lm"), workers=0)
