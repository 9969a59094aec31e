"""The policy validator, rule by rule, plus properties that hold for any policy."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atm.policies import (
    DecisionContext,
    ParamRule,
    Policy,
    available_actions,
    available_choices,
    check,
    choices,
    load_policy,
)
from atm.schema import Action, DecisionRecord, Diagnosis, Proposal, Status, Verdict
from atm.testing import make_context, make_record

BASE: dict[str, Any] = {
    "name": "unit",
    "params": {
        "lr": {"min": 1e-5, "max": 1e-2, "multipliers": [0.5, 2.0], "max_relative_change": 1.0},
        "wd": {"min": 0.0, "max": 0.5, "multipliers": [0.5, 2.0], "values": [0.01, 0.1]},
        "dropout": {"min": 0.0, "max": 0.5, "values": [0.0, 0.1, 0.2, 0.3]},
        "epochs": {"min": 1, "max": 8, "multipliers": [0.5, 1.5, 2.0], "integer": True},
        "seed_knob": {"min": 0.0, "max": 1.0, "values": [0.5]},
    },
    "frozen": ["seed_knob"],
    "actions": {"stop": {"not_before": {"evals": 4}}, "rollback": {"cooldown": {"steps": 100}}},
    "limits": {"max_changes": 2, "warmup": {}, "cooldown": {}},
}
PARAMS = {"lr": 1e-3, "wd": 0.0, "dropout": 0.1, "epochs": 3.0, "seed_knob": 0.2}


def make_policy(**patch: Any) -> Policy:
    """BASE with nested keys replaced: ``make_policy(params__lr__cooldown={"steps": 100})``."""
    data = copy.deepcopy(BASE)
    for path, value in patch.items():
        *parents, leaf = path.split("__")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return Policy.model_validate(data)


def propose(changes: dict[str, float] | None = None, action: Action | None = None) -> Proposal:
    return Proposal(diagnosis=Diagnosis.PLATEAU, changes=changes or {}, action=action)


def ctx_at(step: int = 1000, params: dict[str, float] | None = None, **kw: Any) -> DecisionContext:
    return make_context(step, PARAMS if params is None else params, **kw)


# --------------------------------------------------------------------------- single changes, table-driven

# (id, policy patch, context kwargs, changes, accepted new values, {param: words the drop reason must contain})
CHANGE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, float], dict[str, float], dict[str, list[str]]]] = [
    ("multiplier move accepted", {}, {}, {"lr": 2e-3}, {"lr": 2e-3}, {}),
    ("halving accepted", {}, {}, {"lr": 5e-4}, {"lr": 5e-4}, {}),
    ("value not among choices", {}, {}, {"lr": 1.7e-3}, {},
     {"lr": ["0.0017 is not an allowed move from 0.001", "allowed: 0.0005, 0.002"]}),
    ("above max", {}, {}, {"lr": 0.05}, {}, {"lr": ["outside", "[1e-05, 0.01]"]}),
    ("below min", {}, {}, {"lr": 1e-6}, {}, {"lr": ["outside"]}),
    ("max_relative_change", {"params__lr__multipliers": [0.25, 0.5, 2.0, 4.0]}, {}, {"lr": 4e-3}, {},
     {"lr": ["300%", "max_relative_change", "100%"]}),
    ("within max_relative_change", {"params__lr__multipliers": [0.25, 0.5, 2.0, 4.0]}, {}, {"lr": 2.5e-4},
     {"lr": 2.5e-4}, {}),
    ("no-op dropped", {}, {}, {"lr": 1e-3}, {}, {"lr": ["no effect", "already at that value"]}),
    ("frozen dropped", {}, {}, {"seed_knob": 0.5}, {}, {"seed_knob": ["frozen"]}),
    ("unknown param dropped", {}, {}, {"momentum": 0.9}, {},
     {"momentum": ["not a parameter of this policy", "lr, wd, dropout, epochs"]}),
    ("param not reported by the job", {}, {"params": {"lr": 1e-3}}, {"dropout": 0.2}, {},
     {"dropout": ["has not registered", "atm.listen"]}),
    ("non-finite value", {}, {}, {"lr": float("nan")}, {}, {"lr": ["not a finite number"]}),
    ("integer rounded", {}, {}, {"epochs": 4.0000001}, {"epochs": 4.0}, {}),
    ("integer off the grid", {}, {}, {"epochs": 5.0}, {}, {"epochs": ["allowed: 2, 4, 6"]}),
    ("raise from 0 via values", {}, {}, {"wd": 0.01}, {"wd": 0.01}, {}),
    ("from 0 only values", {}, {}, {"wd": 0.02}, {}, {"wd": ["allowed: 0.01, 0.1"]}),
    ("multiplier clamped to max", {}, {"params": {**PARAMS, "lr": 8e-3}}, {"lr": 1e-2}, {"lr": 1e-2}, {}),
    ("unclamped multiple beyond max", {}, {"params": {**PARAMS, "lr": 8e-3}}, {"lr": 1.6e-2}, {},
     {"lr": ["outside"]}),
    ("multiplier clamped to min", {}, {"params": {**PARAMS, "lr": 1.5e-5}}, {"lr": 1e-5}, {"lr": 1e-5}, {}),
]


@pytest.mark.parametrize(
    "patch, ctx_kw, changes, accepted, dropped", [c[1:] for c in CHANGE_CASES], ids=[c[0] for c in CHANGE_CASES]
)
def test_change_rules(
    patch: dict[str, Any],
    ctx_kw: dict[str, Any],
    changes: dict[str, float],
    accepted: dict[str, float],
    dropped: dict[str, list[str]],
) -> None:
    ctx = ctx_at(**ctx_kw)
    verdict = check(propose(changes), make_policy(**patch), ctx)
    assert verdict.accepted == bool(accepted), verdict.reason
    assert {k: c.new for k, c in verdict.changes.items()} == pytest.approx(accepted)
    for name, c in verdict.changes.items():
        assert c.old == ctx.params[name]
    assert set(verdict.dropped) == set(dropped)
    for name, words in dropped.items():
        for w in words:
            assert w in verdict.dropped[name], verdict.dropped[name]
            # The rejection reason repeats each drop so the audit log needs no second field.
            assert w in verdict.reason


def test_accepted_reason_lists_each_change() -> None:
    verdict = check(propose({"lr": 2e-3, "wd": 0.1}), make_policy(), ctx_at())
    assert verdict.accepted
    assert verdict.reason == "within policy: lr 0.001 -> 0.002, wd 0 -> 0.1"


def test_accepted_changes_carry_the_limits_the_listener_enforces() -> None:
    # The policy's largest multiplier (either way) and its minimum travel inside the signed update.
    verdict = check(propose({"lr": 5e-4, "dropout": 0.2}), make_policy(params__lr__multipliers=[0.25, 0.5, 2.0]), ctx_at())
    assert verdict.changes["lr"].max_factor == 4.0 and verdict.changes["lr"].min == 1e-5
    assert verdict.changes["dropout"].max_factor is None and verdict.changes["dropout"].min == 0.0


def test_integer_value_is_a_whole_float() -> None:
    verdict = check(propose({"epochs": 6.0000002}), make_policy(), ctx_at())
    assert verdict.changes["epochs"].new == 6.0
    assert float(verdict.changes["epochs"].new).is_integer()


def test_empty_proposal_is_no_change() -> None:
    verdict = check(propose(), make_policy(), ctx_at())
    assert not verdict.accepted
    assert verdict.reason == "no change proposed"


# --------------------------------------------------------------------------- choices


@pytest.mark.parametrize(
    "rule, current, expected",
    [
        (ParamRule(min=1e-5, max=1e-2, multipliers=[0.5, 2.0]), 1e-3, [5e-4, 2e-3]),
        # At the bound, the move that clamps back onto the current value is hidden.
        (ParamRule(min=1e-5, max=1e-2, multipliers=[0.5, 2.0]), 1e-2, [5e-3]),
        (ParamRule(min=1e-5, max=1e-2, multipliers=[0.5, 2.0]), 1e-5, [2e-5]),
        # Near the bound, the move is clamped onto the bound.
        (ParamRule(min=1e-5, max=1e-2, multipliers=[0.5, 2.0]), 8e-3, [4e-3, 1e-2]),
        # Multipliers do nothing at 0; values raise it.
        (ParamRule(min=0, max=0.5, multipliers=[0.5, 2.0], values=[0.01, 0.1]), 0.0, [0.01, 0.1]),
        # The current value is not offered, duplicates appear once.
        (ParamRule(min=0, max=0.5, multipliers=[2.0], values=[0.1, 0.2]), 0.1, [0.2]),
        # max_relative_change filters values too (0.05 -> 0.2 is +300%) ...
        (ParamRule(min=0, max=0.5, values=[0.0, 0.05, 0.1, 0.2], max_relative_change=2.0), 0.05, [0.0, 0.1]),
        # ... but not from 0, where no relative change exists.
        (ParamRule(min=0, max=0.5, values=[0.05, 0.1], max_relative_change=0.5), 0.0, [0.05, 0.1]),
        # Integers: 3 x [0.5, 1.5, 2] = 1.5, 4.5, 6 -> rounded half to even: 2, 4, 6.
        (ParamRule(min=1, max=8, multipliers=[0.5, 1.5, 2.0], integer=True), 3.0, [2.0, 4.0, 6.0]),
        # Rounding can leave the bounds; such a value is not offered.
        (ParamRule(min=2.4, max=8, multipliers=[0.5], values=[6.0], integer=True), 4.0, [6.0]),
    ],
)
def test_choices(rule: ParamRule, current: float, expected: list[float]) -> None:
    assert choices(rule, current) == pytest.approx(expected)


def test_available_choices_leaves_out_frozen_unreported_and_cooling_params() -> None:
    policy = make_policy(params__lr__cooldown={"steps": 100})
    history = [make_record(1, 950, changes={"lr": (5e-4, 1e-3)})]
    offer = available_choices(policy, ctx_at(params={k: v for k, v in PARAMS.items() if k != "dropout"}, history=history))
    assert set(offer) == {"wd", "epochs"}
    assert offer["wd"] == pytest.approx([0.01, 0.1])
    assert offer["epochs"] == [2.0, 4.0, 6.0]


def test_available_choices_empty_when_globally_blocked() -> None:
    policy = make_policy(limits__warmup={"steps": 2000})
    assert available_choices(policy, ctx_at()) == {}
    assert available_actions(policy, ctx_at()) == []


# --------------------------------------------------------------------------- pace: cooldowns, budgets, warm-up


def _lr_verdict(policy: Policy, step: int, history: list[DecisionRecord], evals: list[int] | None = None) -> Verdict:
    return check(propose({"lr": 2e-3}), policy, ctx_at(step, history=history, eval_steps=evals or []))


def test_param_cooldown_in_steps() -> None:
    policy = make_policy(params__lr__cooldown={"steps": 100})
    history = [make_record(1, 100, changes={"lr": (5e-4, 1e-3)})]
    blocked = _lr_verdict(policy, 199, history)
    assert not blocked.accepted
    assert blocked.dropped["lr"] == "cooldown: lr last changed at step 100, wait 100 steps"
    assert _lr_verdict(policy, 200, history).accepted


def test_param_cooldown_in_evals() -> None:
    policy = make_policy(params__lr__cooldown={"evals": 2})
    history = [make_record(1, 100, changes={"lr": (5e-4, 1e-3)})]
    # The evaluation at the decision's own step was already seen by it: it does not count.
    blocked = _lr_verdict(policy, 180, history, evals=[50, 100, 150])
    assert blocked.dropped["lr"] == "cooldown: lr last changed at step 100, wait 2 evaluations"
    assert _lr_verdict(policy, 200, history, evals=[50, 100, 150, 200]).accepted


def test_cooldown_counts_evaluations_after_the_change_took_effect() -> None:
    policy = make_policy(params__lr__cooldown={"evals": 2})
    # Decided on the evaluation at 100; the job applied it only after logging the one at 150 (the
    # update waited for its next step, or the daemon read the log late): 150 does not count.
    history = [make_record(1, 100, changes={"lr": (5e-4, 1e-3)}, effective_step=160)]
    blocked = _lr_verdict(policy, 200, history, evals=[50, 100, 150, 200])
    assert blocked.dropped["lr"] == "cooldown: lr last changed at step 100 (in effect from step 160), wait 2 evaluations"
    assert _lr_verdict(policy, 250, history, evals=[50, 100, 150, 200, 250]).accepted
    # Applied, but nothing logged since: no evaluation has seen it yet.
    unseen = [history[0].model_copy(update={"effective_step": None})]
    verdict = _lr_verdict(policy, 250, unseen, evals=[50, 100, 150, 200, 250])
    assert verdict.dropped["lr"] == "cooldown: lr last changed at step 100 (applied, nothing logged since), wait 2 evaluations"


def test_cooldown_of_one_param_leaves_others_free() -> None:
    policy = make_policy(params__lr__cooldown={"steps": 100})
    history = [make_record(1, 950, changes={"lr": (5e-4, 1e-3)})]
    verdict = check(propose({"lr": 2e-3, "wd": 0.1}), policy, ctx_at(history=history))
    assert verdict.accepted
    assert set(verdict.changes) == {"wd"}
    assert "cooldown" in verdict.dropped["lr"]
    assert "dropped lr: cooldown" in verdict.reason


def test_param_budget_within_window() -> None:
    policy = make_policy(params__lr__budget=2, params__lr__budget_window={"steps": 1000})
    history = [make_record(1, 100, changes={"lr": (5e-4, 1e-3)}), make_record(2, 300, changes={"lr": (1e-3, 1e-3 * 1.01)})]
    blocked = _lr_verdict(policy, 500, history)
    assert blocked.dropped["lr"] == "budget: lr changed 2 times within 1000 steps (limit 2)"
    # At 1100 the change at step 100 has left the window; one remains.
    assert _lr_verdict(policy, 1100, history).accepted


def test_zero_budget_never_allows_a_change() -> None:
    policy = make_policy(params__lr__budget=0, params__lr__budget_window={"evals": 5})
    assert "budget" in _lr_verdict(policy, 1000, []).dropped["lr"]


@pytest.mark.parametrize(
    "warmup, step, evals, ok",
    [
        ({"steps": 500}, 499, [], False),
        ({"steps": 500}, 500, [], True),
        ({"evals": 3}, 250, [100, 200], False),
        ({"evals": 3}, 300, [100, 200, 300], True),
        ({"steps": 500, "evals": 3}, 400, [100, 200, 300], False),
        # Metrics logged without step= are numbered 0, 1, 2 ...: the evaluation at 0 counts.
        ({"evals": 3}, 2, [0, 1, 2], True),
        ({"evals": 3}, 1, [0, 1], False),
    ],
)
def test_global_warmup(warmup: dict[str, int], step: int, evals: list[int], ok: bool) -> None:
    policy = make_policy(limits__warmup=warmup)
    verdict = _lr_verdict(policy, step, [], evals)
    assert verdict.accepted == ok, verdict.reason
    if not ok:
        assert verdict.reason.startswith("warm-up: no intervention before ")
        assert f"(now at step {step})" in verdict.reason
        assert verdict.dropped == {"lr": verdict.reason}


def test_global_cooldown_counts_any_param() -> None:
    policy = make_policy(limits__cooldown={"evals": 1})
    history = [make_record(1, 300, changes={"wd": (0.0, 0.01)})]
    blocked = _lr_verdict(policy, 320, history, evals=[100, 200, 300])
    assert blocked.reason == "cooldown: last intervention at step 300, wait 1 evaluation"
    assert _lr_verdict(policy, 400, history, evals=[100, 200, 300, 400]).accepted


def test_max_interventions() -> None:
    policy = make_policy(limits__max_interventions=2)
    history = [make_record(1, 100, changes={"wd": (0.0, 0.01)}), make_record(2, 200, action=Action.ROLLBACK)]
    verdict = _lr_verdict(policy, 1000, history)
    assert verdict.reason == "budget: the run already had 2 of 2 interventions"
    assert not verdict.accepted


@pytest.mark.parametrize(
    "status, counts",
    [
        (Status.APPLIED, True),
        (Status.PENDING, True),
        (Status.DRY_RUN, False),  # an earlier dry run's previews never reached the job
        (Status.REJECTED, False),
        (Status.STALE, False),
        (Status.FAILED, False),
        (Status.NOOP, False),
    ],
)
def test_which_records_count_against_cooldowns(status: Status, counts: bool) -> None:
    policy = make_policy(params__lr__cooldown={"steps": 100}, limits__max_interventions=1)
    history = [make_record(1, 950, status=status, changes={"lr": (5e-4, 1e-3)})]
    verdict = _lr_verdict(policy, 1000, history)
    assert verdict.accepted == (not counts), verdict.reason


def test_a_dry_run_counts_its_own_previews() -> None:
    # So that a dry run shows the manager's real pace; a live daemon after it starts with a full budget.
    from dataclasses import replace

    policy = make_policy(limits__max_interventions=1)
    history = [make_record(1, 500, status=Status.DRY_RUN, changes={"wd": (0.0, 0.01)})]
    ctx = ctx_at(1000, history=history)
    assert check(propose({"lr": 2e-3}), policy, ctx).accepted
    verdict = check(propose({"lr": 2e-3}), policy, replace(ctx, dry_run=True))
    assert verdict.reason == "budget: the run already had 1 of 1 interventions"


# --------------------------------------------------------------------------- several changes and actions


def test_max_changes_keeps_the_first_n() -> None:
    verdict = check(propose({"lr": 2e-3, "wd": 0.1, "dropout": 0.2}), make_policy(), ctx_at())
    assert verdict.accepted
    assert list(verdict.changes) == ["lr", "wd"]
    assert verdict.dropped == {"dropout": "at most 2 parameters (or groups) may change at once"}
    assert verdict.reason.endswith("; dropped dropout: at most 2 parameters (or groups) may change at once")


def test_max_changes_counts_only_accepted_changes() -> None:
    verdict = check(propose({"lr": 0.5, "wd": 0.1, "dropout": 0.2}), make_policy(), ctx_at())
    assert list(verdict.changes) == ["wd", "dropout"]
    assert set(verdict.dropped) == {"lr"}


def test_action_not_in_policy() -> None:
    policy = make_policy(actions={"rollback": {}})
    verdict = check(propose(action=Action.STOP), policy, ctx_at())
    assert not verdict.accepted
    assert verdict.dropped == {"stop": "action 'stop' is not allowed by this policy"}


def test_action_not_before() -> None:
    early = check(propose(action=Action.STOP), make_policy(), ctx_at(300, eval_every=100))
    assert early.dropped == {"stop": "stop not before 4 evaluations"}
    assert available_actions(make_policy(), ctx_at(300, eval_every=100)) == [Action.ROLLBACK]
    late = check(propose(action=Action.STOP), make_policy(), ctx_at(400, eval_every=100))
    assert late.accepted and late.action == Action.STOP
    assert late.reason == "within policy: stop"


def test_action_cooldown() -> None:
    history = [make_record(1, 100, action=Action.ROLLBACK)]
    blocked = check(propose(action=Action.ROLLBACK), make_policy(), ctx_at(150, history=history))
    assert blocked.dropped == {"rollback": "cooldown: rollback last at step 100, wait 100 steps"}
    assert check(propose(action=Action.ROLLBACK), make_policy(), ctx_at(200, history=history)).accepted


def test_changes_survive_a_refused_action() -> None:
    verdict = check(propose({"lr": 2e-3}, action=Action.STOP), make_policy(), ctx_at(100))
    assert verdict.accepted
    assert verdict.action is None
    assert set(verdict.changes) == {"lr"}
    assert "stop" in verdict.dropped


def test_global_block_drops_the_action_too() -> None:
    policy = make_policy(limits__warmup={"steps": 5000})
    verdict = check(propose({"lr": 2e-3}, action=Action.ROLLBACK), policy, ctx_at())
    assert set(verdict.dropped) == {"lr", "rollback"}


def test_presets_accept_their_own_offer() -> None:
    for name in ("lm", "rl-ppo"):
        policy = load_policy(name)
        params = {p: (r.values[len(r.values) // 2] if r.values else (r.min + r.max) / 2) for p, r in policy.params.items()}
        ctx = make_context(100_000, params, eval_every=1000)
        offer = available_choices(policy, ctx)
        assert set(offer) == set(policy.controllable())
        for p, opts in offer.items():
            for o in opts:
                assert check(propose({p: o}), policy, ctx).accepted


# --------------------------------------------------------------------------- properties


@st.composite
def param_rules(draw: st.DrawFn) -> ParamRule:
    lo = draw(st.floats(-10, 10, allow_nan=False))
    hi = lo + draw(st.floats(0, 100, allow_nan=False))
    inside = st.floats(0, 1).map(lambda u: min(max(lo + u * (hi - lo), lo), hi))
    multipliers = draw(st.lists(st.floats(0.05, 10), max_size=5))
    values = draw(st.lists(st.one_of(inside, st.sampled_from([lo, hi])), min_size=0 if multipliers else 1, max_size=5))
    return ParamRule(
        min=lo,
        max=hi,
        multipliers=multipliers,
        values=values,
        max_relative_change=draw(st.none() | st.floats(0.01, 5)),
        cooldown={"steps": draw(st.sampled_from([0, 0, 0, 100]))},
        integer=draw(st.booleans()),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Policy, DecisionContext, Proposal]:
    rules = draw(st.lists(param_rules(), min_size=1, max_size=3))
    names = [f"p{i}" for i in range(len(rules))]
    policy = Policy(
        name="prop",
        params=dict(zip(names, rules)),
        limits={"max_changes": draw(st.integers(1, 2)), "cooldown": {"steps": draw(st.sampled_from([0, 0, 20]))}},
        actions={Action.ROLLBACK: {"cooldown": {"steps": draw(st.integers(0, 200))}}},
    )
    params: dict[str, float] = {}
    for name, rule in zip(names, rules):
        span = rule.max - rule.min
        params[name] = draw(
            st.one_of(
                st.floats(rule.min - span - 1, rule.max + span + 1, allow_nan=False),
                st.sampled_from([0.0, rule.min, rule.max, *rule.values]),
            )
        )
    step = draw(st.integers(0, 1000))
    records = []
    for seq in range(1, draw(st.integers(0, 4)) + 1):
        changed = draw(st.sets(st.sampled_from(names), max_size=2))
        records.append(
            make_record(
                seq,
                draw(st.integers(0, step)),
                status=draw(st.sampled_from(list(Status))),
                changes={n: (1.0, 2.0) for n in changed},
                action=draw(st.none() | st.just(Action.ROLLBACK)),
            )
        )
    records.sort(key=lambda r: r.step)
    ctx = make_context(step, params, history=records, eval_steps=draw(st.lists(st.integers(0, 1000), max_size=10)))
    changes: dict[str, float] = {}
    proposed = draw(st.permutations([*names, "unknown"]))[: draw(st.integers(1, len(names) + 1))]
    for name in proposed:
        rule = policy.params.get(name)
        offered = choices(rule, params[name]) if rule is not None else []
        candidates = [st.floats(-200, 200, allow_nan=False)]
        if offered:
            # Mostly offered values, so that several valid changes meet max_changes.
            candidates += [st.sampled_from(offered)] * 5
        if rule is not None:
            candidates.append(st.sampled_from([rule.min, rule.max, params[name], *rule.values]))
        changes[name] = draw(st.one_of(candidates))
    action = draw(st.none() | st.sampled_from(list(Action)))
    return policy, ctx, Proposal(diagnosis=Diagnosis.PLATEAU, changes=changes, action=action)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_accepted_changes_always_respect_the_rule(case: tuple[Policy, DecisionContext, Proposal]) -> None:
    policy, ctx, proposal = case
    verdict = check(proposal, policy, ctx)
    assert len(verdict.changes) <= policy.limits.max_changes
    assert verdict.accepted == bool(verdict.changes or verdict.action)
    assert set(verdict.changes).isdisjoint(verdict.dropped)
    for name, change in verdict.changes.items():
        rule = policy.params[name]
        assert change.old == ctx.params[name]
        assert rule.min <= change.new <= rule.max
        assert any(math.isclose(change.new, o, rel_tol=1e-6, abs_tol=1e-12) for o in choices(rule, change.old))
        if rule.max_relative_change is not None and change.old != 0:
            assert abs(change.new - change.old) / abs(change.old) <= rule.max_relative_change * (1 + 1e-5) + 1e-5
        if rule.integer:
            assert change.new == round(change.new)
    # Every proposed change is either accepted or dropped with a reason.
    assert set(verdict.changes) | set(verdict.dropped) >= set(proposal.changes)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_everything_offered_is_accepted(case: tuple[Policy, DecisionContext, Proposal]) -> None:
    policy, ctx, _ = case
    for name, opts in available_choices(policy, ctx).items():
        for value in opts:
            verdict = check(propose({name: value}), policy, ctx)
            assert verdict.accepted, f"offered {name}={value} but: {verdict.reason}"
            assert verdict.changes[name].new == pytest.approx(value, rel=1e-9)
    for action in available_actions(policy, ctx):
        verdict = check(propose(action=action), policy, ctx)
        assert verdict.accepted and verdict.action == action, verdict.reason


def test_a_warm_up_in_steps_that_a_run_on_another_axis_never_reaches_says_how_to_count_it() -> None:
    from atm.policies import blocked, parse_policy

    policy = parse_policy("name: w\nmetrics: {val_loss: [v]}\nparams: {lr: {min: 0.0, max: 1.0, multipliers: [0.5]}}\n"
                          "limits: {warmup: {evals: 2, steps: 20000}}\n", source="w.yaml")
    # One step per update: 37 updates and 12 evaluations in, far below 20,000 "steps".
    ctx = DecisionContext(step=37, params={"lr": 0.1}, eval_steps=list(range(3, 38, 3)))
    why = blocked(policy, ctx)
    assert why is not None and why.startswith("warm-up: no intervention before 20000 steps and 2 evaluations")
    assert "limits: {warmup: {evals: 2}}" in why
    # A run early on the same axis is only told how long the warm-up is.
    assert "limits:" not in (blocked(policy, DecisionContext(step=37, params={"lr": 0.1}, eval_steps=[30])) or "")
    assert blocked(policy, DecisionContext(step=20000, params={"lr": 0.1}, eval_steps=[10000, 20000])) is None


def test_after_a_stop_the_job_acknowledged_nothing_more_is_changed() -> None:
    # A job that acknowledged stop but trains on (it never reads listener.stop_requested): tuning it
    # further would contradict the judgement that training should end.
    policy = make_policy()
    stopped = make_record(3, 500, action=Action.STOP, applied_step=505, effective_step=510)
    ctx = ctx_at(2000, eval_every=100, history=[stopped])
    assert available_choices(policy, ctx) == {} and available_actions(policy, ctx) == []
    verdict = check(propose({"lr": 5e-4}), policy, ctx)
    assert not verdict.accepted and verdict.reason.startswith("stopped: the job was asked to stop at step 500")
    assert "listener.stop_requested" in verdict.reason
    # A stop the job refused, or one that never went out, does not end the run's management.
    for status in (Status.REJECTED, Status.STALE):
        other = make_record(3, 500, action=Action.STOP, status=status)
        assert available_choices(policy, ctx_at(2000, eval_every=100, history=[other]))
