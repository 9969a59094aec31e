"""The daemon/listener contract: JSON round-trips, size limits, validation, forward compatibility."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import BaseModel, ValidationError

from atm.schema import (
    MAX_MESSAGE_RATIONALE,
    SCHEMA_VERSION,
    Ack,
    Approval,
    Action,
    Change,
    DecisionRecord,
    Diagnosis,
    Effect,
    EffectLabel,
    ListenerInfo,
    Outcome,
    Proposal,
    SeriesStats,
    Status,
    TelemetrySnapshot,
    Update,
    Verdict,
    fmt,
)
from atm.testing import scenario

#: What an MLflow tag holds on older servers; an update must always fit.
TAG_LIMIT = 5000


def _stats(key: str = "val_loss", latest: float = 1.5) -> SeriesStats:
    return SeriesStats(
        key=key, n=20, first_step=50, last_step=1000, latest=latest, ema=1.6, slope=-0.3, window_mean=1.7,
        window_std=0.1, best=1.4, best_step=450, steps_since_best=550, min=1.4, max=4.1, nonfinite=False,
        trail=[(50, 4.1), (450, 1.4), (1000, latest)],
    )


def _record() -> DecisionRecord:
    proposal = Proposal(
        diagnosis=Diagnosis.OVERFITTING, changes={"dropout": 0.1, "lr": 5e-4}, action=Action.ROLLBACK,
        rationale="val loss rises", expected_outcome="val loss falls", watch_next="val_loss",
    )
    snapshot = TelemetrySnapshot(
        run_id="run-1", run_name="gpt", step=1000, taken_at=1.0, series={"val_loss": _stats()},
        signals={"gap": 0.5, "nonfinite": False}, params={"lr": 1e-3, "dropout": 0.0},
        recent=[Effect(seq=1, applied_step=410, changes={"lr": Change(old=2e-3, new=1e-3)},
                       diagnosis=Diagnosis.PLATEAU, before_after={"val_loss": (1.6, 1.5)})],
    )
    return DecisionRecord(
        run_id="run-1", seq=7, step=1000, status=Status.APPLIED, source="llm", diagnosis=Diagnosis.OVERFITTING,
        changes={"dropout": Change(old=0.0, new=0.1), "lr": Change(old=1e-3, new=5e-4)}, action=Action.ROLLBACK,
        rationale="val loss rises", expected_outcome="val loss falls", watch_next="val_loss",
        reason="within policy", dropped={"weight_decay": "cooldown"}, proposal=proposal, snapshot=snapshot,
        decided_at=2.0, applied_step=1010, applied_at=3.0, effective_step=1010, audit={"prompt": "...", "latency_s": 4.2, "tokens": [1, 2]},
    )


EXAMPLES: list[BaseModel] = [
    _stats(),
    Effect(seq=1, applied_step=None, changes={"lr": Change(old=1.0, new=0.5)}),
    _record().snapshot,  # type: ignore[list-item]
    Change(old=1e-3, new=5e-4),
    _record().proposal,  # type: ignore[list-item]
    Proposal(diagnosis=Diagnosis.HEALTHY),
    Verdict(accepted=True, reason="ok", changes={"lr": Change(old=1.0, new=0.5)}, action=Action.STOP,
            dropped={"wd": "frozen by the policy"}),
    _record().to_update(),
    Ack(run_id="run-1", seq=7, status="applied", applied_step=1010, applied_at=3.0, values={"lr": 5e-4}),
    Ack(run_id="run-1", seq=8, status="failed", applied_step=None, applied_at=3.0, error="no knob named dropout"),
    ListenerInfo(run_id="run-1", knobs=["lr", "dropout"], values={"lr": 1e-3, "dropout": 0.0}, actions=["stop"],
                 apply_mode="auto", pid=1234, host="box", started_at=1.0, last_applied_seq=6, step=990),
    Approval(run_id="run-1", seq=7, decision="approve", by="alice@box", note="looks right", created_at=4.0),
    _record(),
    DecisionRecord(run_id="r", seq=1, step=0, status=Status.REJECTED, source="rules", diagnosis=Diagnosis.PLATEAU),
    Outcome(label=EffectLabel.HELPED, metric="val_loss", evals=3, before=1.5, projected=1.6, measured=1.4, noise=0.02,
            slope_before=0.1, slope_after=-0.2),
]


@pytest.mark.parametrize("model", EXAMPLES, ids=lambda m: type(m).__name__)
def test_json_round_trip(model: BaseModel) -> None:
    again = type(model).model_validate_json(model.model_dump_json())
    assert again == model


def test_every_schema_model_is_covered() -> None:
    import atm.schema as schema

    models = {
        name for name, obj in vars(schema).items()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == schema.__name__
        and not name.startswith("_")
    }
    assert models == {type(m).__name__ for m in EXAMPLES}


def test_snapshot_from_a_real_build_round_trips() -> None:
    snap = scenario("rl_exploration_collapse").snapshot()
    assert TelemetrySnapshot.model_validate_json(snap.model_dump_json()) == snap


def test_messages_carry_the_schema_version() -> None:
    for model in EXAMPLES:
        if "schema_version" in type(model).model_fields:
            assert json.loads(model.model_dump_json())["schema_version"] == SCHEMA_VERSION


def test_update_rationale_is_truncated() -> None:
    update = Update(run_id="r", seq=1, step=10, diagnosis=Diagnosis.PLATEAU, source="llm", rationale="x" * 5000)
    assert len(update.rationale) == MAX_MESSAGE_RATIONALE
    assert update.rationale.endswith("…")
    short = Update(run_id="r", seq=1, step=10, diagnosis=Diagnosis.PLATEAU, source="llm", rationale="y" * MAX_MESSAGE_RATIONALE)
    assert short.rationale == "y" * MAX_MESSAGE_RATIONALE


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_change_rejects_nonfinite(bad: float) -> None:
    with pytest.raises(ValidationError, match="must be finite"):
        Change(old=1.0, new=bad)
    with pytest.raises(ValidationError, match="must be finite"):
        Change(old=bad, new=1.0)


def test_to_update_carries_the_decision() -> None:
    record = _record()
    update = record.to_update()
    assert (update.run_id, update.seq, update.step) == ("run-1", 7, 1000)
    assert update.changes == record.changes
    assert update.action == Action.ROLLBACK
    assert update.diagnosis == Diagnosis.OVERFITTING
    assert update.source == "llm"
    assert update.created_at == record.decided_at


def test_update_fits_a_tag_with_eight_changes_and_a_long_rationale() -> None:
    changes = {f"reward.component_number_{i:02d}_weight": Change(old=1.2345678901234567e-5 * (i + 1), new=9.87654321e-4 / (i + 3))
               for i in range(8)}
    update = Update(
        run_id="f" * 32, seq=999_999, step=10**12, changes=changes, action=Action.ROLLBACK,
        diagnosis=Diagnosis.EXPLORATION_COLLAPSE, rationale="é" * 10_000, source="llm:openai/some-long-model-name",
    )
    text = update.model_dump_json()
    assert len(text) <= TAG_LIMIT, len(text)
    assert Update.model_validate_json(text) == update


def test_newer_schema_fields_are_ignored() -> None:
    update = json.loads(_record().to_update().model_dump_json())
    update.update(schema_version=SCHEMA_VERSION + 1, priority="high", changes={**update["changes"]})
    update["changes"]["lr"]["unit"] = "per-step"
    parsed = Update.model_validate_json(json.dumps(update))
    assert parsed.seq == 7 and parsed.schema_version == SCHEMA_VERSION + 1
    assert not hasattr(parsed, "priority")
    ack = Ack.model_validate({"run_id": "r", "seq": 1, "status": "applied", "applied_step": 3, "new_field": [1]})
    assert ack.seq == 1
    info = ListenerInfo.model_validate(
        {**json.loads(EXAMPLES[10].model_dump_json()), "gpu": "none", "schema_version": 2}
    )
    assert info.knobs == ["lr", "dropout"]


def test_proposal_forbids_unknown_fields() -> None:
    # A proposal comes from a model, not from a newer release: a stray key is a mistake to re-ask about.
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Proposal.model_validate({"diagnosis": "plateau", "chnages": {"lr": 0.1}})


def test_decision_record_summary() -> None:
    assert _record().summary() == "#7 @1000 applied overfitting dropout 0->0.1, lr 0.001->0.0005 rollback applied@1010"


@pytest.mark.parametrize(
    "x, text", [(0, "0"), (1e-3, "0.001"), (5e-4, "0.0005"), (1.23456, "1.235"), (12345.0, "1.23e+04"), (-2.5, "-2.5")]
)
def test_fmt(x: float, text: str) -> None:
    assert fmt(x) == text


def test_nonfinite_telemetry_round_trips() -> None:
    # A diverged run's snapshot holds NaN (latest value) and inf (gap ratio). A decision record
    # carrying it must read back from interventions.jsonl, or the log loses the divergence decision.
    snap = scenario("nan_loss").snapshot()
    assert math.isnan(snap.series["train_loss"].latest)
    snap.signals["gap_ratio"] = float("inf")
    again = TelemetrySnapshot.model_validate_json(snap.model_dump_json())
    assert math.isnan(again.series["train_loss"].latest)
    assert again.signals["gap_ratio"] == float("inf")
