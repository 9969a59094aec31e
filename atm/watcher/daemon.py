"""The daemon: a fixed pool of workers polls the runs, proposals run off the loop, every decision is recorded on the run.

Runs are spread over the poll interval (:mod:`~atm.watcher.schedule`), each polled by one worker at a time;
with ``shard``, only the runs this replica owns are watched (:mod:`~atm.watcher.shard`).

A run's path, one module each, every ``interval`` seconds (a wait that stop interrupts):

1. :mod:`~atm.watcher.poll`: read the run (new points of the metrics the policy maps, listener
   state, acks) and what to tell the user about it once;
2. :mod:`~atm.watcher.reconcile`: merge the decision log with what is on the run;
3. :mod:`~atm.watcher.decide`: when the run logged a new evaluation and nothing is pending, build
   the snapshot and the offer and hand them to the proposer on a worker (one decision in flight per run);
4. :mod:`~atm.watcher.settle`: re-check the answer against the run as it is *now* (it kept training
   while the proposer thought) and make the decision record; a proposer that has not answered once
   the run moved past ``limits.stale_after`` is not waited for: the rules decide instead;
5. :mod:`~atm.watcher.publish`: put it on the run;
6. :mod:`~atm.watcher.report`: the status line and ``atm history``.

Everything the daemon knows about a run's decisions is also on the run (``atm.seq``, update
tags, acks, the decision log), so a restarted daemon recovers it and neither repeats nor loses
an update.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from atm.adapters.base import (
    Backend,
    BackendUnavailable,
    HistoryTrimmed,
    MessageProblem,
    PoolExhausted,
    RunNotFound,
    RunView,
    release_history,
)
from atm.policies import Policy, blocked
from atm.schema import Ack, Action, DecisionRecord, Diagnosis, Status, TelemetrySnapshot
from atm.signing import KEY_ENV, KEY_FILE_ENV, KeySource, SigningKey
from atm.watcher.approval import answers, early, sighting
from atm.watcher.decide import decision_context, decision_inputs
from atm.watcher.effect import judge
from atm.watcher.poll import is_idle, keys_to_read, listener_notes, metric_notes, metric_notes_due, unmapped_status
from atm.watcher.proposer import Offer, Proposer, ProposalResult
from atm.watcher.publish import publish
from atm.watcher.reconcile import foreign_update, own_records, reconcile, unpublished_acks
from atm.watcher.report import RunStatus, status_fields
from atm.watcher.rules import RulesProposer, Thresholds, diagnose, stop_problem
from atm.watcher.schedule import PollSchedule
from atm.watcher.service import ErrorKind, Hooks
from atm.watcher.settle import out_of_time, outpaced, settle
from atm.watcher.shard import Shard, owns
from atm.watcher.snapshot import RunTelemetry
from atm.watcher.workers import ProposalPool
from atm.policies import DecisionContext

log = logging.getLogger("atm.watch")

MAX_BACKOFF_S = 60.0
#: How long a tick waits for a proposal before leaving it to a later tick.
SETTLE_NOW_S = 0.2
#: Late answers in a row after which the daemon says the proposer is too slow for the run.
STALE_WARN_AFTER = 3
#: Points of each metric a backend keeps once they are folded into a run's telemetry (16 bytes each):
#: the telemetry reads only what is new, and the poll checks read the newest point.
HISTORY_KEEP = 256


@dataclass
class _Inflight:
    future: cf.Future[ProposalResult]
    snapshot: TelemetrySnapshot
    #: What the proposer was handed with the snapshot: the fallback gets the same when the deadline passes.
    ctx: DecisionContext
    offer: Offer
    started: float
    #: When the evaluation it answers was logged (the job's clock), for the decision-lag metric; None if unknown.
    logged_at: float | None = None
    #: Settled without its answer (the deadline passed): the answer, when it comes, is dropped.
    abandoned: bool = False


@dataclass
class RunState:
    """The daemon's memory of one run; rebuilt from the run itself after a restart."""

    run_id: str
    records: list[DecisionRecord] = field(default_factory=list)
    seq: int = 0
    recovered: bool = False
    inflight: _Inflight | None = None
    #: Step of the last snapshot a proposer saw (decided or not): the next decision needs a newer evaluation.
    last_considered_step: int = -1
    done: bool = False
    #: Whether the run was told that the policy's evaluation metric is missing (once per run).
    noted_missing: bool = False
    #: Whether values outside the policy's bounds were reported (once per run).
    noted_bounds: bool = False
    #: Decisions in a row that came too late to apply, and whether that was reported (once per run).
    stale_in_a_row: int = 0
    noted_slow: bool = False
    #: Whether the proposer missing its deadline (the rules decided instead) was reported (once per run).
    noted_deadline: bool = False
    #: Whether the proposer being too slow for the run's pace (not asked: the rules decide at once) was reported.
    noted_outpaced: bool = False
    #: Whether a job still training after a stop it acknowledged was reported (once per run).
    noted_stop: bool = False
    #: Why nothing may be changed now (warm-up, cooldown, budget), for the status line; empty otherwise.
    waiting: str = ""
    #: The run's metrics folded so far: each poll adds only what is new.
    telemetry: RunTelemetry | None = None
    #: Messages on the run already reported (forged, foreign-key, malformed, stray acks): each is said once.
    reported: set[str] = field(default_factory=set)
    #: When this daemon first saw each answer to a decision held for approval (see :mod:`~atm.watcher.approval`).
    seen_answers: dict[str, float] = field(default_factory=dict)
    #: A problem the user must fix that the status line keeps showing (the job holds another key).
    alert: str = ""
    #: Updates the job refused that were reported.
    refused: set[int] = field(default_factory=set)
    #: The run's metric keys as last polled and those of them read (:func:`~atm.watcher.poll.keys_to_read`),
    #: worked out again only when its keys change.
    reading: tuple[frozenset[str], frozenset[str]] | None = None


