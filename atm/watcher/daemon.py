"""The daemon: one watch loop per run, proposals off the loop, every decision recorded on the run.

A run's loop, every ``interval`` seconds (a wait that stop interrupts):

1. poll the backend (new metric points, listener state, acks);
2. settle acknowledged updates and finished proposals (re-checking the policy and staleness
   against the run as it is *now*, since the run kept training while the proposer thought);
3. when the run logged a new evaluation and nothing is pending, build a snapshot and hand it to
   the proposer on a worker thread (one decision in flight per run).

Everything the daemon knows about a run's decisions is also on the run (``atm.seq``, update
tags, acks, the decision log), so a restarted daemon recovers it and neither repeats nor loses
an update.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from atm.adapters.base import Backend, BackendUnavailable, RunNotFound, RunView
from atm.policies import COUNTED, COUNTED_DRY, DecisionContext, Policy, available_actions, available_choices, check
from atm.schema import Ack, Action, DecisionRecord, Diagnosis, Status, TelemetrySnapshot, Update, fmt, in_force
from atm.watcher.proposer import Offer, Proposer, ProposalResult
from atm.watcher.rules import RulesProposer, Thresholds, diagnose
from atm.watcher.snapshot import MISSING_METRIC_AFTER, build_snapshot, eval_steps, missing_role_note

log = logging.getLogger("atm.watch")

MAX_BACKOFF_S = 60.0
#: Seconds a listener may be attached to a run that logs no metric of its own before the daemon says so.
SILENT_JOB_S = 120.0
#: Reason prefix of an update the run ended before applying.
EXPIRED = "expired"
#: How long a tick waits for a proposal before leaving it to a later tick.
SETTLE_NOW_S = 0.2
#: Record statuses whose update was published on the run.
PUBLISHED = (Status.PENDING, Status.APPLIED, Status.FAILED)
#: Late answers in a row after which the daemon says the proposer is too slow for the run.
STALE_WARN_AFTER = 3


@dataclass
class RunStatus:
    """What the status table shows for one run."""

    run_id: str
    name: str = ""
    step: int = 0
    state: str = "starting"
    diagnosis: str = ""
    applied: int = 0
    decisions: int = 0
    pending: str = ""
    last: str = ""
    listener: bool = False
    error: str = ""


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


def reconcile(records: Sequence[DecisionRecord], view: RunView) -> tuple[list[DecisionRecord], bool]:
    """Merge the decision log with what is on the run: updates the log missed, acks that arrived.

    Pure. Returns the merged records (sorted by seq) and whether anything changed.
    """
    by_seq = {r.seq: r.model_copy() for r in records}
    changed = False
    for seq, update in view.updates.items():
        if seq not in by_seq:
            # Published, then the daemon died before writing its log: rebuild the record from the update.
            by_seq[seq] = _record_from_update(update)
            changed = True
    ended = view.status != "RUNNING"
    for seq, rec in by_seq.items():
        ack = view.acks.get(seq)
        late = rec.status == Status.STALE and rec.reason.startswith(EXPIRED)
        if ack is not None and (rec.status == Status.PENDING or late):
            if late:
                rec.reason = "acknowledged after the run ended"
            _settle(rec, ack)
            changed = True
        elif ack is None and ended and rec.status == Status.PENDING:
            # The job finished before it reached the next apply point; a late ack still settles it.
            rec.status = Status.STALE
            rec.reason = f"{EXPIRED}: the run ended ({view.status}) before the job applied it"
            changed = True
        if rec.status == Status.APPLIED and rec.effective_step is None and rec.applied_at is not None:
            rec.effective_step = step_after(view.timeline, rec.applied_at, floor=rec.step)
            changed |= rec.effective_step is not None
    return [by_seq[s] for s in sorted(by_seq)], changed


#: Knobs every torch optimizer offers, which policies rarely control: not worth a warning.
OPTIMIZER_EXTRAS = frozenset({"momentum", "beta1", "beta2"})


def unmanaged_knobs_note(policy: Policy, knobs: Sequence[str]) -> str:
    """Non-empty when the job registered knobs the policy does not control (often a typo on one side),
    naming the policy's parameter each most likely meant. Pure."""
    import difflib

    loose = [k for k in sorted(knobs) if k not in policy.params and k not in OPTIMIZER_EXTRAS]
    if not loose:
        return ""
    hints = []
    for k in loose:
        near = difflib.get_close_matches(k, [p for p in policy.params if p not in knobs], n=1, cutoff=0.75)
        hints.append(f"{k} (the policy has {near[0]!r}: a typo?)" if near else k)
    return (f"the job's knobs {', '.join(hints)} are not parameters of policy {policy.name}, so the manager never "
            f"changes them; it controls {', '.join(sorted(policy.params))}")


