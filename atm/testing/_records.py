"""Decision records and validator contexts for tests of cooldowns, budgets and measured effects."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from atm.policies import DecisionContext
from atm.schema import Action, Change, DecisionRecord, Diagnosis, Status


def make_record(
    seq: int,
    step: int,
    *,
    status: Status = Status.APPLIED,
    changes: Mapping[str, tuple[float, float]] | None = None,
    action: Action | None = None,
    diagnosis: Diagnosis = Diagnosis.OVERFITTING,
    run_id: str = "run-test",
    applied_step: int | None = None,
    effective_step: int | None = None,
) -> DecisionRecord:
    """One earlier decision; ``changes`` maps a parameter to ``(old, new)``.

    An applied record takes effect at ``effective_step``, else at ``applied_step`` (a synthetic run has
    one step axis), else at the step after its decision. For a change whose effect is not visible
    yet, ``model_copy(update={"effective_step": None})``.
    """
    if effective_step is None and status == Status.APPLIED:
        effective_step = applied_step if applied_step is not None else step + 1
    return DecisionRecord(
        run_id=run_id,
        seq=seq,
        step=step,
        status=status,
        source="rules",
        diagnosis=diagnosis,
        changes={k: Change(old=o, new=n) for k, (o, n) in (changes or {}).items()},
        action=action,
        applied_step=applied_step,
        effective_step=effective_step,
    )


def make_context(
    step: int,
    params: Mapping[str, float],
    *,
    history: Sequence[DecisionRecord] = (),
    eval_steps: Sequence[int] | None = None,
    eval_every: int | None = None,
) -> DecisionContext:
    """A validator context at ``step``.

    Evaluations are either listed (``eval_steps``) or placed every ``eval_every`` steps up to
    ``step`` (first one at ``eval_every``); with neither, the run has had no evaluation.
    """
    if eval_steps is not None and eval_every is not None:
        raise ValueError("give eval_steps or eval_every, not both")
    if eval_every is not None:
        evals: tuple[int, ...] = tuple(range(eval_every, step + 1, eval_every))
    else:
        evals = tuple(sorted(eval_steps or ()))
    return DecisionContext(step=step, params=dict(params), history=tuple(history), eval_steps=evals)


def assert_bounded(proposal: Any, sit: Any) -> None:
    """Every change of ``proposal`` is one ``sit``'s offer listed, inside its policy's range, and the
    validator accepts it (``sit``: an :class:`atm.watcher.evaluate.Situation`)."""
    from atm.policies import check

    for param, value in proposal.changes.items():
        assert value in sit.offer.choices[param], (param, value)
        rule = sit.policy.params[param]
        assert rule.min <= value <= rule.max
    if proposal.action is not None:
        assert proposal.action in sit.offer.actions
    if not proposal.is_noop:
        verdict = check(proposal, sit.policy, sit.ctx)
        assert verdict.accepted and not verdict.dropped, verdict.reason