@dataclass
class _Watch:
    """How the polls of one run are going (its decisions are in :class:`RunState`)."""

    #: When the daemon started watching it (monotonic): ``wait_for_run`` counts from here.
    started: float
    #: Failed polls in a row (the back-off), and of those the tracker's (said once, and when it is back).
    failures: int = 0
    down: int = 0


def _error_kind(exc: BackendUnavailable) -> ErrorKind:
    return ErrorKind.POOL_EXHAUSTED if isinstance(exc, PoolExhausted) else ErrorKind.UNREACHABLE


def _logged_at(view: RunView, step: int) -> float | None:
    """When the job logged its newest point at ``step`` (its own clock), if the view's timeline still holds it."""
    return next((t for t, s in reversed(view.timeline) if s == step), None)


def _newest_eval(telemetry: RunTelemetry) -> int:
    """The step of the run's newest evaluation (of its newest point, while it has none): what a decision considers."""
    evals = telemetry.eval_steps()
    return evals[-1] if evals else telemetry.step()


def shown_diagnosis(diagnosis: Diagnosis, evidence: str) -> str:
    """The status line's diagnosis. A supervised run whose remedies ran out is still overfitting or on a
    plateau, as its stop decision says (``overfitting -> stop``); "converged" there read as a contradiction.
    Pure."""
    problem = stop_problem(diagnosis, evidence) if diagnosis == Diagnosis.CONVERGED else None
    return (problem or diagnosis).value


def _stray_ack(seq: int, ack: Ack | None) -> str:
    """What to say of the job's signed ack for an update this watcher never published. A refusal is
    the common case: another client wrote an update tag at that number, and the job's listener
    turned it down; said as tampering, it alarmed more than it told."""
    if ack is not None and ack.status in ("rejected", "failed"):
        return (f"the job refused update #{seq}, which this watcher did not publish (another client wrote it to "
                "the run): nothing was applied")
    return f"ack #{seq} answers no update this watcher published; ignored"


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