def rebase(changes: dict[str, float], decided: dict[str, float], now: dict[str, float]) -> dict[str, float]:
    """Proposed values re-expressed on the values in force: each change's ratio to the value it was
    decided on, applied to the value now (see :func:`atm.schema.in_force`). Pure."""
    return {k: in_force(decided[k], v, now[k]) if k in decided and k in now else v for k, v in changes.items()}


def foreign_update(records: Sequence[DecisionRecord], updates: Mapping[int, Update], seen_before: bool) -> Update | None:
    """An update on the run that this daemon did not publish, if any. Pure.

    One with a number this daemon used for a different decision (another daemon overwrote it), or,
    once the daemon has read the run before, one with a number it never used. On the first read, such
    updates are this daemon's own from before a restart (the log may have missed them).
    """
    mine = {r.seq: r for r in records}
    for seq in sorted(updates):
        update, rec = updates[seq], mine.get(seq)
        if rec is None:
            if seen_before:
                return update
        elif rec.status in PUBLISHED and update.created_at != rec.decided_at:
            return update
    return None


def still_current(decided: Diagnosis, now: Diagnosis) -> bool:
    """Whether a late answer to ``decided`` still answers the run as it is ``now``. Pure."""
    return decided == now and decided not in (Diagnosis.HEALTHY, Diagnosis.INSUFFICIENT_DATA)


def step_after(timeline: Sequence[tuple[float, int]], when: float, floor: int = 0) -> int | None:
    """The lowest step, at least ``floor``, among the points the job logged at or after wall time
    ``when`` (its own clock): where a change it applied at ``when`` first shows in its metrics.

    ``floor`` is the decision's step: a change cannot take effect before the step it was decided on,
    so lower steps logged later (a summary value logged without ``step=``) are not where it shows.
    None when nothing was logged since. Pure. ``timeline`` is (time, step), oldest first.
    """
    i = bisect.bisect_left(timeline, (when, -math.inf))
    return min((s for _, s in timeline[i:] if s >= floor), default=None)


def _record_from_update(u: Update) -> DecisionRecord:
    return DecisionRecord(
        run_id=u.run_id, seq=u.seq, step=u.step, status=Status.PENDING, source=u.source, diagnosis=u.diagnosis,
        changes=u.changes, action=u.action, rationale=u.rationale, decided_at=u.created_at,
        reason="recovered from the run's update tag",
    )


