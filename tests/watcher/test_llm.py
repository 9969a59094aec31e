"""The LLM proposer's response model: only offered moves, actions and fitting diagnoses validate."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from atm.policies import DecisionContext, load_policy
from atm.schema import Action, Change, DecisionRecord, Diagnosis, Status
from atm.watcher.llm import LLMProposer, _brief
from atm.watcher.llm_answer import MAX_WHY, has_choice, response_model, to_proposal
from atm.watcher.llm_variants import VARIANTS, bundled_examples, remedy_moves
from atm.watcher.prompt import offered_moves, policy_prompt
from atm.watcher.proposer import Offer
from atm.watcher.rules import Thresholds, diagnose_for_offer, remedy


@pytest.fixture(scope="module")
def overfit(labelled):
    return labelled("overfit_small_gpt")


def doc(diagnosis: str, moves: list[str] | None = None, action: str | None = "none", **extra: Any) -> str:
    decision: dict[str, Any] = {"diagnosis": diagnosis}
    if moves is not None:
        decision["moves"] = moves
    if action is not None:
        decision["action"] = action
    return json.dumps(
        {"decision": decision, "rationale": "r", "expected_outcome": "e", "watch_next": "w", **extra}
    )


def test_only_offered_moves_validate(overfit):
    model = response_model(overfit.snapshot, overfit.policy, overfit.offer)
    ok = model.model_validate_json(doc("overfitting", ["dropout up to 0.1", "lr down to 0.001"], "rollback"))
    prop = to_proposal(ok)
    assert prop.diagnosis == Diagnosis.OVERFITTING
    assert prop.changes == {"dropout": 0.1, "lr": 0.001} and prop.action == Action.ROLLBACK
    for bad in (
        doc("overfitting", ["lr up to 10"]),  # outside bounds and not offered
        doc("overfitting", ["momentum up to 0.99"]),  # not a parameter of the policy
        doc("overfitting", ["dropout up to 0.15"]),  # in bounds, but not an allowed value
        doc("exploration_collapse", []),  # an RL diagnosis for a supervised run
        doc(
            "overfitting", ["dropout up to 0.1", "lr down to 0.001", "weight_decay up to 0.01"]
        ),  # > max_changes
        doc("overfitting", [], "explode"),  # unknown action
        doc("overfitting", [], "none", extra_field=1),
    ):
        with pytest.raises(ValidationError):
            model.model_validate_json(bad)


def test_offered_values_are_the_exact_choices(overfit):
    model = response_model(overfit.snapshot, overfit.policy, overfit.offer)
    schema = json.dumps(model.model_json_schema())
    for m in offered_moves(overfit.offer, overfit.snapshot.params):
        assert json.dumps(m.label) in schema
        assert m.value in overfit.offer.choices[m.param]
    for p, values in overfit.offer.choices.items():
        rule = overfit.policy.params[p]
        assert all(rule.min <= v <= rule.max for v in values)


def test_first_move_per_parameter_counts(overfit):
    model = response_model(overfit.snapshot, overfit.policy, overfit.offer)
    ans = model.model_validate_json(doc("overfitting", ["dropout up to 0.1", "dropout up to 0.1"]))
    assert to_proposal(ans).changes == {"dropout": 0.1}
    ans = model.model_validate_json(
        doc("overfitting", ["dropout up to 0.2", "lr down to 0.001", "dropout up to 0.1"])
    )
    assert to_proposal(ans).changes == {"dropout": 0.2, "lr": 0.001}


def test_policy_in_validation_context_refuses_what_check_would_drop(overfit):
    model = response_model(overfit.snapshot, overfit.policy, overfit.offer)
    # The same answer is fine now, but not once lr is cooling down from a change one evaluation ago.
    text = doc("overfitting", ["lr down to 0.001"])
    model.model_validate_json(text, context={"policy": overfit.policy, "ctx": overfit.ctx})
    recent = DecisionRecord(
        run_id="r",
        seq=1,
        step=overfit.ctx.step - 1,
        status=Status.APPLIED,
        source="rules",
        diagnosis=Diagnosis.OVERFITTING,
        changes={"lr": Change(old=0.004, new=0.002)},
    )
    ctx = DecisionContext(
        step=overfit.ctx.step, params=overfit.ctx.params, history=[recent], eval_steps=overfit.ctx.eval_steps
    )
    with pytest.raises(ValidationError, match="cooldown"):
        model.model_validate_json(text, context={"policy": overfit.policy, "ctx": ctx})


def test_nothing_offered_leaves_only_a_diagnosis(overfit):
    empty = Offer(choices={}, actions=[])
    model = response_model(overfit.snapshot, overfit.policy, empty)
    props = model.model_json_schema().get("$defs", {})
    assert "moves" not in json.dumps(props) and "moves" not in json.dumps(model.model_json_schema())
    prop = to_proposal(model.model_validate_json(doc("overfitting", None, None)))
    assert prop.is_noop and prop.diagnosis == Diagnosis.OVERFITTING


def test_coherent_schema_offers_only_moves_that_address_the_diagnosis(overfit):
    model = response_model(overfit.snapshot, overfit.policy, overfit.offer, coherent=True)
    # Regularize up for overfitting: fine. Lowering dropout, raising lr or stopping: not offered.
    model.model_validate_json(doc("overfitting", ["dropout up to 0.1"], "rollback"))
    with pytest.raises(ValidationError):
        model.model_validate_json(doc("overfitting", ["lr up to 0.003"]))
    with pytest.raises(ValidationError):
        model.model_validate_json(doc("overfitting", ["dropout up to 0.1"], "stop"))
    # A problem diagnosis comes with a move; "healthy" carries none.
    with pytest.raises(ValidationError):
        model.model_validate_json(doc("overfitting", [], "none"))
    healthy = to_proposal(model.model_validate_json(doc("healthy", None, None)))
    assert healthy.is_noop
    with pytest.raises(ValidationError):
        model.model_validate_json(doc("healthy", ["lr down to 0.001"], None))


def test_remedy_directions_rl_supervised_and_custom_knobs(labelled):
    rl = labelled("rl_exploration_collapse").snapshot
    lm = labelled("plateau_epochs").snapshot
    offer = Offer(
        choices={"lr": [1e-4, 1e-3], "ent_coef": [0.005, 0.02], "momentum": [0.8, 0.95]}, actions=[]
    )
    moves = offered_moves(offer, {"lr": 3e-4, "ent_coef": 0.01, "momentum": 0.9})

    def labels(d, snap):
        return sorted(m.label for m in remedy_moves(d, moves, snap))

    # a custom knob (momentum) is never offered: no table says which way it helps
    assert labels(Diagnosis.EXPLORATION_COLLAPSE, rl) == ["ent_coef up to 0.02"]
    assert labels(Diagnosis.PLATEAU, rl) == ["ent_coef up to 0.02", "lr up to 0.001"]  # stalled RL: bolder
    assert labels(Diagnosis.PLATEAU, lm) == ["lr down to 0.0001"]  # supervised plateau: calmer
    assert labels(Diagnosis.HEALTHY, rl) == []


@pytest.mark.parametrize(
    ("name", "direction"), [("imbalance_aux_dominates", "down"), ("imbalance_aux_vanishing", "up")]
)
def test_loss_weight_moves_follow_the_dominant_component(labelled, name, direction):
    sit = labelled(name)
    moves = offered_moves(sit.offer, sit.snapshot.params)
    chosen = remedy_moves(Diagnosis.LOSS_IMBALANCE, moves, sit.snapshot)
    assert chosen and {m.direction for m in chosen} == {direction}
    assert {m.param for m in chosen} == {"loss_weight.aux"}


def test_rl_answer_maps_integer_and_reward_params(labelled):
    sit = labelled("rl_unsafe_reckless")
    model = response_model(sit.snapshot, sit.policy, sit.offer)
    prop = to_proposal(
        model.model_validate_json(
            doc("unsafe_exploration", ["reward.collision_penalty up to 10", "n_epochs down to 4"], "none")
        )
    )
    assert prop.changes == {"reward.collision_penalty": 10.0, "n_epochs": 4.0}


def test_bundled_examples_are_valid_answers_and_not_suite_scenarios(scenario_dir):
    names = {p.stem for p in scenario_dir.glob("*.yaml")}
    for ex in bundled_examples():
        assert ex.name not in names
        model = response_model(ex.snapshot, ex.policy, ex.offer)
        model.model_validate_json(json.dumps(ex.answer))


def test_variants_and_messages(overfit):
    assert {"plain", "evidence", "two-stage", "few-shot", "coherent", "coherent+evidence"} <= set(VARIANTS)
    with pytest.raises(ValueError, match="unknown LLM variant"):
        LLMProposer(variant="psychic")
    plain = LLMProposer(variant="plain").messages(overfit.snapshot, overfit.policy, overfit.offer)
    assert [m["role"] for m in plain] == ["system", "user"] and "AUTOMATIC CHECK" not in plain[-1]["content"]
    ev = LLMProposer(variant="evidence").messages(overfit.snapshot, overfit.policy, overfit.offer)
    assert "AUTOMATIC CHECK (heuristic, may be wrong): overfitting" in ev[-1]["content"]
    few = LLMProposer(variant="few-shot").messages(overfit.snapshot, overfit.policy, overfit.offer)
    assert [m["role"] for m in few] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    assert few[-1] == plain[-1]


def test_building_a_proposer_loads_no_model():
    p = LLMProposer.from_settings("local:/nonexistent/model.gguf", environ={})
    assert p._client is None and p.name == "llm"
    assert load_policy("lm").llm.model is None


def brief_doc(moves: list[str] | None = None, action: str | None = "none", why: str = "w") -> str:
    out: dict[str, Any] = {}
    if moves is not None:
        out["moves"] = moves
    if action is not None:
        out["action"] = action
    return json.dumps({**out, "why": why})


def test_brief_answer_is_flat_and_takes_only_the_remedies_of_the_measured_problem(overfit):
    brief = _brief(overfit.snapshot, overfit.policy, overfit.offer, (Diagnosis.OVERFITTING, "val rose"))
    model = brief.model(overfit.snapshot, overfit.policy, overfit.offer)
    assert set(model.model_fields) == {"moves", "action", "why"}  # no diagnosis: it is the measured one
    prop = to_proposal(model.model_validate_json(brief_doc(["dropout up to 0.1"], "rollback", "gap grows")))
    assert prop.diagnosis == Diagnosis.OVERFITTING and prop.changes == {"dropout": 0.1}
    assert prop.action == Action.ROLLBACK and prop.rationale == "gap grows"
    for bad in (
        brief_doc(["lr up to 0.003"]),  # offered, but raising lr does not address overfitting
        brief_doc(["dropout up to 0.1"], "stop"),  # stop is not a remedy for overfitting
        brief_doc([], "rollback"),  # the rules found a move: the model must make one
        brief_doc(["dropout up to 0.1"], "none", "x" * (MAX_WHY + 1)),  # why is short
        brief_doc(["dropout up to 0.1"], "none") [:-1] + ', "diagnosis": "healthy"}',
    ):
        with pytest.raises(ValidationError):
            model.model_validate_json(bad)


def test_brief_answer_for_an_lr_too_low_may_raise_the_lr_and_nothing_else(labelled):
    sit = labelled("lr_too_low_steady_sgd")
    evidence = diagnose_for_offer(sit.snapshot, Thresholds.from_policy(sit.policy), sit.offer)
    assert evidence[0] == Diagnosis.LR_TOO_LOW
    brief = _brief(sit.snapshot, sit.policy, sit.offer, evidence)
    model = brief.model(sit.snapshot, sit.policy, sit.offer)
    assert brief.suggested["moves"] == ["lr up to 0.003"]
    prop = to_proposal(model.model_validate_json(brief_doc(["lr up to 0.004"], None, "steady fall")))
    assert prop.diagnosis == Diagnosis.LR_TOO_LOW and prop.changes == {"lr": 0.004}
    for bad in (brief_doc(["lr down to 0.001"]), brief_doc(["lr up to 0.003"], "stop")):
        with pytest.raises(ValidationError):
            model.model_validate_json(bad)


def test_brief_suggestion_is_the_rules_choice_and_a_valid_answer(labelled):
    asked = 0
    for name in ("overfit_small_gpt", "plateau_epochs", "divergence_loss_explodes", "imbalance_aux_dominates",
                 "rl_unsafe_reckless", "rl_converged", "overreg_heavy_dropout", "lr_too_low_steady_sgd"):
        sit = labelled(name)
        evidence = diagnose_for_offer(sit.snapshot, Thresholds.from_policy(sit.policy), sit.offer)
        brief = _brief(sit.snapshot, sit.policy, sit.offer, evidence)
        model = brief.model(sit.snapshot, sit.policy, sit.offer)
        if not has_choice(model):
            continue
        asked += 1
        chosen = to_proposal(model.model_validate_json(json.dumps({**brief.suggested, "why": "w"})))
        changes, action = remedy(evidence[0], sit.snapshot, sit.policy, sit.offer)
        assert chosen.changes == changes and chosen.action == action, name
    assert asked >= 5


def test_brief_messages_put_the_policy_first_and_the_decision_in_few_lines(labelled):
    p = LLMProposer(variant="brief")
    first, second = labelled("overfit_small_gpt"), labelled("plateau_epochs")
    a = p.messages(first.snapshot, first.policy, first.offer)
    b = p.messages(second.snapshot, second.policy, second.offer)
    assert [m["role"] for m in a] == ["system", "user"]
    # The system message is the policy alone: every decision on a run of this policy starts with it (KV cache).
    assert a[0] == b[0] and "lr: 1e-06 to 1" in a[0]["content"] and "rollback" not in a[0]["content"]
    assert "ACTIONS none | rollback" in a[1]["content"]
    lines = a[1]["content"].splitlines()
    assert lines[0].startswith("PROBLEM at step 400: overfitting: ") and lines[-1].startswith("SUGGESTED {")
    assert len(lines) <= 7 and len(a[1]["content"]) < len(LLMProposer(variant="anchored").messages(
        first.snapshot, first.policy, first.offer)[1]["content"]) / 2


class FakeWarmBackend:
    """A fake backend that only records what it is asked to warm (no model)."""

    def __init__(self) -> None:
        self.warmed: list[list[dict[str, str]]] = []

    def warm(self, messages: list[dict[str, str]]) -> None:
        self.warmed.append(messages)


class FakeClient:
    def __init__(self, backend: FakeWarmBackend) -> None:
        self.backend = backend


def test_a_skipped_decision_warms_the_model_once_per_policy(labelled):
    import threading

    healthy = labelled("healthy_epochs")
    backend = FakeWarmBackend()
    p = LLMProposer(FakeClient(backend))  # type: ignore[arg-type]
    for _ in range(3):
        result = p.propose(healthy.snapshot, healthy.policy, healthy.ctx, healthy.offer)
        assert "skipped" in result.audit and result.proposal.is_noop
    for t in threading.enumerate():
        if t.name == "atm-llm-warm":
            t.join(5)
    assert backend.warmed == [[{"role": "system", "content": policy_prompt(healthy.policy)}]]
