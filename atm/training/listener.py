"""The in-job listener: receives updates from the daemon and applies them inside the training job.

Threads: a background thread talks to the tracker (fetch updates, write acks and ``atm/*``
metrics); the training thread only takes updates off an in-memory queue, at the next
``optimizer.step()`` (a step pre-hook), at ``apply_pending()``, or, with no optimizer and
``apply="auto"``, from the background thread itself. So the training loop never waits on the
network, and nothing the listener does raises into it.

Updates are applied in ascending ``seq``, each at most once: a restarted listener resumes after
the highest ``seq`` it has acknowledged on the run (with an ack it signed for this run: one written
in by anyone else, or copied from another run, does not count).

Only the watcher can steer the job: an update is applied only when its signature checks with this
job's key (:mod:`atm.signing`) and every change stays within the limits it carries
(:func:`atm.schema.target_value`). Anything else is never applied, is acknowledged as ``rejected``
with the reason, and is logged once; training goes on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from atm.adapters.base import RunNotFound, names_run
from atm.adapters.notes import refused_alert, undone_alert, update_alert
from atm.schema import Ack, Action, LimitExceeded, ListenerInfo, Update, target_value
from atm.signing import KeySource, SignatureCheck, SigningKey, verify
from atm.training._dist import RankSync

log = logging.getLogger("atm.listener")

ApplyMode = Literal["auto", "manual"]


@dataclass
class Knob:
    """A named parameter the manager may change: a setter, and a getter for its current value.

    Without a getter the manager cannot see the current value, so it cannot propose relative
    moves for it; give ``get`` (or use :func:`attr`) whenever you can.
    """

    set: Callable[[float], Any]
    get: Callable[[], float] | None = None
    #: What undid a change of this knob and how to fix it, given (before, after, now); a generic
    #: note when None. The optimizer's lr knob knows whether an LR scheduler was made on it.
    undo_note: Callable[[float, float, float], str] | None = None
    #: Whether the listener reads a change back to see if the job undid it. Off where the knob itself
    #: keeps the change against what moves the value (an lr knob that scales the scheduler it was
    #: given): that driver's own moves, steep early in a warm-up, are not an undo.
    read_back: bool = True
    #: A weight decay the optimizer adds to the gradient (an L2 penalty: torch.optim.SGD, Adam, RMSprop),
    #: not one it applies to the weights apart from it (AdamW). Announced, so that the manager does not
    #: move it from 0 to values that suit decoupled decay only.
    l2: bool = False
    #: Whether a schedule moves this knob (an LR scheduler on the optimizer): announced, so that the
    #: manager does not read a schedule's first seconds, one logged point, as a value that stays put.
    scheduled: Callable[[], bool] | None = None


def attr(obj: Any, name: str) -> Knob:
    """A knob bound to ``obj.name``: ``atm.listen(knobs={"actor_lr": atm.attr(recipe, "actor_lr")})``."""
    getattr(obj, name)  # fail now, with Python's own message, if the attribute does not exist
    return Knob(set=lambda v: setattr(obj, name, type(getattr(obj, name))(v)), get=lambda: float(getattr(obj, name)))


def as_knob(name: str, spec: Any) -> Knob:
    if isinstance(spec, Knob):
        return spec
    if isinstance(spec, tuple) and len(spec) == 2 and all(callable(f) for f in spec):
        return Knob(get=spec[0], set=spec[1])
    if callable(spec):
        return Knob(set=spec)
    raise TypeError(
        f"knob {name!r}: expected a setter, a (getter, setter) pair or atm.attr(obj, 'name'); got {type(spec).__name__}"
    )


def own_acks(acks: Mapping[int, Ack], key: SigningKey | None, run_id: str) -> dict[int, Ack]:
    """The acks this job wrote: signed with its key and naming its run. Pure.

    Every job of one key signs alike, so another run's ack copied onto this one checks too: its
    ``run_id`` tells it apart (:func:`atm.adapters.base.names_run`: an applied ack names the run as the
    watcher's update does, a rejected one as the job knows it).
    """
    return {seq: ack for seq, ack in acks.items() if verify(ack, key) and names_run(ack.run_id, run_id)}


def resume_after(own: Mapping[int, Ack], updates: Mapping[int, Update], key: SigningKey | None) -> int:
    """The highest ``seq`` an earlier process of this job already dealt with: where to resume. Pure.

    ``own``: the acks this job wrote (:func:`own_acks`; a written-in ``atm.ack.000050``, or one copied
    from another run, would otherwise make a resumed job skip every genuine update below it), checked
    once by the caller. A ``rejected`` one counts only when its update is genuine: an update refused
    for its signature takes no number from the watcher's own.
    """
    done = [seq for seq, ack in own.items() if ack.status != "rejected" or (seq in updates and verify(updates[seq], key))]
    return max(done, default=0)


def undone(before: float, after: float, now: float) -> bool:
    """Whether ``now`` is a knob going back to ``before`` rather than moving on from ``after``. Pure.

    On a log scale when all three are positive (an lr or a weight decay: a scheduler's own move
    between two steps is small beside a manager's x0.5 or x2), else on a linear one (a knob at 0).
    """
    if before > 0 and after > 0 and now > 0:
        return abs(math.log(now / before)) < abs(math.log(now / after))
    return abs(now - before) < abs(now - after)


def generic_undo_note(name: str, before: float, after: float, now: float) -> str:
    """What to do when something in the job set a knob back after atm changed it. Pure."""
    return (f"the change {name} {before:.4g} -> {after:.4g} was undone ({name} is {now:.4g} again): something in "
            f"the job sets {name} itself (code that re-applies a config at every update, a restore of the "
            f"optimizer's state). Point the knob at what that code reads (knobs={{'{name}': atm.attr(config, "
            f"'{name}')}}), or restore inside atm.keep_hyperparameters.")


def same_run(named: str, run_id: str | None) -> bool:
    """Whether an update names this run: its id, or a path ending in it (a W&B ``entity/project/id``)."""
    return run_id is not None and (named == run_id or named.endswith("/" + run_id))


def _fingerprint(update: Update) -> str:
    return hashlib.sha256(update.model_dump_json().encode()).hexdigest()


#: Seconds between checks of whether the values in force moved (by more than 1%) since announced.
#: 3 s: a warm-up or a job's own lr change otherwise reached the daemon up to 10 s late, and a cut was
#: decided on the old value (seen: "lr 0.0025 -> 0.000625 (in force: 0.125)").
VALUES_REFRESH_S = 3.0


class Listener:
    """Applies the daemon's updates to a running job. Create it with :func:`atm.listen`."""

    def __init__(
        self,
        channel: Any,
        knobs: Mapping[str, Knob],
        actions: Mapping[str, Callable[[], Any]] | None = None,
        apply: ApplyMode = "auto",
        step: Callable[[], int] | None = None,
        poll_interval: float = 1.0,
        in_training_thread: bool = False,
        sync: RankSync | None = None,
        key: SigningKey | None = None,
    ):
        if apply not in ("auto", "manual"):
            raise ValueError(f"apply must be 'auto' or 'manual', got {apply!r}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        self.channel = channel
        self.knobs = dict(knobs)
        self.actions = dict(actions or {})
        self.apply_mode: ApplyMode = apply
        self.poll_interval = poll_interval
        #: Updates applied so far, in order.
        self.applied: list[Update] = []
        #: Set when the manager asked the job to stop (a ``stop`` action).
        self.stop_requested = False
        self._step_fn = step
        self._steps_seen = 0
        self._in_training_thread = in_training_thread or apply == "manual"
        self._pending: list[Update] = []
        self._last_applied = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._outbox: list[tuple[Ack, dict[str, float], int | None]] = []
        #: Alerts (title, text, level) for a stop, a rollback or a refused update, raised on the run by a
        #: channel that can (W&B's run.alert exists only in the job's own process); sent after the acks.
        self._alerts: list[tuple[str, str, str]] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._announce_needed = True
        self._announced: dict[str, float] = {}
        self._values_checked = time.monotonic()
        self._started_at = time.time()
        self._thread: threading.Thread | None = None
        self._errors_logged: set[str] = set()
        #: A torch.distributed job's ranks apply rank 0's updates together (see atm.training._dist).
        self._sync = sync
        #: The key updates must be signed with; resolved from the environment at start when not given.
        self._keys = KeySource(key)
        self._key: SigningKey | None = key
        #: seq -> fingerprint of the message refused under it, so each is refused (logged, acked) once,
        #: and a different message under the same number is judged afresh.
        self._refused: dict[int, str] = {}
        #: Changes not yet seen to hold: knob -> (the ack sent for it, value before, value set). The first
        #: time the knob reads otherwise, the change either held (moved on from the value set) or was
        #: undone (back near the value before): then the ack is sent again as ``undone``, with the cause.
        self._held: dict[str, tuple[Ack, float, float]] = {}

    # ------------------------------------------------------------------ public

    @property
    def attached(self) -> bool:
        return self.channel is not None

    @property
    def run_id(self) -> str | None:
        return getattr(self.channel, "run_id", None)

    def start(self) -> "Listener":
        if self.channel is None or self._thread is not None:
            return self
        self._key = self._keys.get_or_none()
        if self._key is None:
            self._note("key", f"this job has no atm key ({self._keys.problem}); every update will be rejected "
                              "until it has one. Training continues unmanaged.")
        try:
            self._resume()
        except Exception as exc:  # keep going: the thread retries the tracker
            self._note("resume", f"could not read earlier acks yet ({exc}); will retry")
            self._last_applied = -1  # unknown: do not apply anything until the acks were read
        # Channels that can be told about new updates (a watched inbox folder) wake the thread at once
        # instead of waiting for the next poll.
        subscribe = getattr(self.channel, "on_update", None)
        if callable(subscribe):
            try:
                subscribe(self._wake.set)
            except Exception as exc:
                self._note("subscribe", f"update notifications unavailable ({exc!r}); polling instead")
        self._thread = threading.Thread(target=self._run, name="atm-listener", daemon=True)
        self._thread.start()
        return self

    def apply_pending(self, step: int | None = None) -> list[Update]:
        """Apply every update received so far, now, in this thread. Returns what was applied.

        Call it at a boundary of your choice (after an evaluation, at an epoch end) when the
        listener was created with ``apply="manual"``. Never raises.
        """
        try:
            if self._held:
                self._check_held()  # before the next changes: a value set back since the last boundary
            return self._apply_ready(step)
        except Exception as exc:  # contained: training goes on
            self._note("apply", f"applying updates failed: {exc!r}")
            return []

    def current_values(self) -> dict[str, float]:
        # None: no getter, a failing one, or disabled (SB3's target_kl): nothing to show.
        return {name: value for name in self.knobs if (value := self._read(name)) is not None}

    def close(self, timeout: float = 5.0) -> None:
        """Stop the background thread after flushing acks and metrics still in the outbox."""
        if self._thread is None:
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None
        try:
            self.channel.close()
        except Exception:
            pass

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks

    def _on_optimizer_step(self, *_: Any, **__: Any) -> None:
        # Runs in the training thread before every optimizer.step(): keep it cheap.
        self._steps_seen += 1
        if self._held:
            self._check_held()
        if self._sync is not None:
            if self.apply_mode == "auto" and self._sync.due(self._steps_seen):
                self.apply_pending()
        elif self._pending and self.apply_mode == "auto":
            self.apply_pending()

    def _step(self, explicit: int | None = None) -> int | None:
        if explicit is not None:
            return int(explicit)
        if self._step_fn is not None:
            try:
                return int(self._step_fn())
            except Exception as exc:
                self._note("step", f"step callable failed: {exc!r}")
        return self._steps_seen or None

    def _chart_step(self, explicit: int | None = None) -> int | None:
        """The step the ``atm/*`` values are logged at: the job's own (``step=`` given to ``atm.listen``
        or ``apply_pending``), else the run's own axis, the step of the job's latest logged point, where
        the channel knows it (an epoch axis, a global step with gradient accumulation: the optimizer
        steps seen would put the markers far from the job's charts), else the optimizer steps seen."""
        if explicit is not None or self._step_fn is not None:
            return self._step(explicit)
        run_step = getattr(self.channel, "run_step", None)
        try:
            on_run = run_step() if run_step is not None else None
        except Exception as exc:
            self._note("run_step", f"could not read the run's step ({exc!r}); atm/* values use the optimizer steps")
            on_run = None
        return on_run if on_run is not None else self._step()

    # ------------------------------------------------------------------ applying

    def _apply_ready(self, step: int | None) -> list[Update]:
        with self._lock:
            ready, self._pending = sorted(self._pending, key=lambda u: u.seq), []
        if self._sync is not None:
            # Every rank calls this at the same optimizer step and gets rank 0's list. Rank 0's
            # already-applied updates are dropped first, so the others see only what is new.
            ready = self._sync.share([u for u in ready if u.seq > self._last_applied])
        done = []
        for update in ready:
            if update.seq <= self._last_applied:
                continue  # already applied (by an earlier process or a duplicate fetch)
            applied = self._apply_one(update, self._step(step), chart_step=self._chart_step(step))
            if applied is not None:
                done.append(applied)
        return done

    def _apply_one(self, update: Update, step: int | None, chart_step: int | None = None) -> Update | None:
        values: dict[str, float] = {}
        errors: list[str] = []
        # The values in force before the action: a change is the decided move from them. A rollback
        # that restores an older optimizer state brings back an older lr, which is not what was halved.
        before = {name: self._read(name) for name in update.changes}
        # Every change is checked before anything is touched: an update lands whole or not at all.
        try:
            targets = {name: target_value(name, change, before.get(name)) for name, change in update.changes.items()}
        except LimitExceeded as exc:
            self._last_applied = update.seq  # dealt with: a genuine update, refused for good
            self._reject(update.run_id, update.seq, f"update #{update.seq} not applied: {exc}", step)
            return None
        # The action first: a rollback that restores the optimizer's state would otherwise undo the
        # new lr or weight decay that came with it.
        if update.action is not None:
            try:
                self._run_action(update.action)
            except Exception as exc:
                errors.append(f"{update.action.value}: handler raised {exc!r}")
        for name, change in update.changes.items():
            knob = self.knobs.get(name)
            if knob is None:
                errors.append(f"{name}: this job has no such knob, so it was not changed "
                              f"(its knobs: {', '.join(self.knobs) or 'none'})")
                continue
            try:
                knob.set(targets[name])
                values[name] = float(knob.get()) if knob.get is not None else targets[name]
            except Exception as exc:
                errors.append(f"{name}: setter raised {exc!r}")
        ok = bool(values) or (update.action is not None and not any(e.startswith(update.action.value) for e in errors))
        self._last_applied = update.seq
        self.applied.append(update)
        ack = Ack(
            run_id=update.run_id,
            seq=update.seq,
            status="applied" if ok else "failed",
            applied_step=step,
            values=values,
            error="; ".join(errors),
        )
        if errors:
            log.warning("atm update #%d: %s", update.seq, ack.error)
        elif update.action == Action.STOP:
            # A warning, so that it shows without any logging set up: training ends and the job's
            # console should say why (seen: a Trainer run ended at step 1030 of 1250 with no word).
            # The rationale says why; the diagnosis of a stop that ends overfitting reads "converged".
            log.warning("atm update #%d at step %s: the manager asked this job to stop: %s",
                        update.seq, step, update.rationale or "no reason given")
        else:
            log.info("atm update #%d applied at step %s: %s", update.seq, step, values)
        if self.channel is None:
            return update  # a follower rank: rank 0 acknowledges for the job
        with self._lock:
            for name, value in values.items():
                old = before.get(name)
                if (self.knobs[name].read_back and old is not None and math.isfinite(old)
                        and not math.isclose(old, value, rel_tol=1e-9)):
                    self._held[name] = (ack, old, value)
            alert = update_alert(update) if ok else None
            self._outbox.append((ack, values, step if chart_step is None else chart_step))
            self._announce_needed = True
            if alert is not None:
                self._alerts.append(alert)
        if update.action == Action.STOP:
            # The job is about to break out of its loop and finish its run (wandb.finish()): record the
            # stop on the run now, not on the listener's next cycle, when the run may be closed.
            self._flush()
        self._wake.set()
        return update

    def _check_held(self) -> None:
        """Read back the changes not yet seen to hold; acknowledge each one that was undone again, as
        ``undone`` with its cause and fix, and say it in the job's log. Runs in either thread; cheap."""
        for name, (ack, before, after) in list(self._held.items()):
            now = self._read(name)
            if now is None or math.isclose(now, after, rel_tol=1e-9):
                continue  # nothing moved it yet (a scheduler stepped once per epoch, say)
            at = self._chart_step()
            with self._lock:
                if self._held.get(name, (None,))[0] is not ack:
                    continue  # a newer change of this knob came in meanwhile
                del self._held[name]
                if not (math.isfinite(now) and undone(before, after, now)):
                    continue  # it moved on from the value set: the change held
                knob = self.knobs[name]
                note = (knob.undo_note(before, after, now) if knob.undo_note is not None
                        else generic_undo_note(name, before, after, now))
                # ``ack`` is the last one sent for its update: an earlier undo of another of its knobs
                # replaced it in every entry still held (below).
                again = ack.model_copy(update={
                    "status": "undone",
                    "values": {**ack.values, name: now},
                    "error": "; ".join(e for e in (ack.error, note) if e),
                    "signature": None,
                })
                # Other knobs of the same update still held under the old ack now answer to this one.
                for other, (a, b, v) in list(self._held.items()):
                    if a is ack:
                        self._held[other] = (again, b, v)
                self._outbox.append((again, {name: now}, at))
                self._alerts.append(undone_alert(ack.seq, note))
            log.warning("atm update #%d: %s", ack.seq, note)
            self._wake.set()

    def _reject(self, run_id: str, seq: int, reason: str, step: int | None = None) -> None:
        """Acknowledge ``seq`` as rejected, with the reason, and say it once in the job's log."""
        log.warning("atm: %s", reason)
        if self.channel is None:
            return  # a follower rank: rank 0 acknowledges for the job
        ack = Ack(run_id=run_id, seq=seq, status="rejected", applied_step=step, error=reason)
        with self._lock:
            self._outbox.append((ack, {}, step))
            self._alerts.append(refused_alert(seq, reason))
        self._wake.set()

    def _resume(self) -> None:
        # The acks are checked here, once: resume_after takes the ones that passed.
        trusted = own_acks(self.channel.acked(), self._key, self.channel.run_id)
        settled = max((seq for seq, a in trusted.items() if a.status != "rejected"), default=0)
        # The updates are needed only to judge rejections above the last applied one (rare): most
        # restarts read nothing more than before.
        rejected_above = any(a.status == "rejected" and seq > settled for seq, a in trusted.items())
        updates = {u.seq: u for u in self.channel.fetch(settled)} if rejected_above else {}
        self._last_applied = resume_after(trusted, updates, self._key)

    def _admit(self, fresh: list[Update]) -> list[Update]:
        """The updates from ``fresh`` that are the watcher's own for this run; the others are refused once each."""
        ok = []
        for update in fresh:
            fingerprint = _fingerprint(update)
            if self._refused.get(update.seq) == fingerprint:
                continue
            try:
                check = verify(update, self._key, key_problem=self._keys.problem, here="this job")
            except Exception as exc:  # a message that cannot even be serialized is refused, not retried forever
                check = SignatureCheck(False, f"update #{update.seq} could not be checked ({exc!r}); ignored")
            reason = check.reason
            if check and not same_run(update.run_id, self.run_id):
                reason = (f"update #{update.seq} is signed for run {update.run_id}, and this job is run {self.run_id}: "
                          "a copy from another run; ignored")
            if reason:
                self._refused[update.seq] = fingerprint
                self._reject(self.channel.run_id, update.seq, reason)
                continue
            ok.append(update)
        # Messages that did not even parse: said once each, and refused when their name gives a number.
        taken = {u.seq for u in ok}
        for problem in list(getattr(self.channel, "problems", None) or ()):
            if problem.seq is not None and (problem.seq <= self._last_applied or problem.seq in taken):
                continue
            key = f"problem:{problem}"
            if problem.seq is not None:
                if self._refused.get(problem.seq) == key:
                    continue
                self._refused[problem.seq] = key
                self._reject(self.channel.run_id, problem.seq, str(problem))
            else:
                self._note(key, str(problem))
        return ok

    def _read(self, name: str) -> float | None:
        """A knob's current value, or None when it has no getter, the getter fails or returns None."""
        knob = self.knobs.get(name)
        if knob is None or knob.get is None:
            return None
        try:
            value = knob.get()
            return None if value is None else float(value)
        except Exception as exc:
            self._note(f"get:{name}", f"reading knob {name!r} failed: {exc!r}")
            return None

    def _run_action(self, action: Action) -> None:
        handler = self.actions.get(action.value)
        if action == Action.STOP:
            self.stop_requested = True
        if handler is not None:
            handler()
        elif action != Action.STOP:
            raise RuntimeError(f"no handler registered (atm.listen(actions={{'{action.value}': fn}}))")

    # ------------------------------------------------------------------ background thread

    def _run(self) -> None:
        self._send_initial()
        while not self._stop.is_set():
            self._cycle()
            self._wake.wait(self.poll_interval)
            self._wake.clear()
        self._flush()

    def _send_initial(self) -> None:
        try:
            values = self.current_values()
            self.channel.log_values(values, self._chart_step())
        except Exception as exc:
            self._note("initial", f"could not log initial values: {exc!r}")

    def _cycle(self) -> None:
        try:
            if self._last_applied < 0:
                self._resume()
            if self._held:
                self._check_held()
            self._flush()
            if not self._announce_needed and time.monotonic() - self._values_checked >= VALUES_REFRESH_S:
                # A scheduler moves the lr all the time: the manager should decide on the value in force.
                self._values_checked = time.monotonic()
                now = self.current_values()
                moved = any(not math.isclose(v, self._announced.get(k, math.nan), rel_tol=0.01) for k, v in now.items())
                if moved and self._announced:
                    # ... and the atm/<knob> charts should show it, not a straight line between changes.
                    self.channel.log_values(now, self._chart_step())
                self._announce_needed = moved
            if self._announce_needed:
                self._announce()
            known = max([self._last_applied, *(u.seq for u in self._pending)])
            fresh = self._admit(self.channel.fetch(known))
            if fresh:
                with self._lock:
                    have = {u.seq for u in self._pending}
                    self._pending.extend(u for u in fresh if u.seq not in have)
                if not self._in_training_thread:
                    self._apply_ready(None)
                    self._flush()
        except RunNotFound as exc:  # a wrong run id: retrying will not help, and "not reachable" would mislead
            self._note("poll", f"the tracker has no run {self.run_id!r} ({exc}); check the run_id given to "
                               "atm.listen. Training continues unmanaged; still retrying")
        except Exception as exc:  # the tracker may be down; keep trying, quietly
            self._note("poll", f"tracker not reachable ({exc!r}); retrying every {self.poll_interval}s")

    def _announce(self) -> None:
        values = self.current_values()
        info = ListenerInfo(
            run_id=self.channel.run_id,
            knobs=sorted(self.knobs),
            values=values,
            l2_knobs=sorted(n for n, k in self.knobs.items() if k.l2),
            scheduled_knobs=sorted(n for n, k in self.knobs.items() if k.scheduled is not None and k.scheduled()),
            actions=sorted({*self.actions, Action.STOP.value}),
            apply_mode=self.apply_mode,
            pid=os.getpid(),
            host=socket.gethostname(),
            started_at=self._started_at,
            last_applied_seq=max(self._last_applied, 0),
            step=self._step(),
        )
        self.channel.announce(info)
        self._announced = values
        self._announce_needed = False

    def _flush(self) -> None:
        with self._flush_lock:  # the listener's thread, or the training thread after a stop
            while True:
                with self._lock:
                    if not self._outbox:
                        break
                    ack, values, step = self._outbox[0]
                try:
                    self.channel.ack(ack)
                    if values:
                        self.channel.log_values(values, step)
                except Exception as exc:
                    self._note("ack", f"could not write ack #{ack.seq} yet ({exc!r}); will retry")
                    return
                with self._lock:
                    self._outbox.pop(0)
            self._raise_alerts()

    def _raise_alerts(self) -> None:
        """Raise the queued alerts on the run, where the channel can (best effort: never retried)."""
        raise_alert = getattr(self.channel, "alert", None)  # W&B's channel; MLflow's run note is the daemon's
        with self._lock:
            alerts, self._alerts = self._alerts, []
        for title, text, level in alerts if raise_alert is not None else ():
            try:
                raise_alert(title, text, level)
            except Exception as exc:
                self._note("alert", f"could not raise a W&B alert ({exc!r})")

    def _note(self, kind: str, message: str) -> None:
        # Log each kind of trouble once at WARNING, then at DEBUG: a tracker outage must not flood the job's log.
        if kind in self._errors_logged:
            log.debug(message)
        else:
            self._errors_logged.add(kind)
            log.warning("atm: %s", message)