def _settle(rec: DecisionRecord, ack: Ack) -> None:
    rec.status = Status.APPLIED if ack.status == "applied" else Status.FAILED
    rec.applied_step = ack.applied_step
    rec.applied_at = ack.applied_at
    rec.applied_values = dict(ack.values)
    if ack.error:
        rec.reason = (rec.reason + "; " if rec.reason else "") + f"listener: {ack.error}"


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
        self._pool = _DaemonPool(max_workers)
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
            note = unmanaged_knobs_note(self.policy, view.listener.knobs)
            if note:
                log.warning("run %s: %s", run_id, note)
            for name, value in sorted(view.listener.values.items()):
                rule = self.policy.params.get(name)
                if rule is not None and not rule.min <= value <= rule.max:
                    log.warning("run %s: %s is %s, outside the policy's [%s, %s]; a move on it lands inside those "
                                "bounds, however far that is", run_id, name, fmt(value), fmt(rule.min), fmt(rule.max))
        own = _logged_steps(view)
        # A job that logs nothing of its own never reaches MISSING_METRIC_AFTER points: say it once its
        # listener has been there a while (an SB3 script whose logger writes only to stdout).
        silent = own == 0 and view.listener is not None and self.clock() - view.listener.started_at >= SILENT_JOB_S
        if not st.noted_missing and (own >= MISSING_METRIC_AFTER or silent):
            st.noted_missing = True
            note = missing_role_note(self.policy, list(view.history))
            if note:
                log.warning("run %s: %s", run_id, note)
            if view.listener is None and view.status == "RUNNING":
                log.warning("run %s: it logs metrics, but no listener has attached, so nothing can be changed; "
                            "call atm.listen(...) in the training script once its run has started", run_id)

        ended = view.status != "RUNNING" or self._idle(view)
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

    def _idle(self, view: RunView) -> bool:
        return view.last_metric_time > 0 and self.clock() - view.last_metric_time > self.policy.limits.idle_minutes * 60

    def _context(self, st: RunState, view: RunView, params: dict[str, float]) -> DecisionContext:
        return decision_context(self.policy, view, st.records, params, dry_run=self.dry_run)

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
        snap = inflight.snapshot
        if result.source == "fallback" and view.status == "RUNNING":
            # The rules answered for the run as it was before the failed call, which may have taken the
            # whole timeout (and retries): that answer would be stale. They take microseconds: ask again
            # on the run as it is now.
            snap, ctx_fresh, offer_fresh = decision_inputs(
                self.policy, view, st.records, now=self.clock(), dry_run=self.dry_run)
            again = self.fallback.propose(snap, self.policy, ctx_fresh, offer_fresh)
            again.audit = {**{k: v for k, v in result.audit.items() if k not in again.audit}, **again.audit,
                           "first_asked_at_step": inflight.snapshot.step}
            again.source = "fallback"
            result = again
        proposal = result.proposal
        self._set(st.run_id, diagnosis=proposal.diagnosis.value, pending="")
        if proposal.is_noop:
            log.info("run %s step %d: %s, no change (%s)", st.run_id, snap.step, proposal.diagnosis.value, result.source)
            return
        # Re-check everything against the run as it is now: it kept training while the proposer thought.
        params = dict(view.listener.values) if view.listener else snap.params
        ctx_now = self._context(st, view, params)
        stale_window = self.policy.limits.stale_after
        stale = bool(stale_window.steps or stale_window.evals) and ctx_now.passed(snap.step, stale_window)
        late_note = ""
        if stale and view.status == "RUNNING":
            # The answer is late, but the question may still stand: a slow model on a fast job would
            # otherwise never act. It is kept when the run, read now, shows the same problem.
            now_snap = build_snapshot(view.run_id, self.policy, view.history, params, st.records, run_name=view.name)
            now_diag, _ = diagnose(now_snap, Thresholds.from_policy(self.policy))
            if still_current(proposal.diagnosis, now_diag):
                stale = False
                late_note = f"decided on step {snap.step}; at step {ctx_now.step} the run still shows {now_diag.value}; "
        moved = rebase(proposal.changes, snap.params, params)
        if moved != proposal.changes:
            # The job moved these values (a scheduler) while the proposer thought: the decided moves
            # are checked, recorded and sent as applied to the values in force, as the listener would.
            proposal = proposal.model_copy(update={"changes": moved})
        verdict = check(proposal, self.policy, ctx_now)
        if view.status != "RUNNING":
            # Nothing would ever apply it: the job is gone.
            status, reason = Status.STALE, f"{EXPIRED}: the run ended ({view.status}) while deciding"
        elif stale:
            status, reason = Status.STALE, f"stale: the run moved from step {snap.step} to {ctx_now.step} while deciding"
        elif verdict.accepted:
            status, reason = (Status.DRY_RUN if self.dry_run else Status.PENDING), late_note + verdict.reason
        else:
            status, reason = Status.REJECTED, late_note + verdict.reason
        self._note_staleness(st, status, result, snap.step, ctx_now.step)
        # Changes are recorded against the values in force now, which is what the job will replace.
        changes = verdict.changes if status in (Status.PENDING, Status.DRY_RUN) else {}
        st.seq += 1
        record = DecisionRecord(
            run_id=st.run_id, seq=st.seq, step=snap.step, status=status, source=result.source,
            diagnosis=proposal.diagnosis, changes=changes, action=verdict.action if status in (Status.PENDING, Status.DRY_RUN) else None,
            rationale=proposal.rationale, expected_outcome=proposal.expected_outcome, watch_next=proposal.watch_next,
            reason=reason, dropped=verdict.dropped, proposal=proposal, snapshot=snap, decided_at=self.clock(),
            audit=result.audit,
        )
        self.backend.reserve_seq(st.run_id, st.seq)
        st.records.append(record)
        self.backend.publish(record)
        self.backend.write_log(st.run_id, st.records)
        log.info("run %s: %s — %s", st.run_id, record.summary(), reason)

    def _note_staleness(self, st: RunState, status: Status, result: ProposalResult, decided: int, now: int) -> None:
        """Say once per run when the proposer is too slow for the run: its answers keep arriving stale."""
        st.stale_in_a_row = st.stale_in_a_row + 1 if status == Status.STALE else 0
        if st.stale_in_a_row < STALE_WARN_AFTER or st.noted_slow:
            return
        st.noted_slow = True
        took = result.audit.get("latency_s")
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
        # The same decisions the validator counts against this daemon's budgets: a live daemon after a
        # dry run does not show the dry run's decisions as its own.
        counted = [r for r in st.records if r.status in (COUNTED_DRY if self.dry_run else COUNTED)]
        pending = next((r for r in st.records if r.status == Status.PENDING), None)
        step = run_step(view)
        self._set(
            st.run_id,
            name=view.name,
            step=step,
            state=state or ("deciding" if st.inflight else ("no listener" if view.listener is None else "watching")),
            applied=sum(r.status == Status.APPLIED for r in st.records),
            decisions=len(counted),
            pending=(f"#{pending.seq} waiting for the job" if pending else (self.status[st.run_id].pending if st.inflight else "")),
            last=st.records[-1].summary() if st.records else "",
            listener=view.listener is not None,
            error="",
        )