class Daemon:
    """Watches runs and manages them within a policy."""

    def __init__(
        self,
        backend: Backend,
        policy: Policy,
        proposer: Proposer | None = None,
        *,
        interval: float = 5.0,
        dry_run: bool = False,
        wait_for_run: float = 0.0,
        fallback: Proposer | None = None,
        workers: int = 4,
        proposal_workers: int = 4,
        shard: Shard | None = None,
        hooks: Hooks | None = None,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[RunStatus], None] | None = None,
        key: SigningKey | None = None,
        approve: bool = False,
    ):
        """``workers``: threads polling runs (each run by one at a time); ``proposal_workers``: proposals
        in flight at once, on threads of their own (a slow model never holds up polling); ``shard``: watch
        only the experiment's runs this replica owns; ``hooks``: metrics and liveness (:mod:`~atm.watcher.service`).
        ``key``: the key the backend signs with, which tells the daemon's own records from others'
        (default: resolved from the environment on first use). ``approve``: hold every accepted
        decision for a person's approval, as the policy's ``limits.approval: required`` does."""
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        Thresholds.from_policy(policy)  # unknown thresholds fail at start, not at the first decision
        self.backend = backend
        self.policy = policy
        self.proposer = proposer or RulesProposer()
        self.fallback = fallback or RulesProposer()
        #: How long the proposer's recent answers took (every run's): is it fast enough for a run's pace?
        self._latencies: deque[float] = deque(maxlen=5)
        self.interval = interval
        self.dry_run = dry_run
        #: Seconds to keep looking for a run that does not exist yet (a W&B id set in advance).
        self.wait_for_run = wait_for_run
        self.clock = clock
        self.on_change = on_change
        self.keys = KeySource(key)
        self.approve = approve or policy.limits.approval == "required"
        self.stop_event = threading.Event()
        #: Wakes the watch loop: a stop, or a run's watch ending (a run not found ends atm-watch now,
        #: not at the next poll of the experiment).
        self._watch_wake = threading.Event()
        self.status: dict[str, RunStatus] = {}
        self._states: dict[str, RunState] = {}
        self._pool = ProposalPool(proposal_workers)
        self.workers = workers
        self.shard = shard
        self.hooks = hooks or Hooks()
        #: Guards the schedule and the watches; idle workers wait on it for the next run due.
        self._lock = threading.Condition()
        self._schedule = PollSchedule(interval)
        #: Every run watched so far, kept after it ends (an idle run still listed RUNNING is not picked up again).
        self._watches: dict[str, _Watch] = {}
        self._workers: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def watch(self, run_ids: Sequence[str] = (), experiment: str | None = None) -> None:
        """Watch until stopped (SIGTERM, Ctrl-C) or, without ``experiment``, until every run ended.

        With ``experiment``, its RUNNING runs are listed every interval, and those this daemon's
        shard owns are watched from then on.
        """
        self._start_workers()
        for rid in run_ids:
            self._add_run(rid)
        backoff = 0
        said: str | None = None
        while not self.stop_event.is_set():
            if experiment is not None:
                try:
                    found = [rid for rid in self.backend.running_runs(experiment) if owns(rid, self.shard)]
                    self.hooks.listing_finished()
                    for rid in found:
                        self._add_run(rid)
                    backoff = 0
                    if not found and not self._watches and said != "none":
                        said = "none"
                        log.warning("no running runs%s in %r yet; waiting (runs are picked up as they start)",
                                    f" of shard {self.shard}" if self.shard else "", experiment)
                except RunNotFound as exc:
                    if said != "missing":  # the job's first run creates it: start the daemon first, that is fine
                        said = "missing"
                        log.warning("%s; waiting for it to appear", exc)
                except BackendUnavailable as exc:
                    backoff += 1
                    self.hooks.listing_finished(_error_kind(exc))
                    log.warning("listing runs of %r failed: %s", experiment, exc)
            elif self._watches and not self._schedule:
                break  # every --run ended
            self.hooks.idle()
            deadline = time.monotonic() + min(self.interval * 2**backoff, MAX_BACKOFF_S)
            # In slices, so that a stop_event set from outside (a signal handler) is seen within 0.5 s too.
            while not (self.stop_event.is_set() or self._watch_wake.is_set()) and time.monotonic() < deadline:
                self._watch_wake.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            self._watch_wake.clear()
        self.stop()

    def stop(self) -> None:
        """Stop watching: every wait ends, the workers are joined (10 s for all: a poll stuck in a
        tracker call is left behind, its thread is a daemon thread) and decisions in flight are dropped."""
        self.stop_event.set()
        self._watch_wake.set()
        with self._lock:
            self._lock.notify_all()
        deadline = time.monotonic() + 10
        for t in list(self._workers):
            if t.ident is not None and t is not threading.current_thread():
                t.join(timeout=max(0.0, deadline - time.monotonic()))
        self._pool.shutdown()
        for st in list(self._states.values()):
            if st.inflight is not None and not st.inflight.future.done():
                log.warning("run %s: stopping with a decision in flight (asked at step %d); it is dropped and "
                            "nothing was published", st.run_id, st.inflight.snapshot.step)
                st.inflight = None

    def _start_workers(self) -> None:
        with self._lock:
            if self._workers:
                return
            self._workers = [threading.Thread(target=self._work, name=f"atm-poll-{i}", daemon=True)
                             for i in range(self.workers)]
        for t in self._workers:
            t.start()

    def _add_run(self, run_id: str) -> None:
        """Watch a run from now on, first polled at its place in the interval (runs found together are spread)."""
        with self._lock:
            if run_id in self._watches:
                return
            now = time.monotonic()
            self._watches[run_id] = _Watch(started=now)
            self._states.setdefault(run_id, RunState(run_id))
            self.status.setdefault(run_id, RunStatus(run_id))
            self._schedule.add(run_id, now)
            watched = len(self._schedule)
            self._lock.notify()
        self.hooks.watching(watched)

    def _work(self) -> None:
        """One poll worker: takes the run due longest ago, polls it, gives it back with its next due time."""
        while (run_id := self._next_due()) is not None:
            self.hooks.poll_started(run_id)
            started = time.monotonic()
            retry_in, done, error = self._poll(run_id)
            self.hooks.poll_finished(run_id, time.monotonic() - started, error)
            with self._lock:
                self._schedule.give_back(run_id, time.monotonic(), retry_in=retry_in, done=done)
                watched = len(self._schedule)
                self._lock.notify()
            if done:
                self._release(run_id)
                self.hooks.watching(watched)
                self._watch_wake.set()  # a run not found ends atm-watch now, not at the next listing

    def _next_due(self) -> str | None:
        """The next run to poll, once one is due; None when the daemon stops."""
        while not self.stop_event.is_set():
            with self._lock:
                now = time.monotonic()
                run_id = self._schedule.take(now)
                if run_id is not None:
                    return run_id
                wait = self._schedule.wait_time(now)
                # In slices: a stop_event set by a signal handler does not notify this condition.
                self._lock.wait(0.5 if wait is None else min(wait, 0.5))
            self.hooks.idle()
        return None

    def _poll(self, run_id: str) -> tuple[float | None, bool, ErrorKind | None]:
        """Tick one run; returns (seconds until a retry, or None for its next slot; whether its watch
        ended; what went wrong, if anything)."""
        w = self._watches[run_id]
        try:
            st = self.tick(run_id)
        except BackendUnavailable as exc:
            w.failures += 1
            w.down += 1
            kind = _error_kind(exc)
            exhausted = kind is ErrorKind.POOL_EXHAUSTED
            self._set(run_id, state="pool exhausted" if exhausted else "unreachable", error=str(exc)[:200])
            if w.down == 1 and exhausted:
                log.warning("run %s: %s; retrying", run_id, exc)  # the message says what to change
            elif w.down == 1:
                log.warning("run %s: tracker unreachable (%s); retrying", run_id, exc)
            else:
                log.debug("run %s: still failing (%s)", run_id, exc)
            return self._backoff(w.failures), False, kind
        except RunNotFound as exc:
            seen = self._states[run_id].recovered  # polled once: it existed, so it is gone, not late
            if not seen and time.monotonic() - w.started < self.wait_for_run:
                if self.status[run_id].state != "waiting":
                    # Progress, not an error: the job has not created the run yet (the not-found text
                    # is said only if the wait runs out).
                    left = self.wait_for_run - (time.monotonic() - w.started)
                    self._set(run_id, state="waiting", error="",
                              pending=f"the run is not started yet; looking for it up to {left:.0f} s more (--wait)")
                    log.info("run %s: not started yet; looking for it every %gs for up to %.0f s (--wait)",
                             run_id, self.interval, left)
                return None, False, None
            # Said once, in full, when atm-watch ends (and on the status line meanwhile).
            self._set(run_id, state="not found", error=str(exc))
            return None, True, ErrorKind.NOT_FOUND
        except Exception:
            w.failures += 1
            log.exception("run %s: unexpected error; the watch goes on", run_id)
            return self._backoff(w.failures), self._states[run_id].done, ErrorKind.UNEXPECTED
        if w.down:
            log.warning("run %s: the tracker answers again (after %d failed polls)", run_id, w.down)
        w.failures = w.down = 0
        return None, st.done, None

    def _release(self, run_id: str) -> None:
        """A run's watch ended: drop what is kept of it here (its points and decisions, about 14 KB a
        decision: a daemon watching an experiment for months sees thousands of runs end) and in the
        backend. Its status line stays, and whether it was seen (a run not found is gone, not late)."""
        st = self._states[run_id]
        self._states[run_id] = RunState(run_id, recovered=st.recovered, done=st.done)
        self.backend.forget(run_id)

    def _backoff(self, failures: int) -> float:
        return min(self.interval * 2**failures, MAX_BACKOFF_S)

    def _answered(self, run_id: str, inflight: _Inflight) -> None:
        """A proposal's future is done: settle it now, unless the deadline settled it without its answer."""
        if not inflight.abandoned:
            self._poke(run_id)
            return
        future = inflight.future
        if future.cancelled():
            return  # cancelled before it started: nothing was asked
        exc = future.exception()
        log.debug("run %s: %s answered step %d after %.1f s, past its deadline (the rules had decided); dropped: %s",
                  run_id, self.proposer.name, inflight.snapshot.step, self.clock() - inflight.started,
                  exc if exc is not None else future.result().proposal.diagnosis.value)

    def _poke(self, run_id: str) -> None:
        """Poll ``run_id`` as soon as a worker is free: its proposal answered, settle it now."""
        with self._lock:
            self._schedule.poke(run_id, time.monotonic())
            self._lock.notify()

    # ------------------------------------------------------------------ one step of one run

    def tick(self, run_id: str, wait: bool = False) -> RunState:
        """Poll one run once and act on it. With ``wait``, a decision started now is awaited and settled."""
        st = self._states.setdefault(run_id, RunState(run_id))
        self.status.setdefault(run_id, RunStatus(run_id))
        view = self._read(st, run_id)
        seen_before = st.recovered
        if not st.recovered:
            st.records = self._own_records(run_id)
            st.recovered = True
            st.last_considered_step = max((r.step for r in st.records), default=-1)
        self._report_problems(st, view)
        # Only updates signed with this daemon's key are in view.updates: a tag another client wrote is
        # a reported problem, never "another atm-watch". A signed one it did not make is another
        # watcher holding the same key.
        foreign = foreign_update(st.records, view.updates, seen_before)
        if foreign is not None:
            # Two managers on one run overwrite each other's updates and logs, and each one's cooldowns
            # and budgets miss the other's changes: this one steps back, loudly, and writes nothing more.
            why = (f"another atm-watch is managing this run (update #{foreign.seq}, decided at step {foreign.step}, is "
                   "signed with this daemon's key but is not its own); stop the other one and restart this one if it "
                   "should manage the run")
            log.error("run %s: %s. Two managers on one run overwrite each other's updates: this daemon stops "
                      "managing the run.", run_id, why)
            st.done = True
            if st.inflight is not None:
                st.inflight.future.cancel()
                st.inflight = None
            self._set(run_id, state="another daemon", error=f"update #{foreign.seq} is another daemon's", gave_up=why)
            return st
        st.records, changed = reconcile(st.records, view)
        st.seq = max([st.seq, view.last_seq, *(r.seq for r in st.records)])
        judged = self._judge(st, view)
        answered = self._answer_approvals(st, view)
        for r in st.records:
            if r.seq in answered and r.status == Status.PENDING:
                self.backend.publish(r)  # approved: the update goes to the job (before the log says so)
        if changed or judged or answered:
            self.backend.write_log(run_id, st.records)
            for r in st.records:
                if r.seq in judged:
                    self.backend.publish(r)  # the effect's tag
            self.backend.publish(st.records[-1])  # refreshes the summary tag; update tags are idempotent
            for r in st.records:
                if r.status == Status.REJECTED and r.seq in view.acks and r.seq not in st.refused:
                    st.refused.add(r.seq)  # the job refused it whole (a limit, or its key): say why, once
                    log.warning("run %s: the job refused update #%d: %s", run_id, r.seq, view.acks[r.seq].error)
                elif r.status == Status.UNDONE and r.seq not in st.refused:
                    st.refused.add(r.seq)  # applied, then set back by the job itself: say the cause and fix, once
                    log.warning("run %s: the job undid change #%d (%s)", run_id, r.seq, r.reason)
                    self.backend.publish(r)  # its tags and the run's note say it too
                elif r.status in (Status.APPLIED, Status.FAILED) and r.seq in view.acks:
                    log.debug("run %s: %s", run_id, r.summary())

        if st.inflight is not None and (st.inflight.future.done() or wait):
            self._settle_decision(st, view)
        elif st.inflight is not None and self._missed_deadline(st, view):
            self._settle_decision(st, view, missed=True)
        if not st.noted_bounds and view.listener is not None:
            st.noted_bounds = True
            for note in listener_notes(self.policy, view):
                log.warning("run %s: %s", run_id, note)
        if not st.noted_missing and metric_notes_due(view, self.clock(), self.policy):
            st.noted_missing = True
            for note in metric_notes(self.policy, view):
                log.warning("run %s: %s", run_id, note)
        self._set(run_id, note=unmapped_status(self.policy, view))  # until the job logs a key that maps

        ended = view.status != "RUNNING" or is_idle(view, self.clock(), self.policy.limits.idle_minutes)
        if ended:
            st.done = st.inflight is None
            self._update_status(st, view, state="finished" if view.status != "RUNNING" else "idle")
            return st

        if st.inflight is None:
            self._update_status(st, view)  # the step and name first: a decision's status lines show them
            self._maybe_decide(st, view)
        if wait and st.inflight is not None:
            self._settle_decision(st, view)
        self._update_status(st, view)
        return st

    def _own_records(self, run_id: str) -> list[DecisionRecord]:
        """The run's decision log, only the records signed with this daemon's key; the rest said once."""
        records, refused = own_records(self.backend.read_log(run_id), self.keys.get_or_none(),
                                       key_problem=self.keys.problem, run_id=run_id)
        if refused:
            log.warning(
                "run %s: %d record(s) of the decision log are not this watcher's (%s): they are not taken as its "
                "decisions, so their changes count towards no cooldown or budget and `atm history` does not show "
                "them; the log is rewritten without them at the next decision (a log written before atm signed "
                "its records is refused the same way; the run's update and ack tags keep what the job applied)",
                run_id, len(refused), refused[0])
        return records

    def _report_problems(self, st: RunState, view: RunView) -> None:
        """Say once each message on the run that was not taken, and acks for updates never published;
        the status line counts them. An ack signed with another key for an update of this daemon's
        means the job holds another key: that is said plainly, with the fix, and stays on the status line."""
        stray = [MessageProblem("", _stray_ack(seq, view.acks.get(seq)), "ack", seq)
                 for seq in unpublished_acks(st.records, view)]
        # The watcher's updates still waiting for the job (one its log missed is rebuilt from the run).
        logged = {r.seq for r in st.records}
        mine = {r.seq for r in st.records if r.status == Status.PENDING} | (set(view.updates) - logged)
        if st.alert and not mine:
            st.alert = ""  # the update it was about is settled: the job holds the key now
        for p in [*view.problems, *stray]:
            text = str(p)
            if text in st.reported:
                continue
            st.reported.add(text)
            if p.kind == "ack" and p.seq in mine and "signed with key id" in p.reason:
                key = self.keys.get_or_none()
                st.alert = (f"the job acknowledged update #{p.seq} with another atm key than this watcher's "
                            f"({key.key_id + ' from ' + key.source if key else 'none'}), so it refuses every update: "
                            f"give the job and the watcher the same {KEY_ENV} (or {KEY_FILE_ENV}) and restart the job")
                log.error("run %s: %s (%s)", st.run_id, st.alert, p.reason)
            else:
                log.warning("run %s: %s", st.run_id, p)
        self._set(st.run_id, problems=len(st.reported))

    def _answer_approvals(self, st: RunState, view: RunView) -> list[int]:
        """Settle the decisions held for approval that a person answered, or that expired; the numbers settled."""
        now = self.clock()
        # An answer no longer on the run is forgotten: a tag removed and added again is seen anew.
        present = {sighting(a) for a in view.approvals}
        st.seen_answers = {k: t for k, t in st.seen_answers.items() if k in present}
        for a in view.approvals:
            st.seen_answers.setdefault(sighting(a), now)
        if not any(r.status == Status.AWAITING_APPROVAL for r in st.records):
            return []
        for a in early(st.records, view.approvals, st.seen_answers):
            note = (f"{a.by} names #{a.seq} but was on the run before decision #{a.seq} was made: not taken (a tag "
                    f"written in advance approves nothing); remove it and add it again to {a.decision} #{a.seq}")
            if note not in st.reported:
                st.reported.add(note)
                log.warning("run %s: %s", st.run_id, note)
        ctx = decision_context(self.policy, view, st.records, {}, telemetry=self._telemetry(st, view))
        out = answers(st.records, view.approvals, seen_at=st.seen_answers, ctx=ctx,
                      window=self.policy.limits.approval_window,
                      ended=view.status if view.status != "RUNNING" else None)
        by_seq = {a.seq: a for a in out}
        for r in st.records:
            got = by_seq.get(r.seq)
            if got is None:
                continue
            r.status, r.approval = got.status, got.approval
            log.info("run %s: #%d %s", st.run_id, r.seq, got.approval)
        return list(by_seq)

    def _judge(self, st: RunState, view: RunView) -> list[int]:
        """Judge the applied changes whose ``limits.settle`` evaluations are in; the numbers judged now."""
        evals = self.policy.limits.settle.evals
        if evals < 1 or not any(r.status == Status.APPLIED and r.effect is None for r in st.records):
            return []
        series = self._telemetry(st, view).eval_series()
        if series is None:
            return []
        key, higher_is_better, points = series
        st.records, judged = judge(st.records, points, metric=key, higher_is_better=higher_is_better, evals=evals,
                                   ended=view.status != "RUNNING")
        for r in st.records:
            if r.seq in judged and r.effect is not None:
                log.info("run %s: #%d %s", st.run_id, r.seq, r.effect.summary())
        return judged

    def _maybe_decide(self, st: RunState, view: RunView) -> None:
        if view.listener is None:
            self._set(st.run_id, state="no listener", pending="")
            return
        if any(r.status in (Status.PENDING, Status.AWAITING_APPROVAL) for r in st.records):
            return  # the job has not applied the last update yet (or a person not answered); decide on what it does
        telemetry = self._telemetry(st, view)
        newest_eval = _newest_eval(telemetry)
        if newest_eval <= st.last_considered_step:
            return  # no new evaluation: nothing to decide, and no snapshot to build
        st.last_considered_step = newest_eval
        snapshot, ctx, offer = decision_inputs(self.policy, view, st.records, now=self.clock(), dry_run=self.dry_run,
                                               telemetry=telemetry)
        diag, evidence = diagnose(snapshot, Thresholds.from_policy(self.policy))
        self._set(st.run_id, diagnosis=shown_diagnosis(diag, evidence))
        if not offer.choices and not offer.actions:
            # Warm-up, cooldown or budget: nothing the proposer could do. The status says which.
            st.waiting = blocked(self.policy, ctx) or "every parameter is in its cooldown, out of budget or at its bound"
            if not st.noted_stop and any(r.action == Action.STOP for r in ctx.counted()):
                st.noted_stop = True  # the job goes on after a stop it acknowledged: say once why nothing more is done
                log.warning("run %s: %s", st.run_id, st.waiting)
            return
        st.waiting = ""
        why = self._outpaced(st, view, telemetry)
        if why:
            # Its answer would come after the deadline: asking would only delay the rules' decision.
            future: cf.Future[ProposalResult] = cf.Future()
            future.set_result(self._fall_back(snapshot, ctx, offer, f"not asked: {why}"))
        else:
            future = self._pool.submit(self._propose, snapshot, ctx, offer)
        inflight = st.inflight = _Inflight(future, snapshot, ctx, offer, self.clock(),
                                           logged_at=_logged_at(view, newest_eval))
        future.add_done_callback(lambda _f: self._answered(st.run_id, inflight))
        self._set(st.run_id, pending=f"deciding on step {snapshot.step}")
        # A fast proposer (rules) answers at once: settle against the view just read.
        try:
            future.result(timeout=SETTLE_NOW_S)
        except (cf.TimeoutError, Exception):
            return
        self._settle_decision(st, view)
        with self._lock:  # settled in this poll: the extra poll its answer asked for would read nothing new
            self._schedule.unpoke(st.run_id)

    def _read(self, st: RunState, run_id: str) -> RunView:
        """Poll the run and fold what is new into its telemetry; then the backend may let go of the
        points folded (all but the newest ``HISTORY_KEEP`` a metric), so a run's memory does not
        grow with its length. Only the keys the policy maps are read (:func:`~atm.watcher.poll.keys_to_read`)."""

        def select(keys: Sequence[str]) -> frozenset[str]:
            present = frozenset(keys)
            if st.reading is None or st.reading[0] != present:
                st.reading = (present, keys_to_read(self.policy, keys))
            return st.reading[1]

        view = self.backend.poll(run_id, select)
        try:
            self._telemetry(st, view)
        except HistoryTrimmed as exc:
            # A series to fold again from its start (a job resumed from a checkpoint logs its steps
            # again) whose early points were let go: read the run whole once, into new telemetry.
            log.info("run %s: reading its metrics anew (%s)", run_id, exc)
            self.backend.forget(run_id)
            st.telemetry = None
            view = self.backend.poll(run_id, select)
            self._telemetry(st, view)
        release_history(view.history, HISTORY_KEEP)
        return view

    def _telemetry(self, st: RunState, view: RunView) -> RunTelemetry:
        """The run's telemetry, with what is new in ``view`` folded in."""
        if st.telemetry is None:
            st.telemetry = RunTelemetry(self.policy)
        st.telemetry.fold(view.history)
        return st.telemetry

    def _propose(self, snapshot: TelemetrySnapshot, ctx: DecisionContext, offer: Offer) -> ProposalResult:
        started = time.monotonic()
        try:
            result = self.proposer.propose(snapshot, self.policy, ctx, offer)
        except Exception as exc:
            if self.proposer is self.fallback:
                raise
            audit = dict(getattr(exc, "audit", {}) or {})
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log.warning("run %s: proposer %s failed (%s); falling back to rules (the decision's audit has the details)",
                        snapshot.run_id, self.proposer.name, _clip(first, 240))
            result = self._fall_back(snapshot, ctx, offer, f"{type(exc).__name__}: {exc}", failed_attempt=audit)
        result.audit.setdefault("latency_s", round(time.monotonic() - started, 3))
        self._latencies.append(time.monotonic() - started)
        return result

    def _fall_back(self, snapshot: TelemetrySnapshot, ctx: DecisionContext, offer: Offer, error: str,
                   **audit: object) -> ProposalResult:
        """The fallback's answer in the proposer's place, its audit saying whose place and why."""
        result = self.fallback.propose(snapshot, self.policy, ctx, offer)
        result.audit = {"fallback_from": self.proposer.name, "error": error, **audit, **result.audit}
        result.source = "fallback"
        return result

    def _outpaced(self, st: RunState, view: RunView, telemetry: RunTelemetry) -> str:
        """Why the proposer would answer this run only after its deadline (see :func:`outpaced`); empty if in time."""
        if self.proposer.name == self.fallback.name:
            return ""
        evals = [(s, t) for s in telemetry.eval_steps()[-6:] if (t := _logged_at(view, s)) is not None]
        why = outpaced(list(self._latencies), evals, self.policy.limits.stale_after)
        if why and not st.noted_outpaced:
            st.noted_outpaced = True
            log.warning("run %s: proposer %s is not asked while the run is this fast (%s): the rules decide at "
                        "once. Use a faster model (--llm) or a larger limits.stale_after in the policy for the "
                        "proposer to decide.", st.run_id, self.proposer.name, why)
        return why

    def _missed_deadline(self, st: RunState, view: RunView) -> bool:
        """Whether the proposal in flight can no longer come in time: the run moved past ``limits.stale_after``
        since the snapshot it answers, so the answer would be stale (or kept only if the problem stood)."""
        inflight = st.inflight
        assert inflight is not None
        if view.status != "RUNNING" or self.proposer.name == self.fallback.name:
            # An ended run waits as before (nothing would apply an answer); the fallback has nothing faster to defer to.
            return False
        ctx = decision_context(self.policy, view, st.records, {}, telemetry=self._telemetry(st, view))
        return out_of_time(ctx, inflight.snapshot.step, self.policy.limits.stale_after)

    def _settle_decision(self, st: RunState, view: RunView, missed: bool = False) -> None:
        """Settle the decision in flight: with its answer, or, when it ``missed`` its deadline, with the fallback's."""
        inflight = st.inflight
        assert inflight is not None
        st.inflight = None
        if missed:
            result = self._instead_of_late(st, inflight)
        else:
            try:
                result = inflight.future.result()
            except Exception as exc:
                log.error("run %s: no proposal (%s)", st.run_id, exc)
                return
        out = settle(result, inflight.snapshot, view, st.records, self.policy, seq=st.seq + 1, now=self.clock(),
                     dry_run=self.dry_run, fallback=self.fallback, telemetry=self._telemetry(st, view))
        if missed:
            # The rules decided on the run as it is now: the next decision waits for a newer evaluation.
            st.last_considered_step = max(st.last_considered_step, _newest_eval(self._telemetry(st, view)))
        self._set(st.run_id, diagnosis=out.proposal.diagnosis.value, pending="")
        record = out.record
        if record is None:
            # With the why: a problem seen and nothing done (a knob at its bound, no rollback registered)
            # read as the manager ignoring it.
            why = out.proposal.rationale.strip()
            log.info("run %s step %d: %s, no change (%s)%s", st.run_id, out.asked.step, out.proposal.diagnosis.value,
                     out.source, f": {why}" if why else "")
            self.hooks.decided(self._lag(inflight))
            return
        self._note_staleness(st, record.status, record.audit.get("latency_s"), record.step, out.now_step)
        st.seq = record.seq
        if record.status == Status.PENDING and self.approve:
            record.status = Status.AWAITING_APPROVAL  # recorded on the run, sent to the job once approved
        publish(self.backend, st.records, record)
        self.hooks.decided(self._lag(inflight))
        log.info("run %s: %s — %s", st.run_id, record.summary(), record.reason)
        if record.status == Status.AWAITING_APPROVAL:
            log.warning("run %s: decision #%d awaits approval: add the run tag atm.approve = %d (or atm.reject = %d) "
                        "in the tracker's UI, or run `atm approve --run %s %d` (`atm reject ...`)",
                        st.run_id, record.seq, record.seq, record.seq, st.run_id, record.seq)

    def _instead_of_late(self, st: RunState, inflight: _Inflight) -> ProposalResult:
        """The fallback's answer for a proposal that missed its deadline; the late call is left to finish
        (a model call cannot be interrupted) and its answer dropped."""
        inflight.abandoned = True
        # One not started yet (waiting for a free proposal worker) never runs: it would only be dropped.
        inflight.future.cancel()
        waited = self.clock() - inflight.started
        span = self.policy.limits.stale_after.describe()
        result = self._fall_back(inflight.snapshot, inflight.ctx, inflight.offer,
                                 f"no answer before the run moved past limits.stale_after ({span}, {waited:.1f} s)")
        result.audit["latency_s"] = round(waited, 3)
        if not st.noted_deadline:
            st.noted_deadline = True
            log.warning(
                "run %s: proposer %s had not answered step %d after %.1f s, when the run had moved past "
                "limits.stale_after (%s): the rules decided on the run as it is now, as they will each time it is "
                "this late. Use a faster model (--llm) or a larger limits.stale_after in the policy for the "
                "proposer to decide.",
                st.run_id, self.proposer.name, inflight.snapshot.step, waited, span)
        return result

    def _lag(self, inflight: _Inflight) -> float | None:
        """Seconds from the evaluation being logged to now (the job's clock against this one's)."""
        return None if inflight.logged_at is None else self.clock() - inflight.logged_at

    def _note_staleness(self, st: RunState, status: Status, took: object, decided: int, now: int) -> None:
        """Say once per run when the proposer is too slow for the run: its answers keep arriving stale."""
        st.stale_in_a_row = st.stale_in_a_row + 1 if status == Status.STALE else 0
        if st.stale_in_a_row < STALE_WARN_AFTER or st.noted_slow:
            return
        st.noted_slow = True
        log.warning(
            "run %s: %d decisions in a row came too late to apply (the last took %s while the run went from "
            "step %d to %d). Give the proposer more time (limits.stale_after in the policy), a faster model "
            "(--llm), or use --proposer rules.",
            st.run_id, st.stale_in_a_row, f"{took:.0f} s" if isinstance(took, (int, float)) else "long", decided, now,
        )

    # ------------------------------------------------------------------ status

    def _set(self, run_id: str, **kw: object) -> None:
        s = self.status.setdefault(run_id, RunStatus(run_id))
        for k, v in kw.items():
            setattr(s, k, v)
        if self.on_change:
            self.on_change(s)

    def _update_status(self, st: RunState, view: RunView, state: str | None = None) -> None:
        deciding = self.status[st.run_id].pending if st.inflight else None
        fields = status_fields(st.records, view, deciding=deciding, dry_run=self.dry_run, state=state,
                               waiting=st.waiting)
        if st.alert:
            fields.update(state=state or "key mismatch", error=st.alert)
        self._set(st.run_id, **fields)



__all__ = ["Daemon", "RunState", "RunStatus"]
