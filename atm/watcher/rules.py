"""The ``rules`` proposer: deterministic heuristics, the baseline and the fallback for the LLM.

Each diagnosis is a pure test on the snapshot's series and signals; each remedy is a ranked
list of moves, taken from the offer (what the policy allows right now) until the policy's
``max_changes`` is reached. Thresholds can be overridden per policy (``thresholds:``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

from atm.policies import DecisionContext, ParamRule, Policy, undo_value, unsettled
from atm.schema import (
    Action, DecisionRecord, Diagnosis, Effect, EffectLabel, Proposal, SeriesStats, Status, TelemetrySnapshot, fmt,
)
from atm.watcher.effect import hurt_unanswered
from atm.watcher.proposer import Offer, ProposalResult
from atm.watcher.snapshot import HIGHER_IS_BETTER, WINDOW, is_rl

Direction = Literal["up", "down"]


@dataclass(frozen=True)
class Thresholds:
    #: Points of the primary metric needed before any diagnosis.
    min_points: int = 4
    #: RL: evaluations needed before any diagnosis. Two show a trend; evaluations are expensive and
    #: far apart, and the policy's warm-up already says how long a run is left alone.
    min_evals: int = 2
    #: Overfitting: validation loss this far (relative) above its best ...
    overfit_rise: float = 0.03
    #: ... while the train/val gap keeps widening (gap slope per 1000 steps above this).
    overfit_gap_slope: float = 0.0
    #: An lr (the ``lr`` role: the job's own lr metric, else the listener's ``atm/lr``) that rose by more
    #: than this share across its trailing window and is at its highest: the schedule's warm-up, left
    #: alone but for divergence.
    warmup_lr_rise: float = 0.01
    #: Divergence: training loss gave back this share of its progress, or a gradient-norm spike this large.
    diverge_lost: float = 0.5
    grad_spike: float = 5.0
    #: Overfitting setting in: the train/val gap widened across the trailing window by more than this
    #: share of the val loss, and by more than its own noise (its 95% confidence interval excludes zero),
    #: while val loss is not yet rising. Train outrunning val that clearly is memorisation beginning.
    apart_gap_growth: float = 0.05
    #: ... and less than this share of train loss's fall over the window reached val (val's fall over
    #: the gap's evaluations, against val's fall plus the widening). A healthy run's gap widens too,
    #: while val keeps most of what train gains; halving the lr then costs the run's end. Seen: an Adam
    #: MLP whose val loss fell 40% over the window while the gap widened by 10% of it (0.8 reached
    #: val) was cut, and ended 1.05-1.08x worse than alone on 3 seeds. `.inf` turns the check off.
    apart_transfer: float = 0.5
    #: Plateau: relative improvement across the trailing window below this, and not beyond its noise
    #: (a slow improvement whose confidence interval excludes zero is progress, not a plateau).
    plateau_improvement: float = 0.01
    #: lr too low: since the lr last rose or jumped (or atm last changed anything), at least
    #: ``PACE_MIN_EVALS`` evaluations in which val loss fell over the latest half at this share or more
    #: of its average pace since (:func:`atm.watcher.snapshot.pace`: 0.1-0.5 for a loss that falls fast
    #: and then slows, as a well-chosen step makes it), ...
    lr_low_pace: float = 0.9
    #: ... by a relative improvement over that half of at least this many times its 95% confidence
    #: interval's half-width (a steady fall, not noise: a step too large is noisy), to a new best.
    lr_low_significance: float = 2.0
    #: Over-regularization: a plateau with the val/train gap ratio under this (train no better than val).
    over_reg_gap_ratio: float = 1.02
    #: Train loss above val is dropout's doing only up to what dropout can cost: inverted dropout at
    #: rate p multiplies each unit by a mask of variance p/(1-p), and a train loss more than this many
    #: times that (relative to val) above val has another cause that cutting dropout cannot remove:
    #: label smoothing, noisy labels, augmentation, a penalty logged with the loss.
    dropout_gap_bound: float = 2.0
    #: Overfitting that comes back after this many remedies, the last of which brought no new best
    #: validation loss, is answered with stop (keeping the best checkpoint) instead of another remedy.
    overfit_remedies_before_stop: int = 2
    #: A plateau answered by this many remedies in a row, none followed by a new best of the primary
    #: metric, is answered with stop (keeping the best checkpoint) instead of yet another lr cut.
    plateau_remedies_before_stop: int = 2
    #: The last this many remedies, overfitting and plateau ones in any order, none measured ``helped``
    #: and none followed by a new best worth the name: stop. Each rule above counts remedies for one
    #: problem in a row; a run whose remedies alternate between the two escaped both (seen: 12
    #: remedies, lr down to the policy's floor and weight decay up to its ceiling, for nothing).
    remedies_before_stop: int = 3
    #: ... and in each case the last remedy is judged only after this many evaluations in effect:
    #: one evaluation after a remedy without rollback, val loss is naturally still above its best.
    remedy_evals: int = 3
    #: Loss imbalance: largest/smallest loss component above this.
    imbalance_ratio: float = 20.0
    #: ... unless this many loss-weight changes in a row left the ratio at more than half of what it
    #: was: the job logs its components unweighted, and further changes would only spend the budget.
    imbalance_remedies_unmoved: int = 2
    #: RL: safe success and collision rate that count as solved.
    solved_success: float = 0.85
    solved_collision: float = 0.15
    #: RL: collision rate that counts as unsafe exploration.
    unsafe_collision: float = 0.3
    #: RL: exploration runs away when the action std (or its entropy equivalent) has grown this many
    #: times over the run and is still growing: the entropy bonus outweighs the task.
    runaway_std_ratio: float = 2.0
    #: RL: entropy falling faster than this relative drop across the window, with no progress.
    collapse_entropy_drop: float = 0.3
    #: RL: below this safe success, a run that stopped improving is stalled.
    stalled_success: float = 0.5
    #: RL: gain of the goal metric across the window that counts as progress.
    progress_gain: float = 0.05
    #: RL: the goal metric this far below its best, now and on average lately, means the policy got worse.
    regress_drop: float = 0.10
    #: RL: a stall whose approx KL is above this share of target_kl is held back by target_kl too.
    kl_binding: float = 0.5
    #: RL: a stalled run colliding less than this (window mean) fears the obstacle more than it should.
    timid_collision: float = 0.05
    #: RL runs that log a return but no success rate (most gymnasium tasks): the return that counts as
    #: solved (CartPole-v1: 475). Without it a return at its best cannot be told from a stall, so
    #: neither is diagnosed; with it, a run below it that stopped improving is stalled.
    solved_return: float = math.inf
    #: ... and the fall of the smoothed return from its best, as a share of the returns' range, that
    #: means the policy got worse (returns are noisy; a tenth of the range is noise).
    return_regress_drop: float = 0.3
    #: ... and beyond this many standard deviations of one evaluation's noise (from successive
    #: evaluations' differences over the window, their median): a fall the noise could make is no regression.
    return_regress_noise: float = 4.0
    #: ... and, with no ``solved_return`` set, this many evaluations in a row (the whole window) at the
    #: best return the run ever had, with no spread at all: the task's ceiling (CartPole's 500), a
    #: solved run. A rollout mean that is not updated for lack of finished episodes repeats too, but
    #: for as many rollouts as an episode spans, not a whole window.
    return_ceiling_evals: int = 8

    @classmethod
    def names(cls) -> frozenset[str]:
        """The names a policy's ``thresholds:`` may set."""
        return frozenset(f.name for f in fields(cls))

    @classmethod
    def from_policy(cls, policy: Policy) -> "Thresholds":
        known = cls.names()
        unknown = set(policy.thresholds) - known
        if unknown:
            raise ValueError(f"policy {policy.name!r}: unknown thresholds {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: type(getattr(cls, k))(v) for k, v in policy.thresholds.items()})


@dataclass(frozen=True)
class Move:
    param: str
    direction: Direction
    #: Preferred size of the move as a factor of the current value (0.5 = halve, 2 = double).
    factor: float
    #: Preferred value when the parameter sits at 0, where a factor means nothing.
    from_zero: float | None = None


class RulesProposer:
    """Deterministic heuristics over the snapshot. Stateless; safe to share between runs."""

    name = "rules"

    def propose(self, snapshot: TelemetrySnapshot, policy: Policy, ctx: DecisionContext, offer: Offer) -> ProposalResult:
        back = revert_proposal(snapshot, ctx, offer)
        if back is not None:
            return ProposalResult(proposal=back, source=self.name, audit={"evidence": back.rationale})
        diagnosis, evidence = diagnose_for_offer(snapshot, Thresholds.from_policy(policy), offer)
        waiting = waiting_for(diagnosis, policy, ctx)
        if waiting:
            # One remedy at a time for a problem: the next one waits until this one's effect is known.
            proposal = Proposal(diagnosis=diagnosis, rationale=f"{evidence}; {waiting}")
            return ProposalResult(proposal=proposal, source=self.name, audit={"evidence": evidence})
        changes, action, notes = remedy_with_notes(diagnosis, snapshot, policy, offer, ctx.history)
        rationale = evidence
        held_back = any(n.startswith(HURT_NOTE) for n in notes)
        if (not changes and action is None and diagnosis not in (Diagnosis.HEALTHY, Diagnosis.INSUFFICIENT_DATA)
                and not held_back):
            rationale += "; no allowed move is available right now (cooldown, budget or bounds)"
        if notes:
            rationale += "; " + "; ".join(notes)
        rl = diagnosis == Diagnosis.DIVERGENCE and is_rl(snapshot)
        problem = stop_problem(diagnosis, evidence) if action == Action.STOP else None
        if problem is not None and Action.ROLLBACK not in offer.actions:
            rationale += ("; nothing is restored by the stop: unless the job keeps its best checkpoint itself, it "
                          "ends with its last weights (register a rollback action: README, 'In your training script')")
        proposal = Proposal(
            diagnosis=diagnosis,
            changes=changes,
            action=action,
            rationale=rationale,
            expected_outcome=_RL_REGRESSION_EXPECTED if rl else _EXPECTED.get(diagnosis, ""),
            watch_next=_RL_REGRESSION_WATCH if rl else _WATCH.get(diagnosis, ""),
            problem=problem,
        )
        return ProposalResult(proposal=proposal, source=self.name, audit={"evidence": evidence})


def stop_problem(diagnosis: Diagnosis, evidence: str) -> Diagnosis | None:
    """The problem a stop ends: overfitting or a plateau that remedies did not fix; None when the run
    reached its goal (an RL task solved)."""
    if diagnosis != Diagnosis.CONVERGED:
        return diagnosis if diagnosis not in (Diagnosis.HEALTHY, Diagnosis.INSUFFICIENT_DATA) else None
    if evidence.startswith(PLATEAU_STOP_PREFIX):
        return Diagnosis.PLATEAU
    if evidence.startswith(OVERFIT_STOP_PREFIX):
        return Diagnosis.OVERFITTING
    return None


def waiting_for(diagnosis: Diagnosis, policy: Policy, ctx: DecisionContext) -> str:
    """Non-empty when an earlier remedy for ``diagnosis`` is still being measured (``limits.settle``):
    what is awaited. Divergence does not wait: speed wins there."""
    if diagnosis in (Diagnosis.DIVERGENCE, Diagnosis.HEALTHY, Diagnosis.INSUFFICIENT_DATA, Diagnosis.CONVERGED):
        return ""
    rec = unsettled(ctx, diagnosis, policy.limits.settle)
    if rec is None:
        return ""
    window = policy.limits.settle
    seen = "" if rec.effective_step is None else f", {ctx.evals_between(rec.effective_step - 1, ctx.step)} so far"
    return f"waiting for the effect of #{rec.seq} ({window.evals} evaluations after it took effect{seen})"


def revert_proposal(snap: TelemetrySnapshot, ctx: DecisionContext, offer: Offer) -> Proposal | None:
    """Set back the latest change measured ``hurt`` (undone as :func:`atm.policies.undo_value` says, and a
    rollback to the best checkpoint where the job offers one), unless a later decision already did. None when there is
    nothing to set back, or nothing the policy allows now."""
    rec = hurt_unanswered(ctx.history)
    if rec is None or rec.effect is None:
        return None
    changes = {}
    for name, change in rec.changes.items():
        now = ctx.params.get(name)
        back = change.old if now is None else undo_value(change, rec.applied_values.get(name), now)
        value = next((o for o in offer.choices.get(name, []) if math.isclose(o, back, rel_tol=1e-6, abs_tol=1e-12)), None)
        if value is not None:
            changes[name] = value
    action = Action.ROLLBACK if Action.ROLLBACK in offer.actions else None
    if not changes and action is None:
        return None
    what = ", ".join(f"{k} back to {fmt(v)}" for k, v in changes.items()) or "the best checkpoint"
    return Proposal(
        diagnosis=rec.diagnosis, changes=changes, action=action, reverts=rec.seq,
        rationale=f"#{rec.seq} {rec.effect.summary()}: {what}" + (" with a rollback" if changes and action else ""),
        expected_outcome=f"{rec.effect.metric} back on its trend from before #{rec.seq}",
        watch_next=rec.effect.metric,
    )


def diagnose_for_offer(snap: TelemetrySnapshot, t: Thresholds, offer: Offer) -> tuple[Diagnosis, str]:
    """:func:`diagnose`, except that a supervised run whose remedies are exhausted but which may not
    stop now (stop not offered: too early, or the job has no stop) is still treated for what it has
    (overfitting, or a plateau)."""
    diagnosis, evidence = diagnose(snap, t)
    if diagnosis == Diagnosis.CONVERGED and not is_rl(snap) and Action.STOP not in offer.actions:
        if evidence.startswith(PLATEAU_STOP_PREFIX):
            return Diagnosis.PLATEAU, evidence.replace("stop and keep the best checkpoint",
                                                       "stop is not available, so another remedy")
        head, _, rest = evidence.partition(": keep the best checkpoint. ")
        return Diagnosis.OVERFITTING, (f"{rest}; stop is not available, so another remedy "
                                       f"({head.removeprefix(OVERFIT_STOP_PREFIX + ', ')})")
    return diagnosis, evidence


def diagnose(snap: TelemetrySnapshot, t: Thresholds = Thresholds()) -> tuple[Diagnosis, str]:
    """The most pressing problem in the snapshot and the evidence for it, in words."""
    s, sig = snap.series, snap.signals
    if sig.get("nonfinite"):
        bad = [r for r, st in s.items() if st.nonfinite]
        return Diagnosis.DIVERGENCE, f"non-finite values in {', '.join(bad)}"
    if is_rl(snap):
        return _diagnose_rl(snap, t)

    train, val = s.get("train_loss"), s.get("val_loss")
    primary = val or train
    if primary is None or primary.n < t.min_points:
        n = primary.n if primary else 0
        return Diagnosis.INSUFFICIENT_DATA, f"{n} points of the primary metric; need {t.min_points}"
    # A validation loss at a new best measured after the train loss's best says the model still
    # generalises better: a noisy train loss that made little progress (a long warm-up) is not
    # divergence. Seen in a trial: "gave back 74% of its progress" on flat noise cut the lr 4x.
    val_improving = (val is not None and val.steps_since_best == 0
                     and val.best_step > float(sig.get("train_smoothed_best_step", math.inf)))
    if float(sig.get("train_lost_progress", 0.0)) > t.diverge_lost and not val_improving:
        assert train is not None
        return Diagnosis.DIVERGENCE, (
            f"train loss (smoothed) {fmt(float(sig['train_smoothed']))} gave back {float(sig['train_lost_progress']):.0%} "
            f"of its progress (best {fmt(float(sig['train_smoothed_best']))}, worst {fmt(float(sig['train_smoothed_worst']))})"
        )
    warming = _warming_up(snap, primary, t)
    # In a warm-up, a gradient spike while the losses still fall to new lows is the model starting to
    # learn as the lr rises, not a run diverging: seen on a Trainer's BERT (grad norm 0.2 -> 19 while
    # val fell 0.69 -> 0.60), its lr cut 4x. A spike that hurts shows in the loss at the next evaluation.
    learning = bool(warming) and ((val is not None and val.steps_since_best == 0)
                                  or (val is None and float(sig.get("train_lost_progress", 1.0)) <= 0.0))
    if (float(sig.get("grad_norm_ratio", 0.0)) > t.grad_spike and not learning
            and not _recovering(snap, Diagnosis.DIVERGENCE, "train_loss", t)):
        return Diagnosis.DIVERGENCE, f"gradient norm spiked to {float(sig['grad_norm_ratio']):.1f}x its recent mean"
    if warming:
        return Diagnosis.HEALTHY, warming
    if val is not None and train is not None:
        dropout_cost = _dropout_overregularized(snap, t)
        if dropout_cost:
            return Diagnosis.OVER_REGULARIZATION, dropout_cost
        rise = float(sig.get("rise_over_best", 0.0))
        if _val_rising(snap, t):
            recovering = _recovering(snap, Diagnosis.OVERFITTING, "val_loss", t)
            if recovering:
                return Diagnosis.HEALTHY, recovering
            exhausted = _remedies_exhausted(snap, val, t) or _no_remedy_helped(snap, val, "val_loss", Diagnosis.OVERFITTING, t)
            if exhausted:
                return Diagnosis.CONVERGED, exhausted
            # The train loss at that evaluation, from the gap (val minus train there): the latest train
            # point is a later, noisier minibatch, and quoted beside the gap the two did not add up.
            gap = float(sig.get("gap", math.nan))
            at_eval = val.latest - gap if math.isfinite(gap) else train.latest
            return Diagnosis.OVERFITTING, (
                f"val loss {fmt(val.latest)} is {rise:.1%} above its best {fmt(val.best)} (step {val.best_step}) "
                f"while train loss falls ({fmt(at_eval)} at that evaluation); the gap val - train "
                f"{fmt(gap)} is widening"
            )
    ratio = float(sig.get("loss_component_ratio", 0.0))
    unmoved = _imbalance_unmoved(snap, ratio, t) if ratio > t.imbalance_ratio else ""
    if ratio > t.imbalance_ratio and not unmoved:
        return Diagnosis.LOSS_IMBALANCE, f"largest loss component is {ratio:.0f}x the smallest"
    apart = _moving_apart(snap, t)
    if apart:
        recovering = _recovering(snap, Diagnosis.OVERFITTING, "val_loss", t)
        return (Diagnosis.HEALTHY, recovering) if recovering else (Diagnosis.OVERFITTING, apart)
    if "window_improvement" not in sig:
        # Fewer than 3 evaluations since the run went on from a restored checkpoint: no trend to read
        # yet. (Read as the default, this was worded "still improving (100.0% over the window)".)
        return Diagnosis.HEALTHY, (f"{primary.key} {fmt(primary.latest)}: too few evaluations to read a trend from "
                                   "(fewer than 3 since it went on from a restored checkpoint)"
                                   + (f"; {unmoved}" if unmoved else ""))
    improvement = float(sig["window_improvement"])
    # A plateau needs evidence: an improvement within the noise of the window's fit. A run still
    # improving slowly, but surely, at a small lr is not cut further (seen: a harmful lr cut).
    significant = improvement - float(sig.get("window_improvement_ci", math.inf)) > 0
    if improvement < t.plateau_improvement and not significant:
        gap_ratio = float(sig.get("gap_ratio", 2.0))
        if val is not None and train is not None and gap_ratio < t.over_reg_gap_ratio and _regularized(snap):
            return Diagnosis.OVER_REGULARIZATION, (
                f"{primary.key} stalled ({improvement:.1%} over the window) with train loss no lower than val "
                f"(ratio {gap_ratio:.2f}) under {_regularizers(snap)}"
            )
        moved = f"improved {improvement:.1%}" if improvement >= 0 else f"got {-improvement:.1%} worse"
        role = "val_loss" if val is not None else "train_loss"
        exhausted = _plateau_exhausted(snap, primary, role, t) or _no_remedy_helped(snap, primary, role, Diagnosis.PLATEAU, t)
        if exhausted:
            return Diagnosis.CONVERGED, exhausted
        return Diagnosis.PLATEAU, f"{primary.key} {moved} over the last window; best {fmt(primary.best)} at step {primary.best_step}"
    slow = _lr_too_low(snap, t)
    if slow:
        return Diagnosis.LR_TOO_LOW, slow + (f"; {unmoved}" if unmoved else "")
    healthy = f"{primary.key} {fmt(primary.latest)} still improving ({improvement:.1%} over the window)"
    if improvement < t.plateau_improvement:
        ci = float(sig.get("window_improvement_ci", math.inf))
        healthy = (f"{primary.key} {fmt(primary.latest)} still improving: {improvement:.2%} over the window, "
                   f"more than its noise (±{ci:.2%}), so not a plateau")
    return Diagnosis.HEALTHY, healthy + (f"; {unmoved}" if unmoved else "")


def _diagnose_rl(snap: TelemetrySnapshot, t: Thresholds) -> tuple[Diagnosis, str]:
    s = snap.series
    coll = s.get("collision")
    # A run that logs collisions but no goal metric can still be judged on safety, not on progress.
    goal = s.get("safe_success") or s.get("success") or s.get("return") or coll
    assert goal is not None
    if goal.n < t.min_evals:
        return Diagnosis.INSUFFICIENT_DATA, f"{goal.n} evaluations so far"
    succ = s.get("safe_success") or s.get("success")
    if succ is not None and coll is not None:
        # Solved now and lately: the EMA, not the window mean, so a run that climbed fast may stop
        # before it has spent a whole window up there (and before a reckless recipe wrecks it).
        if succ.latest >= t.solved_success and coll.latest <= t.solved_collision and succ.ema >= t.solved_success - 0.05:
            return Diagnosis.CONVERGED, f"safe success {succ.latest:.2f} (recent average {succ.ema:.2f}) with collisions {coll.latest:.2f}"
    if coll is not None and coll.latest > t.unsafe_collision:
        return Diagnosis.UNSAFE_EXPLORATION, f"collision rate {coll.latest:.2f} (limit {t.unsafe_collision})"
    runaway = _runaway_exploration(snap, t)
    if runaway:
        return Diagnosis.UNSAFE_EXPLORATION, runaway
    if succ is None and s.get("return") is not None:
        return _diagnose_return(snap, s["return"], t)
    gain = float(snap.signals.get("goal_window_gain", 0.0))
    # The release's rollback gate: a drop that lasts (the recent average is down too), not one bad evaluation ...
    lasting_drop = (
        succ is not None and succ.steps_since_best > 0
        and min(succ.best - succ.latest, succ.best - succ.ema) >= t.regress_drop
    )
    # ... on a falling trend, since the average of a run still climbing lags below its best.
    regressed = lasting_drop and succ is not None and succ.slope <= 0
    drop = _entropy_drop(snap)
    if drop is not None and drop[0] > t.collapse_entropy_drop and (gain < t.progress_gain or lasting_drop):
        return Diagnosis.EXPLORATION_COLLAPSE, f"{drop[1]} fell {drop[0]:.0%} over the window with no progress ({gain:+.2f})"
    if regressed:
        assert succ is not None
        # After the specific causes above, which have remedies of their own.
        return Diagnosis.DIVERGENCE, (
            f"{succ.key} fell to {succ.latest:.2f} (recent average {succ.ema:.2f}) from its best {succ.best:.2f} "
            f"at step {succ.best_step}: the policy is getting worse"
        )
    if succ is not None and succ.latest < t.stalled_success and gain < t.progress_gain:
        return Diagnosis.PLATEAU, f"{succ.key} {succ.latest:.2f}, not improving ({gain:+.2f} over the window)"
    return Diagnosis.HEALTHY, f"{goal.key} {fmt(goal.latest)}, trend {fmt(goal.slope)} per 1k steps"


def _diagnose_return(snap: TelemetrySnapshot, ret: SeriesStats, t: Thresholds) -> tuple[Diagnosis, str]:
    """An RL run judged by its return alone, in shares of the returns' range (their units are the task's)."""
    sig = snap.signals
    scale = max(ret.max - ret.min, 1e-8)
    gain = float(sig.get("return_window_gain", 0.0)) / scale
    drop = float(sig.get("return_recent_drop", 0.0)) / scale
    recent = float(sig.get("return_recent", ret.latest))
    target = math.isfinite(t.solved_return)
    if target and recent >= t.solved_return:
        return Diagnosis.CONVERGED, f"{ret.key} {fmt(ret.latest)} (last 3 evaluations {fmt(recent)}) reached {fmt(t.solved_return)}"
    held = int(sig.get("return_held", 0))
    if not target and held >= t.return_ceiling_evals and ret.latest >= ret.max and ret.max > ret.min:
        return Diagnosis.CONVERGED, (
            f"{ret.key} has held its best {fmt(ret.latest)} for the last {held} evaluations with no spread at all: "
            "the task's ceiling (set thresholds: {solved_return: ...} to stop at a target of your own)"
        )
    noise = sig.get("return_noise")
    if noise is None:
        # Two evaluations show neither a trend nor the noise to judge one by: a healthy run's slow start
        # (-1484 then -1744 on Pendulum, solved 12k steps later) read as a stall, and its lr was tripled.
        return Diagnosis.HEALTHY, f"{ret.key} {fmt(ret.latest)}: too few evaluations to read a trend from ({ret.n})"
    entropy = _entropy_drop(snap)
    below = drop >= t.progress_gain or (target and recent < t.solved_return)
    if entropy is not None and entropy[0] > t.collapse_entropy_drop and gain < t.progress_gain and below:
        return Diagnosis.EXPLORATION_COLLAPSE, (
            f"{entropy[1]} fell {entropy[0]:.0%} over the window with no progress of {ret.key} ({gain:+.0%} of its range)"
        )
    # A fall the evaluations' own noise could make is no regression: on a run that never learned (a
    # stalled one at a tiny lr), the range is all noise, and a dip from its luckiest evaluations cut an
    # lr that was already too small (seen in a trial). The best of many 3-evaluation means sits up to
    # about 1.5 sigma above their level, the latest about 1 below: 4 sigma is beyond both. No test of
    # the window's slope: a run that collapsed and drifts up within its noise since (CartPole from 400
    # to about 200) has a rising window and is still far below its best checkpoint.
    beyond_noise = float(sig.get("return_recent_drop", 0.0)) > t.return_regress_noise * float(noise)
    if drop >= t.return_regress_drop and beyond_noise:
        return Diagnosis.DIVERGENCE, (
            f"{ret.key} fell to {fmt(recent)} (last 3 evaluations) from {fmt(float(sig['return_recent_best']))}, "
            f"{drop:.0%} of its range: the policy is getting worse"
        )
    if target and gain < t.progress_gain:
        return Diagnosis.PLATEAU, f"{ret.key} {fmt(recent)} below {fmt(t.solved_return)}, not improving ({gain:+.0%} of its range over the window)"
    at_best = "" if target else " (set thresholds: {solved_return: ...} for stalls and stop)"
    return Diagnosis.HEALTHY, f"{ret.key} {fmt(ret.latest)}, {drop:.0%} of its range below its best{at_best}"


def _runaway_exploration(snap: TelemetrySnapshot, t: Thresholds) -> str:
    """Non-empty (the evidence) when the policy's noise keeps growing: the stochastic policy, the one
    that acts while training, drifts towards random actions however good its mean is."""
    s = snap.series
    # (role, how a change of the series maps to a factor on the action std). A Gaussian policy's
    # entropy grows by log(k) per action dimension when its std grows k times.
    for role, factor in (
        ("action_std", lambda a, b: b / a if a > 0 else 0.0),
        ("entropy", lambda a, b: math.exp(min(b - a, 50.0))),
        ("entropy_loss", lambda a, b: math.exp(min(a - b, 50.0))),
    ):
        st = s.get(role)
        if st is None or st.n < 3 or not st.trail:
            continue
        growth = factor(st.trail[0][1], st.latest)
        rising = st.slope > 0 if role != "entropy_loss" else st.slope < 0
        if growth >= t.runaway_std_ratio and rising:
            return (f"{st.key} went from {fmt(st.trail[0][1])} to {fmt(st.latest)} and is still rising: "
                    f"the policy's action noise grew {growth:.1f}x, exploration is running away")
        return ""
    return ""


def _goal_fell(snap: TelemetrySnapshot) -> str:
    """Non-empty (the evidence) when an RL run's goal (safe success, success or return) sits below its
    best beyond the run's noise: the window's mean more than two of its standard deviations, and more
    than a tenth of the range the goal has covered, under the best."""
    goal = snap.series.get("safe_success") or snap.series.get("success") or snap.series.get("return")
    if goal is None or goal.n < 3:
        return ""
    fall = goal.best - goal.window_mean
    if fall > 2 * goal.window_std and fall > 0.1 * (goal.max - goal.min) and fall > 0:
        return f"{goal.key} {fmt(goal.window_mean)} over the window, below its best {fmt(goal.best)} at step {goal.best_step}"
    return ""


def _entropy_drop(snap: TelemetrySnapshot) -> tuple[float, str] | None:
    """Relative fall of the policy's entropy over the trail, from whichever series the run logs."""
    s = snap.series
    for role, sign in (("entropy", 1.0), ("action_std", 1.0), ("entropy_loss", -1.0)):
        st = s.get(role)
        if st is None or st.n < 3 or not st.trail:
            continue
        start, end = sign * st.trail[0][1], sign * st.latest
        if start != 0:
            return (start - end) / abs(start), st.key
    return None


def _recovering(snap: TelemetrySnapshot, diagnosis: Diagnosis, role: str, t: Thresholds) -> str:
    """Non-empty when the last intervention answered ``diagnosis`` and ``role`` got no worse since.

    Gives a remedy time to work instead of stacking another on top while the metric recovers.
    Not once the remedy has had ``remedy_evals`` evaluations and the val loss's trend since (the
    window, from a restore on) is rising beyond its noise: the problem is back.
    """
    last = next((e for e in reversed(snap.recent) if e.diagnosis == diagnosis), None)
    if last is None or not snap.recent or snap.recent[-1].seq != last.seq or role not in last.before_after:
        return ""
    before, now = last.before_after[role]
    better = now >= before if role in HIGHER_IS_BETTER else now <= before
    if not better:
        return ""
    st = snap.series.get(role)
    if st is not None and last.applied_step is not None and st.best_step >= last.applied_step and st.steps_since_best > 0:
        # The remedy worked (a new best since it took effect) and the metric has left that best
        # again: the problem is back, though still short of where it was decided. A rollback makes
        # this common: val loss drops at once to the old best, then climbs again for many evaluations.
        return ""
    if role == "val_loss" and _had_time(last, t):
        # Better than when it was decided is no cap on how long to wait: a revert decided at a val loss the
        # change it undid had made 10x worse, then a rollback, and val climbed from the restored 0.080 to
        # 0.103 over 100 evaluations, still "better than 0.75", each read as recovering (a digits MLP,
        # Adam at 0.02); its overfitting was never answered again and the run ended 1.5x its early stop.
        improvement = float(snap.signals.get("window_improvement", 0.0))
        if improvement + float(snap.signals.get("window_improvement_ci", math.inf)) < 0:
            return ""
    return f"{role} {fmt(before)} -> {fmt(now)} since intervention #{last.seq}: giving it time to work"


def _spacing(st: SeriesStats) -> float:
    """The mean number of steps between a series' points."""
    return (st.last_step - st.first_step) / max(st.n - 1, 1)


def _warming_up(snap: TelemetrySnapshot, primary: SeriesStats, t: Thresholds) -> str:
    """Non-empty (the evidence) while the job's own schedule is still raising the lr: a warm-up, whose
    rising lr makes the losses noisy and slow by design. Nothing but divergence is answered then.
    (Seen: a CNN's 302-step linear warm-up read as overfitting at step 200, rolled back and its lr
    halved, so the warm-up peaked at half its height.) Not a warm-up: a rise atm applied itself, or an
    lr series that stopped being logged (the listener logs it while a schedule moves it)."""
    lr, sig = snap.series.get("lr"), snap.signals
    rise = float(sig.get("lr_window_rise", 0.0))
    if lr is None or rise <= t.warmup_lr_rise or lr.slope <= 0 or lr.latest < lr.max * (1 - 1e-9):
        return ""
    interval = _spacing(primary)
    if lr.key.startswith("atm/"):
        # The listener logs the lr on a clock (every 3 s, when it moved), not at evaluations: a job that
        # evaluates every 0.3 s sees it every 10 evaluations. Seen: a digits MLP's 30-epoch warm-up cut
        # at epoch 23 as overfitting, its lr last charted at epoch 18. Its own spacing says how often.
        interval = max(interval, _spacing(lr))
    if lr.last_step < primary.last_step - 1.5 * interval:
        return ""
    since = float(sig.get("lr_window_from", math.inf))
    if any(e.applied_step is not None and e.applied_step >= since and "lr" in e.changes for e in snap.recent):
        return ""
    return (f"the lr is still rising ({lr.key} {fmt(lr.latest / (1 + rise))} -> {fmt(lr.latest)} over its last "
            f"{min(lr.n, WINDOW)} points): a warm-up, left to its schedule")


#: What an lr raise must not follow: a problem whose remedy cut the lr (or might have), in this run.
_LR_CUT_BY = (Diagnosis.OVERFITTING, Diagnosis.DIVERGENCE, Diagnosis.PLATEAU)


def _lr_too_low(snap: TelemetrySnapshot, t: Thresholds) -> str:
    """Non-empty (the evidence) when val loss falls at a steady pace that is not slowing (see
    :attr:`Thresholds.lr_low_pace`), clearly beyond its noise and to a new best: the step size, not
    what is left to learn, holds it back. Seen on factor models, recurrent forecasters and MLPs under
    SGD with a small lr, where 1.5x the lr helped at 7 of the 8 points this reads so and was neutral at
    the eighth. Not read without an lr series (a warm-up could not be told from it), within
    ``PACE_MIN_EVALS`` evaluations of the lr's last rise or jump, of a restore or of atm's last
    change, after atm answered overfitting, divergence or a plateau in this run (their remedies cut
    the lr or stop short of it), nor after an earlier raise that was not measured helped, nor while a
    schedule moves the lr (``lr_scheduled``, from the listener) and fewer than 3 of its points are logged."""
    sig, val = snap.signals, snap.series.get("val_loss")
    if val is None or "train_loss" not in snap.series or "pace" not in sig or val.steps_since_best > 0:
        return ""
    if any(snap.applied.get(d.value, 0) for d in _LR_CUT_BY):
        return ""
    lr = snap.series.get("lr")
    if sig.get("lr_scheduled") and (lr is None or lr.n < 3):
        # A schedule moves the lr and too little of it is logged to tell a warm-up from a constant lr: the
        # listener checks every 3 s, so a job evaluating 4 times a second showed its warm-up as one point,
        # and the start of a 30-epoch warm-up was read as a slow run and raised 1.5x (3 seeds of 3).
        return ""
    last = next((e for e in reversed(snap.recent) if e.diagnosis == Diagnosis.LR_TOO_LOW), None)
    if last is not None and (last.outcome is None or last.outcome.label != EffectLabel.HELPED):
        return ""
    p, improvement = float(sig["pace"]), float(sig["pace_improvement"])
    ci = float(sig.get("pace_improvement_ci", math.inf))
    if p < t.lr_low_pace or improvement < t.lr_low_significance * ci:
        return ""
    return (f"{val.key} fell {improvement:.1%} (±{ci:.1%}) over its last evaluations to a new best {fmt(val.latest)}, "
            f"at {p:.1f}x its average pace since step {int(sig['pace_from'])} ({int(sig['pace_evals'])} evaluations): "
            "not slowing down, so the step size, not what is left to learn, holds it back")


def _val_rising(snap: TelemetrySnapshot, t: Thresholds) -> bool:
    """Overfitting proper: val loss risen above its best while the train/val gap widens."""
    val, sig = snap.series.get("val_loss"), snap.signals
    # Memorising puts train below val: a val rise with train at or above it (label smoothing, dropout,
    # noisy labels keep it there) is noise or too large a step, and a gap moving from below 0 towards
    # it is closing, not widening. Seen: "the gap val - train -0.004 is widening" on a healthy run.
    return (val is not None and "train_loss" in snap.series and val.steps_since_best > 0
            and float(sig.get("rise_over_best", 0.0)) > t.overfit_rise
            and float(sig.get("gap", 1.0)) > 0
            and float(sig.get("gap_slope", 0.0)) > t.overfit_gap_slope)


def _moving_apart(snap: TelemetrySnapshot, t: Thresholds) -> str:
    """Non-empty (the evidence) when train and val loss move apart before val loss turns: the gap (val
    above train) widened across the window by more than ``apart_gap_growth`` of the val loss and beyond
    its own noise, and less than ``apart_transfer`` of train's fall over it reached val (a healthy run's
    gap widens too, while val keeps most of what train gains). Memorisation has begun; a smaller step
    slows it while the model still generalises."""
    sig, val = snap.signals, snap.series.get("val_loss")
    if val is None or "train_loss" not in snap.series or _val_rising(snap, t):
        return ""
    trend, ci = float(sig.get("gap_trend", 0.0)), float(sig.get("gap_trend_ci", math.inf))
    if trend <= t.apart_gap_growth or trend - ci <= 0:
        return ""
    if float(sig.get("gap_mean", 0.0)) - float(sig.get("gap_mean_ci", math.inf)) <= 0:
        # Val is not above train across the window: early in a run, a train loss averaged over each
        # interval reads above val while it falls fast, and that lag closing as the descent slows looks
        # like a widening gap. Seen at the end of warm-ups, which are healthy training.
        return ""
    if float(sig.get("window_improvement", 0.0)) + float(sig.get("window_improvement_ci", math.inf)) < 0:
        # Val loss is rising beyond its noise: overfitting proper, for its own detector to judge.
        return ""
    share = transfer(sig)
    if share is not None and share >= t.apart_transfer:
        return ""
    reached = f"; {share:.0%} of train's fall reached val" if share is not None else ""
    return (f"train and val loss are moving apart: the gap (val above train, now {fmt(float(sig['gap']))}) widened by "
            f"{trend:.1%} of val loss over the window (±{ci:.1%}){reached}, while {val.key} is still near its best "
            f"{fmt(val.best)}: memorisation is beginning")


def transfer(sig: Mapping[str, float | bool]) -> float | None:
    """The share of train loss's fall over the gap's window that val loss fell too (1: all of it, 0 or
    below: none), from val's fall and the gap's widening over the same evaluations, both relative to the
    val best; None when either is missing or train did not fall. Pure."""
    if "gap_val_fall" not in sig or "gap_trend" not in sig:
        return None
    val_fall, widening = float(sig["gap_val_fall"]), float(sig["gap_trend"])
    train_fall = val_fall + widening
    return val_fall / train_fall if train_fall > 0 else None


def _dropout_overregularized(snap: TelemetrySnapshot, t: Thresholds) -> str:
    """Non-empty (the evidence) when the train loss sits above the val loss across the window, beyond its
    noise, under dropout: dropout is active in training only, so it costs the fit more than the model
    gains from it. A train loss averaged over an interval while it falls lags the evaluation at the
    interval's end; a gap smaller than one evaluation's progress is read as that lag, not as dropout."""
    dropout = snap.params.get("dropout", 0.0)
    val, sig = snap.series.get("val_loss"), snap.signals
    if dropout <= 0 or val is None or "gap_mean" not in sig:
        return ""
    mean, ci = float(sig["gap_mean"]), float(sig.get("gap_mean_ci", math.inf))
    window = min(val.n, WINDOW)
    per_eval = max(float(sig.get("window_improvement", 0.0)), 0.0) / max(window - 1, 1)
    # The evaluations the gap was read over: fewer than the window after a rollback or a dropout change.
    evals = int(sig.get("gap_evals", window))
    if mean + ci >= 0 or -mean <= per_eval:
        return ""
    if dropout < 1 and -mean > t.dropout_gap_bound * dropout / (1 - dropout):
        # Seen on a transformer trained on labels with 15% noise, dropout 0.1: train 160-290% above
        # val, read as dropout costing the fit; more dropout was the best move there, not less.
        return ""
    return (f"train loss is above val loss across the last {evals} evaluations (by {-mean:.1%} of val loss, "
            f"±{ci:.1%}) under dropout {fmt(dropout)}: it costs the fit more than it helps")


def _remedies_exhausted(snap: TelemetrySnapshot, val: SeriesStats, t: Thresholds) -> str:
    """Non-empty (the evidence) when overfitting is back although remedies were applied, and the
    last one brought no new best: more training only overfits again, so stop and keep the best."""
    # Only remedies for a val loss that had risen: an lr cut made while train and val were moving apart,
    # val still at its best, was no attempt to bring val back, and must not bring the stop closer.
    fixes = [e for e in snap.recent if e.diagnosis == Diagnosis.OVERFITTING and e.applied_step is not None
             and e.before_after.get("val_loss", (math.inf, 0.0))[0] > val.best * (1 + t.overfit_rise)]
    if len(fixes) < t.overfit_remedies_before_stop or not _had_time(fixes[-1], t):
        return ""
    if fixes[-1].action != Action.ROLLBACK and any(f.action == Action.ROLLBACK for f in fixes):
        # The job can roll back, but the last remedy went on from an overfit model (rollback was in
        # its cooldown): it had no fair chance at a new best. The next remedy comes with a rollback.
        return ""
    if val.best_step >= fixes[-1].applied_step:
        return ""
    count = max(snap.applied.get(Diagnosis.OVERFITTING.value, 0), len(fixes))
    return (f"{OVERFIT_STOP_PREFIX}, best {val.key} {fmt(val.best)} at step {val.best_step}: keep the best checkpoint. "
            f"Overfitting is back after {count} remedies, and the last (#{fixes[-1].seq}, in effect from step "
            f"{fixes[-1].applied_step}) brought no new best")


def _imbalance_unmoved(snap: TelemetrySnapshot, ratio: float, t: Thresholds) -> str:
    """Non-empty (the evidence) when the last loss-weight changes did not move the components' balance.

    Seen in a new user's job that logged ``loss/main`` and ``loss/aux`` unweighted: the ratio does not
    depend on the weight, and the rules halved ``loss_weight.aux`` 11 times, using up the budget.
    """
    n = t.imbalance_remedies_unmoved
    tail: list[Effect] = []
    for e in reversed(snap.recent):
        if e.diagnosis != Diagnosis.LOSS_IMBALANCE or e.applied_step is None:
            break
        tail.insert(0, e)
    if n < 1 or len(tail) < n:
        return ""
    before = [abs(b) for r, (b, _) in tail[0].before_after.items() if r.startswith("loss_components[")]
    if len(before) < 2:
        return ""
    was = max(before) / max(min(before), 1e-12)
    if ratio < 0.5 * was:
        return ""
    return (f"the largest loss component is {ratio:.0f}x the smallest, and {len(tail)} loss-weight changes since "
            f"step {tail[0].applied_step} did not move that ({was:.0f}x before): if the job logs its components "
            "unweighted, log each as weight * loss so that atm sees their balance")


def _plateau_exhausted(snap: TelemetrySnapshot, primary: SeriesStats, role: str, t: Thresholds) -> str:
    """Non-empty (the evidence) when the last remedies were all for this plateau and none brought a
    new best worth the name (better by ``plateau_improvement`` than the level when they began): the
    run has converged, and more cuts would only spend the budget (what early stopping after
    ReduceLROnPlateau, with its min_delta, does)."""
    n = t.plateau_remedies_before_stop
    tail = snap.recent[-n:]
    if n < 1 or len(tail) < n or any(e.diagnosis != Diagnosis.PLATEAU or e.applied_step is None for e in tail):
        return ""
    if not _had_time(tail[-1], t):
        return ""
    first = tail[0].applied_step
    assert first is not None
    if primary.best_step >= first:
        # A new best, but is it more than noise? Seen in cosine-annealed Lightning runs: bests of 0.2%
        # after each halving kept the stop away while the lr was cut down to the policy's floor.
        level = tail[0].before_after.get(role, (None, None))[0]
        if level is None or primary.best < level - abs(level) * t.plateau_improvement:
            return ""
        return (f"{PLATEAU_STOP_PREFIX} of {primary.key} better than {t.plateau_improvement:.0%} below {fmt(level)} "
                f"through the last {n} remedies for this plateau (from step {first} on; best {fmt(primary.best)}): "
                "stop and keep the best checkpoint")
    return (f"{PLATEAU_STOP_PREFIX} of {primary.key} since step {primary.best_step} ({fmt(primary.best)}) through the last "
            f"{n} remedies for this plateau (from step {first} on): stop and keep the best checkpoint")


def _no_remedy_helped(snap: TelemetrySnapshot, primary: SeriesStats, role: str, now: Diagnosis, t: Thresholds) -> str:
    """Non-empty (the evidence, worded for the problem seen ``now``) when the last remedies, for
    overfitting and plateaus in any order, brought no new best worth the name (better by
    ``plateau_improvement`` than the level when they began) and none was measured ``helped``: the
    run has given what it had, and more remedies would only walk the parameters to their bounds."""
    n = t.remedies_before_stop
    tail = snap.recent[-n:]
    kinds = (Diagnosis.OVERFITTING, Diagnosis.PLATEAU)
    if n < 1 or len(tail) < n or any(e.diagnosis not in kinds or e.applied_step is None for e in tail):
        return ""
    if not _had_time(tail[-1], t) or any(e.outcome is not None and e.outcome.label == EffectLabel.HELPED for e in tail):
        return ""
    first = tail[0].applied_step
    assert first is not None
    if primary.best_step >= first:
        # The level is the loss when the first of them was decided, as in :func:`_plateau_exhausted`; for
        # overfitting that is above the best then, so a new best below it by the margin counts as
        # progress however small against the old best: the rule errs towards going on. (Measured
        # from the lowest of the remedies' levels instead, it stopped a TinyStories run whose first
        # remedy, a rollback, had brought val loss from 1.37 to a new best of 1.21.)
        level = tail[0].before_after.get(role, (math.nan, math.nan))[0]
        if not math.isfinite(level) or primary.best < level - abs(level) * t.plateau_improvement:
            return ""
    kinds_seen = ", ".join(sorted({e.diagnosis.value for e in tail if e.diagnosis is not None}))
    since = (f"best {fmt(primary.best)} at step {primary.best_step}" if primary.best_step < first
             else f"best {fmt(primary.best)}, not {t.plateau_improvement:.0%} below the level when they began")
    what = (f"the last {n} remedies ({kinds_seen}; #{tail[0].seq} to #{tail[-1].seq}, in effect from step {first} on) "
            f"brought no new best of {primary.key} ({since}) and none was measured helped")
    if now == Diagnosis.OVERFITTING:
        return (f"{OVERFIT_STOP_PREFIX}, best {primary.key} {fmt(primary.best)} at step {primary.best_step}: "
                f"keep the best checkpoint. Overfitting is back and {what}")
    return f"{PLATEAU_STOP_PREFIX} worth the name: {what}: stop and keep the best checkpoint"


def _had_time(effect: Effect, t: Thresholds) -> bool:
    """Whether a remedy has been in effect long enough to be judged by its result."""
    return effect.applied_step is not None and (effect.evals_since or 0) >= t.remedy_evals


#: How a converged-plateau diagnosis begins (told apart from the overfitting one when stop is not offered).
PLATEAU_STOP_PREFIX = "no new best"
#: How the stop for overfitting that remedies did not fix begins.
OVERFIT_STOP_PREFIX = "stopped: overfitting"


def _regularized(snap: TelemetrySnapshot) -> bool:
    p = snap.params
    return p.get("weight_decay", 0) > 0.05 or p.get("dropout", 0) > 0.15


def _regularizers(snap: TelemetrySnapshot) -> str:
    return ", ".join(f"{k}={fmt(snap.params[k])}" for k in ("weight_decay", "dropout") if k in snap.params)


#: Ranked moves per diagnosis. The first ones that the offer allows are taken.
_REMEDIES: dict[Diagnosis, list[Move]] = {
    # The paper's remedy: back to the best checkpoint (the action), more dropout, a smaller step.
    Diagnosis.OVERFITTING: [Move("dropout", "up", 2.0, from_zero=0.1), Move("lr", "down", 0.5), Move("weight_decay", "up", 2.0, from_zero=0.05)],
    Diagnosis.DIVERGENCE: [Move("lr", "down", 0.25)],
    Diagnosis.PLATEAU: [Move("lr", "down", 0.5)],
    # 1.5x, not 2x: on the runs this was read from, 2x hurt at a point where 1.5x was neutral.
    Diagnosis.LR_TOO_LOW: [Move("lr", "up", 1.5)],
    Diagnosis.OVER_REGULARIZATION: [Move("weight_decay", "down", 0.5), Move("dropout", "down", 0.5)],
    Diagnosis.EXPLORATION_COLLAPSE: [Move("ent_coef", "up", 2.0), Move("clip_range", "up", 1.5)],
    Diagnosis.UNSAFE_EXPLORATION: [
        Move("reward.collision_penalty", "up", 2.0),
        Move("lr", "down", 0.5),
        Move("ent_coef", "down", 0.5),
    ],
}

#: Overfitting setting in (train and val moving apart, val still near its best): a smaller step alone.
_OVERFIT_ONSET = [Move("lr", "down", 0.5)]
#: Dropout costing the fit (train loss above val): take most of it away at once; the overfitting
#: detector answers if the model then starts to memorise.
_DROPOUT_COST = [Move("dropout", "down", 0.25)]

#: RL stalls are the opposite of supervised plateaus: a cautious recipe needs bolder updates, and
#: (see :func:`_rl_stall_moves`) a reward that pays for reaching the goal more than for not crashing.
_RL_PLATEAU = [Move("lr", "up", 5.0), Move("n_epochs", "up", 2.0), Move("clip_range", "up", 2.0)]
#: Exploration running away: the entropy bonus is the cause, cut it hard; then smaller, safer steps.
_RL_RUNAWAY = [Move("ent_coef", "down", 0.25), Move("lr", "down", 0.5), Move("reward.collision_penalty", "up", 2.0)]
#: A policy that got worse: back to the best checkpoint (the action), smaller and more careful steps.
_RL_REGRESSION = [Move("lr", "down", 0.5), Move("ent_coef", "down", 0.5), Move("clip_range", "down", 0.5)]


def _rl_stall_moves(snap: TelemetrySnapshot, t: Thresholds) -> list[Move]:
    """The stall remedy for this run: bolder updates, a looser KL stop when it binds, a richer reward when safe.

    Step size and epochs come first. Putting the reward first was measured (cautious recipe, 3 seeds):
    the run then took off after two interventions with the step size still small, the rules saw
    progress and stopped pushing, and one seed ended at 0.61 against 0.94 for the others.
    """
    s, p = snap.series, snap.params
    moves = list(_RL_PLATEAU[:2])
    kl = s.get("approx_kl")
    if kl is not None and p.get("target_kl", 0) > 0 and kl.latest >= t.kl_binding * p["target_kl"]:
        # Early stopping on KL cuts each update short: a higher LR alone would change little.
        moves.append(Move("target_kl", "up", 3.0))
    coll = s.get("collision")
    if coll is not None and coll.window_mean <= t.timid_collision:
        # It (almost) never collides and never gets there: the penalty outweighs what reaching pays.
        moves.append(Move("reward.collision_penalty", "down", 0.5))
    if coll is not None and coll.latest <= t.solved_collision:
        # Few collisions and no progress: the agent is paid too little for getting there.
        moves += [Move("reward.progress_scale", "up", 2.0), Move("reward.success_bonus", "up", 2.0)]
    return moves + _RL_PLATEAU[2:]


def remedy(
    diagnosis: Diagnosis, snap: TelemetrySnapshot, policy: Policy, offer: Offer,
    history: Sequence[DecisionRecord] = (),
) -> tuple[dict[str, float], Action | None]:
    """The changes (and action) that answer ``diagnosis``, restricted to the offer; ``history``: the
    run's decision records, whose remedies measured hurt are not repeated."""
    changes, action, _ = remedy_with_notes(diagnosis, snap, policy, offer, history)
    return changes, action


def remedy_with_notes(
    diagnosis: Diagnosis, snap: TelemetrySnapshot, policy: Policy, offer: Offer,
    history: Sequence[DecisionRecord] = (),
) -> tuple[dict[str, float], Action | None, list[str]]:
    """:func:`remedy`, and notes for the rationale: moves escalated past a remedy measured neutral (the
    ones made), moves left out for having hurt, parameters not moved for being at the policy's bound or
    at the last value it offers."""
    notes: list[str] = []
    rl = is_rl(snap)
    if diagnosis == Diagnosis.CONVERGED:
        return {}, (Action.STOP if Action.STOP in offer.actions else None), notes
    moves = _REMEDIES.get(diagnosis, [])
    if rl and diagnosis == Diagnosis.UNSAFE_EXPLORATION and _runaway_exploration(snap, Thresholds.from_policy(policy)):
        moves = _RL_RUNAWAY
    elif rl and diagnosis == Diagnosis.PLATEAU:
        moves = _rl_stall_moves(snap, Thresholds.from_policy(policy))
    elif rl and diagnosis == Diagnosis.DIVERGENCE:
        moves = _RL_REGRESSION
    if diagnosis == Diagnosis.LOSS_IMBALANCE:
        moves = _imbalance_moves(snap, offer)
    t = Thresholds.from_policy(policy)
    onset = diagnosis == Diagnosis.OVERFITTING and not rl and not _val_rising(snap, t)
    if onset:
        # Val loss is still at (or within noise of) its best: nothing to roll back to, and more dropout
        # would raise both losses while the model adapts; a smaller step slows the memorising.
        moves = _OVERFIT_ONSET
    if diagnosis == Diagnosis.OVER_REGULARIZATION and _dropout_overregularized(snap, t):
        moves = _DROPOUT_COST
    last = next((e for e in reversed(snap.recent) if e.diagnosis == diagnosis and e.outcome is not None), None)
    escalated: tuple[str, list[Move]] | None = None
    if last is not None and last.outcome is not None and last.outcome.label == EffectLabel.NEUTRAL and last.changes:
        # The last remedy for this problem did nothing measurable: escalate to the next axes first
        # (lr, then regularisation), and come back to those only when nothing else is left.
        tried = set(last.changes)
        fresh = [m for m in moves if _target(m.param, policy) not in tried]
        if fresh and len(fresh) < len(moves):
            escalated = (f"#{last.seq} ({', '.join(sorted(tried))}) was neutral", fresh)
        moves = fresh + [m for m in moves if _target(m.param, policy) in tried]
    hurt = _hurt_moves(history, diagnosis, policy) if diagnosis != Diagnosis.DIVERGENCE else {}
    if hurt:
        # A remedy measured hurt was set back; proposing it again starts the same cycle (seen: lr halved
        # with weight decay 0 -> 0.05, hurt, set back, overfitting again, the same remedy again, eight
        # times in one run). Divergence keeps its lr cut: there is no other answer to it.
        kept = [m for m in moves if (_target(m.param, policy), m.direction) not in hurt]
        if len(kept) < len(moves):
            seqs = sorted(set(hurt.values()))
            notes.append(f"{HURT_NOTE} {', '.join(f'#{q}' for q in seqs)} ("
                         + ", ".join(f"{name} {d}" for (name, d) in sorted(hurt)) + ")")
            moves = kept
    changes: dict[str, float] = {}
    groups_moved: set[str] = set()
    for mv in moves:
        if len(groups_moved) >= policy.limits.max_changes:
            break
        members = group_members(mv.param, policy) or [mv.param]
        moved = False
        for name in members:
            opts = offer.choices.get(name)
            cur = snap.params.get(name)
            if cur is None or name in changes:
                continue
            value = pick(opts, cur, mv.direction, mv.factor, mv.from_zero) if opts else None
            if value is not None:
                changes[name] = value
                moved = True
            elif name in policy.params and _at_bound(cur, policy.params[name], mv.direction):
                rule = policy.params[name]
                bound = rule.min if mv.direction == "down" else rule.max
                notes.append(f"{name} is at the policy's {'minimum' if mv.direction == 'down' else 'maximum'} {fmt(bound)}")
            elif opts:
                # Inside its bounds but with no offered value on that side (dropout 0.3, the preset's top
                # value, maximum 0.5): a reason too, or the rationale leaves the move unexplained.
                notes.append(f"{name} is at the {'lowest' if mv.direction == 'down' else 'highest'} value the "
                             f"policy offers ({fmt(cur)})")
        if moved:
            groups_moved.add(mv.param)
    if escalated is not None:
        # Written from what moved: named before the moves were picked, it announced "trying dropout"
        # for a dropout already at its top value, beside changes of the same parameters again.
        head, fresh = escalated
        trying = [m.param for m in fresh if m.param in groups_moved]
        again = [m.param for m in moves if m.param in groups_moved and m not in fresh]
        if trying:
            notes.insert(0, f"{head}: trying {', '.join(trying)}" + (f", and {', '.join(again)} again" if again else ""))
        else:
            notes.insert(0, f"{head} and no other parameter could move" + (f": {', '.join(again)} again" if again else ""))
    # The best checkpoint is better on the metric that matters than where the run is now. Exploration
    # running away while the goal falls from its best is such a case too: smaller steps alone keep
    # the worse policy it drifted to.
    rollback = (diagnosis in (Diagnosis.DIVERGENCE, Diagnosis.OVERFITTING) and not onset) or (
        moves is _RL_RUNAWAY and bool(_goal_fell(snap)))
    action = Action.ROLLBACK if rollback and Action.ROLLBACK in offer.actions else None
    return changes, action, notes


#: How many of the run's latest applied decisions a remedy measured hurt is remembered over. The
#: snapshot's ``recent`` (3) is too short: a revert and two rollbacks later the same remedy came back.
HURT_MEMORY = 8
#: How the rationale's note on moves left out for having hurt begins.
HURT_NOTE = "not again what hurt under"


def _hurt_moves(history: Sequence[DecisionRecord], diagnosis: Diagnosis, policy: Policy) -> dict[tuple[str, Direction], int]:
    """The moves (parameter or group, direction) of this problem's remedies measured ``hurt`` among the
    run's last :data:`HURT_MEMORY` applied decisions, each with the remedy's seq."""
    out: dict[tuple[str, Direction], int] = {}
    applied = [r for r in history if r.status == Status.APPLIED][-HURT_MEMORY:]
    for r in applied:
        if r.diagnosis != diagnosis or r.effect is None or r.effect.label != EffectLabel.HURT:
            continue
        for name, change in r.changes.items():
            if change.new != change.old:
                out[(_target(name, policy), "up" if change.new > change.old else "down")] = r.seq
    return out


def group_members(name: str, policy: Policy) -> list[str]:
    """The parameters of group ``name`` (``lr`` for ``actor_lr`` and ``critic_lr``), in policy order;
    empty when ``name`` is no group (a parameter of that name moves alone)."""
    if name in policy.params and policy.params[name].group in (None, name):
        members = [n for n, r in policy.params.items() if r.group == name and n != name]
        return [name, *members] if members else []
    return [n for n, r in policy.params.items() if r.group == name]


def _target(name: str, policy: Policy) -> str:
    """The group a parameter moves with, or the parameter itself."""
    rule = policy.params.get(name)
    return rule.group if rule is not None and rule.group else name


def _at_bound(current: float, rule: ParamRule, direction: Direction) -> bool:
    bound = rule.min if direction == "down" else rule.max
    return math.isclose(current, bound, rel_tol=1e-6, abs_tol=1e-12)


def _imbalance_moves(snap: TelemetrySnapshot, offer: Offer) -> list[Move]:
    comps = {r[len("loss_components[") : -1]: st.ema for r, st in snap.series.items() if r.startswith("loss_components[")}
    if not comps:
        return []
    dominant = max(comps, key=lambda k: abs(comps[k]))
    tail = dominant.rsplit("/", 1)[-1].removeprefix("loss_")
    moves = [Move(p, "down", 0.5) for p in offer.choices if p.startswith("loss_weight.") and p.split(".", 1)[1] in tail]
    return moves or [Move(p, "up", 2.0) for p in offer.choices if p.startswith("loss_weight.")]


def pick(options: list[float], current: float, direction: Direction, factor: float,
         from_zero: float | None = None) -> float | None:
    """The allowed value in ``direction`` closest (in log scale) to ``current * factor``.

    From zero, the value closest to ``from_zero`` if given, else the gentlest step. Down to zero only
    when no value above zero is on that side (a zero among the options must not hide the factor).
    """
    side = [o for o in options if (o > current if direction == "up" else o < current)]
    if not side:
        return None
    positive = [o for o in side if o > 0]
    if current > 0 and positive:
        target = math.log(current * factor)
        return min(positive, key=lambda o: abs(math.log(o) - target))
    if current == 0 and from_zero is not None:
        return min(side, key=lambda o: abs(o - from_zero))
    return min(side) if direction == "up" else max(side)


_EXPECTED = {
    Diagnosis.OVERFITTING: "validation loss stops rising within two evaluations; the train/val gap narrows",
    Diagnosis.DIVERGENCE: "training loss returns to its recent range; no more non-finite values",
    Diagnosis.PLATEAU: "the primary metric starts improving again",
    Diagnosis.LR_TOO_LOW: "val loss falls faster than its trend before the change, without spikes",
    Diagnosis.OVER_REGULARIZATION: "training loss falls below its plateau",
    Diagnosis.LOSS_IMBALANCE: "loss components move to a comparable scale",
    Diagnosis.EXPLORATION_COLLAPSE: "entropy stops falling and success resumes improving",
    Diagnosis.UNSAFE_EXPLORATION: "collision rate falls within two evaluations",
    Diagnosis.CONVERGED: "training stops with the best checkpoint kept",
}
_RL_REGRESSION_EXPECTED = "back at the best checkpoint's success; no new drop of the goal metric within two evaluations"
_RL_REGRESSION_WATCH = "safe success against its best, collision rate"
_WATCH = {
    Diagnosis.OVERFITTING: "val_loss and the train/val gap",
    Diagnosis.DIVERGENCE: "train_loss, grad_norm",
    Diagnosis.PLATEAU: "the primary metric's slope",
    Diagnosis.LR_TOO_LOW: "val_loss against its trend; train_loss for spikes",
    Diagnosis.OVER_REGULARIZATION: "train_loss",
    Diagnosis.LOSS_IMBALANCE: "each loss component",
    Diagnosis.EXPLORATION_COLLAPSE: "entropy, success",
    Diagnosis.UNSAFE_EXPLORATION: "collision rate, safe success",
}