class _DaemonPool:
    """Runs proposals on daemon threads, at most ``max_workers`` at once.

    A stopping atm-watch must not wait for a model call in flight (a hanging server held a SIGTERM for
    87 s): ThreadPoolExecutor's workers are joined at interpreter exit, these threads are not.
    """

    def __init__(self, max_workers: int) -> None:
        self._slots = threading.BoundedSemaphore(max_workers)
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future[Any]:
        future: cf.Future[Any] = cf.Future()

        def run() -> None:
            with self._slots:
                if self._closed or not future.set_running_or_notify_cancel():
                    return
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
                    future.set_exception(exc)

        threading.Thread(target=run, name="atm-propose", daemon=True).start()
        return future

    def shutdown(self) -> None:
        self._closed = True


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _logged_steps(view: RunView) -> int:
    return max((len(pts) for k, pts in view.history.items() if not k.startswith("atm/")), default=0)


def run_step(view: RunView) -> int:
    """The run's latest logged step, not counting the listener's own ``atm/*`` metrics."""
    return max((pts[-1][0] for k, pts in view.history.items() if pts and not k.startswith("atm/")), default=0)


def decision_context(
    policy: Policy, view: RunView, records: Sequence[DecisionRecord], params: dict[str, float], *, dry_run: bool = False
) -> DecisionContext:
    """The validator's view of a run: its step, evaluations, parameter values and decisions so far."""
    steps = eval_steps(policy, view.history)
    step = run_step(view)
    return DecisionContext(step=step, params=params, history=list(records), eval_steps=steps, dry_run=dry_run)


def decision_inputs(
    policy: Policy, view: RunView, records: Sequence[DecisionRecord], now: float | None = None, *, dry_run: bool = False
) -> tuple[TelemetrySnapshot, DecisionContext, Offer]:
    """Everything a proposer is given for a run as it is now: snapshot, context and the offer.

    Used by the daemon before each decision and by ``atm explain`` to show the same thing.
    """
    params = dict(view.listener.values) if view.listener else {}
    ctx = decision_context(policy, view, records, params, dry_run=dry_run)
    snapshot = build_snapshot(view.run_id, policy, view.history, params, records, run_name=view.name, now=now)
    allowed = set(view.listener.actions) if view.listener else set()
    if any(r.action == Action.STOP and r.status == Status.APPLIED for r in records):
        # The job was told to stop and goes on: asking again would only use up the budget.
        allowed.discard(Action.STOP.value)
    offer = Offer(
        choices=available_choices(policy, ctx),
        actions=[a for a in available_actions(policy, ctx) if a.value in allowed],
    )
    return snapshot, ctx, offer


def history_rows(records: Sequence[DecisionRecord]) -> list[dict[str, object]]:
    """The ``atm history --json`` items."""
    return [
        {
            "seq": r.seq,
            "step": r.step,
            "applied_step": r.applied_step,
            "effective_step": r.effective_step,
            "applied_values": r.applied_values,
            "status": r.status.value,
            "changes": {k: {"old": c.old, "new": c.new} for k, c in r.changes.items()},
            "action": r.action.value if r.action else None,
            "diagnosis": r.diagnosis.value,
            "rationale": r.rationale,
            "source": r.source,
            "reason": r.reason,
            "decided_at": r.decided_at,
            "applied_at": r.applied_at,
        }
        for r in records
    ]


__all__ = ["Daemon", "RunState", "RunStatus", "history_rows", "reconcile", "still_current", "Diagnosis"]
