"""The daemon: one watch loop per run, proposals off the loop, every decision recorded on the run.

A run's path, one module each, every ``interval`` seconds (a wait that stop interrupts):

1. :mod:`~atm.watcher.poll`: read the run (new metric points, listener state, acks) and what to
   tell the user about it once;
2. :mod:`~atm.watcher.reconcile`: merge the decision log with what is on the run;
3. :mod:`~atm.watcher.decide`: when the run logged a new evaluation and nothing is pending, build
   the snapshot and the offer and hand them to the proposer on a worker (one decision in flight per run);
4. :mod:`~atm.watcher.settle`: re-check the answer against the run as it is *now* (it kept training
   while the proposer thought) and make the decision record;
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from atm.adapters.base import Backend, BackendUnavailable, RunNotFound, RunView
from atm.policies import Policy
from atm.schema import Status, TelemetrySnapshot, DecisionRecord
from atm.watcher.decide import decision_inputs
from atm.watcher.poll import is_idle, listener_notes, metric_notes, metric_notes_due
from atm.watcher.proposer import Offer, Proposer, ProposalResult
from atm.watcher.publish import publish
from atm.watcher.reconcile import foreign_update, reconcile
from atm.watcher.report import RunStatus, status_fields
from atm.watcher.rules import RulesProposer, Thresholds, diagnose
from atm.watcher.settle import settle
from atm.watcher.workers import ProposalPool
from atm.policies import DecisionContext

log = logging.getLogger("atm.watch")

MAX_BACKOFF_S = 60.0
#: How long a tick waits for a proposal before leaving it to a later tick.
SETTLE_NOW_S = 0.2
#: Late answers in a row after which the daemon says the proposer is too slow for the run.
STALE_WARN_AFTER = 3


@dataclass
class _Inflight:
    future: cf.Future[ProposalResult]
    snapshot: TelemetrySnapshot
    started: float


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
    #: Set when a proposal finishes, so the run's loop settles it without waiting a full interval.
    wake: threading.Event = field(default_factory=threading.Event)


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
        max_workers: int = 4,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[RunStatus], None] | None = None,
    ):
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        Thresholds.from_policy(policy)  # unknown thresholds fail at start, not at the first decision
        self.backend = backend
        self.policy = policy
        self.proposer = proposer or RulesProposer()
        self.fallback = fallback or RulesProposer()
        self.interval = interval
        self.dry_run = dry_run
        #: Seconds to keep looking for a run that does not exist yet (a W&B id set in advance).
        self.wait_for_run = wait_for_run
        self.clock = clock
        self.on_change = on_change
        self.stop_event = threading.Event()
        #: Wakes the watch loop: a stop, or a run's thread ending (a run not found ends atm-watch now,
        #: not at the next poll of the experiment).
        self._watch_wake = threading.Event()
        self.status: dict[str, RunStatus] = {}
        self._states: dict[str, RunState] = {}
        self._pool = ProposalPool(max_workers)
        self._threads: dict[str, threading.Thread] = {}

    # ------------------------------------------------------------------ lifecycle

    def watch(self, run_ids: Sequence[str] = (), experiment: str | None = None) -> None:
        """Watch until stopped (SIGTERM, Ctrl-C) or, without ``experiment``, until every run ended."""
        for rid in run_ids:
            self._start_run(rid)
        backoff = 0
        said: str | None = None
        while not self.stop_event.is_set():
            if experiment is not None:
                try:
                    found = self.backend.running_runs(experiment)
                    for rid in found:
                        self._start_run(rid)
                    backoff = 0
                    if not found and not self._threads and said != "none":
                        said = "none"
                        log.warning("no running runs in %r yet; waiting (runs are picked up as they start)", experiment)
                except RunNotFound as exc:
                    if said != "missing":  # the job's first run creates it: start the daemon first, that is fine
                        said = "missing"
                        log.warning("%s; waiting for it to appear", exc)
                except BackendUnavailable as exc:
                    backoff += 1
                    log.warning("listing runs of %r failed: %s", experiment, exc)
            elif self._threads and not any(t.is_alive() for t in self._threads.values()):
                break
            deadline = time.monotonic() + min(self.interval * 2**backoff, MAX_BACKOFF_S)
            # In slices, so that a stop_event set from outside (a signal handler) is seen within 0.5 s too.
            while not (self.stop_event.is_set() or self._watch_wake.is_set()) and time.monotonic() < deadline:
                self._watch_wake.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            self._watch_wake.clear()
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        self._watch_wake.set()
        for st in list(self._states.values()):
            st.wake.set()
        # Runs may still be starting on the watch thread: a copy, and only threads that did start.
        for t in list(self._threads.values()):
            if t.ident is not None:
                t.join(timeout=10)
        self._pool.shutdown()
        for st in list(self._states.values()):
            if st.inflight is not None and not st.inflight.future.done():
                log.warning("run %s: stopping with a decision in flight (asked at step %d); it is dropped and "
                            "nothing was published", st.run_id, st.inflight.snapshot.step)
                st.inflight = None

    def _start_run(self, run_id: str) -> None:
        if run_id in self._threads:
            return
        self._states[run_id] = RunState(run_id)
        self.status[run_id] = RunStatus(run_id)
        t = threading.Thread(target=self._run_loop, args=(run_id,), name=f"atm-run-{run_id[:8]}", daemon=True)
        self._threads[run_id] = t
        t.start()

    def _run_loop(self, run_id: str) -> None:
        try:
            self._watch_run(run_id)
        finally:
            self._watch_wake.set()

    def _watch_run(self, run_id: str) -> None:
        failures = down = 0
        started = time.monotonic()
        while not self.stop_event.is_set():
            try:
                self.tick(run_id)
                if down:
                    log.warning("run %s: the tracker answers again (after %d failed polls)", run_id, down)
                failures = down = 0
            except BackendUnavailable as exc:
                failures += 1
                down += 1
                self._set(run_id, state="unreachable", error=str(exc)[:200])
                if down == 1:
                    log.warning("run %s: tracker unreachable (%s); retrying", run_id, exc)
                else:
                    log.debug("run %s: still unreachable (%s)", run_id, exc)
            except RunNotFound as exc:
                seen = self._states[run_id].recovered  # polled once: it existed, so it is gone, not late
                if not seen and time.monotonic() - started < self.wait_for_run:
                    if self.status[run_id].state != "waiting":
                        self._set(run_id, state="waiting", error=str(exc)[:200])
                        log.warning("run %s: not there yet; waiting up to %.0fs for it", run_id, self.wait_for_run)
                    self.stop_event.wait(self.interval)
                    continue
                # Said once, in full, when atm-watch ends (and on the status line meanwhile).
                self._set(run_id, state="not found", error=str(exc))
                return
            except Exception:
                failures += 1
                log.exception("run %s: unexpected error; the watch goes on", run_id)
            st = self._states[run_id]
            if st.done:
                return
            st.wake.wait(min(self.interval * 2**failures, MAX_BACKOFF_S))
            st.wake.clear()

    # ------------------------------------------------------------------ one step of one run

    def tick(self, run_id: str, wait: bool = False) -> RunState:
        """Poll one run once and act on it. With ``wait``, a decision started now is awaited and settled."""
        st = self._states.setdefault(run_id, RunState(run_id))
        self.status.setdefault(run_id, RunStatus(run_id))
        view = self.backend.poll(run_id)
        seen_before = st.recovered
        if not st.recovered:
            st.records = self.backend.read_log(run_id)
            st.recovered = True
            st.last_considered_step = max((r.step for r in st.records), default=-1)
        foreign = foreign_update(st.records, view.updates, seen_before)
        if foreign is not None:
            # Two managers on one run overwrite each other's updates and logs, and each one's cooldowns
            # and budgets miss the other's changes: this one steps back, loudly, and writes nothing more.
            log.error(
                "run %s: another atm-watch is managing this run (update #%d, decided at step %d, is not this "
                "daemon's); two managers on one run overwrite each other's updates. This daemon stops managing "
                "the run; stop the other one and restart this if it should manage it.", run_id, foreign.seq, foreign.step,
            )
            st.done = True
            if st.inflight is not None:
                st.inflight.future.cancel()
                st.inflight = None
            self._set(run_id, state="another daemon", error=f"update #{foreign.seq} is another daemon's")
            return st
        st.records, changed = reconcile(st.records, view)
        st.seq = max([st.seq, view.last_seq, *(r.seq for r in st.records)])
        if changed:
            self.backend.write_log(run_id, st.records)
            self.backend.publish(st.records[-1])  # refreshes the summary tag; update tags are idempotent
            for r in st.records:
                if r.status in (Status.APPLIED, Status.FAILED) and r.seq in view.acks:
                    log.debug("run %s: %s", run_id, r.summary())

        if st.inflight is not None and (st.inflight.future.done() or wait):
            self._settle_decision(st, view)
        if not st.noted_bounds and view.listener is not None:
            st.noted_bounds = True
            for note in listener_notes(self.policy, view):
                log.warning("run %s: %s", run_id, note)
        if not st.noted_missing and metric_notes_due(view, self.clock()):
            st.noted_missing = True
            for note in metric_notes(self.policy, view):
                log.warning("run %s: %s", run_id, note)

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

    def _maybe_decide(self, st: RunState, view: RunView) -> None:
        if view.listener is None:
            self._set(st.run_id, state="no listener", pending="")
            return
        if any(r.status == Status.PENDING for r in st.records):
            return  # the job has not applied the last update yet; decide on what it does with it
        snapshot, ctx, offer = decision_inputs(self.policy, view, st.records, now=self.clock(), dry_run=self.dry_run)
        evals = ctx.eval_steps
        newest_eval = evals[-1] if evals else snapshot.step
        if newest_eval <= st.last_considered_step:
            return
        st.last_considered_step = newest_eval
        diag, _ = diagnose(snapshot, Thresholds.from_policy(self.policy))
        self._set(st.run_id, diagnosis=diag.value)
        if not offer.choices and not offer.actions:
            return  # warm-up, cooldown or budget: nothing the proposer could do
        future = self._pool.submit(self._propose, snapshot, ctx, offer)
        future.add_done_callback(lambda _f: st.wake.set())
        st.inflight = _Inflight(future, snapshot, self.clock())
        self._set(st.run_id, pending=f"deciding on step {snapshot.step}")
        # A fast proposer (rules) answers at once: settle against the view just read.
        try:
            future.result(timeout=SETTLE_NOW_S)
        except (cf.TimeoutError, Exception):
            return
        self._settle_decision(st, view)

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
            result = self.fallback.propose(snapshot, self.policy, ctx, offer)
            result.audit = {"fallback_from": self.proposer.name, "error": f"{type(exc).__name__}: {exc}", "failed_attempt": audit, **result.audit}
            result.source = "fallback"
        result.audit.setdefault("latency_s", round(time.monotonic() - started, 3))
        return result

    def _settle_decision(self, st: RunState, view: RunView) -> None:
        inflight = st.inflight
        assert inflight is not None
        st.inflight = None
        try:
            result = inflight.future.result()
        except Exception as exc:
            log.error("run %s: no proposal (%s)", st.run_id, exc)
            return
        out = settle(result, inflight.snapshot, view, st.records, self.policy, seq=st.seq + 1, now=self.clock(),
                     dry_run=self.dry_run, fallback=self.fallback)
        self._set(st.run_id, diagnosis=out.proposal.diagnosis.value, pending="")
        record = out.record
        if record is None:
            log.info("run %s step %d: %s, no change (%s)", st.run_id, out.asked.step, out.proposal.diagnosis.value,
                     out.source)
            return
        self._note_staleness(st, record.status, record.audit.get("latency_s"), record.step, out.now_step)
        st.seq = record.seq
        publish(self.backend, st.records, record)
        log.info("run %s: %s — %s", st.run_id, record.summary(), record.reason)

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
        self._set(st.run_id, **status_fields(st.records, view, deciding=deciding, dry_run=self.dry_run, state=state))



__all__ = ["Daemon", "RunState", "RunStatus"]
