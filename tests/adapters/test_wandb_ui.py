"""What the listener writes to the W&B UI: tags within W&B's 64 characters, the interventions table."""

from __future__ import annotations

from atm.adapters._wandb._ui import TAG_LIMIT, intervention_tag, merge_tags, table_row
from atm.schema import Ack, Action, Change, DecisionRecord, Diagnosis, Status, Update


def update(seq: int, **changes: tuple[float, float]) -> Update:
    return Update(run_id="r", seq=seq, step=10 * seq, diagnosis=Diagnosis.OVERFITTING, source="llm",
                  changes={k: Change(old=o, new=n) for k, (o, n) in changes.items()}, rationale="short")


def test_tags_name_the_intervention_within_the_limit() -> None:
    assert intervention_tag(update(3, lr=(0.003, 0.001))) == "atm#3 lr 0.003->0.001"
    long = update(12, **{f"reward.weight_{i}": (1.0e-5 * i + 1e-7, 2.5e-5 * i) for i in range(1, 6)})
    tag = intervention_tag(long)
    assert len(tag) == TAG_LIMIT and tag.startswith("atm#12 reward.weight_1 ") and tag.endswith("…")
    stop = Update(run_id="r", seq=4, step=1, diagnosis=Diagnosis.CONVERGED, source="rules", action=Action.STOP)
    assert intervention_tag(stop) == "atm#4 stop"


def test_merge_tags_keeps_the_users_tags_and_the_latest_three_of_ours() -> None:
    tags: tuple[str, ...] = ("baseline", "gpu")
    for seq in range(1, 6):
        tags = merge_tags(tags, f"atm#{seq} lr x")
    assert tags == ("baseline", "gpu", "atm#3 lr x", "atm#4 lr x", "atm#5 lr x")
    assert merge_tags(tags, "atm#5 lr x") == tags  # re-recording the same ack changes nothing


def test_table_row_carries_the_verdict_from_the_decision_record() -> None:
    u = update(2, lr=(0.01, 0.005), dropout=(0.0, 0.1))
    ack = Ack(run_id="r", seq=2, status="applied", applied_step=23, values={"lr": 0.005})
    rec = DecisionRecord(run_id="r", seq=2, step=20, status=Status.APPLIED, source="llm", diagnosis=Diagnosis.OVERFITTING,
                         rationale="the full rationale, longer than the message carries", reason="lr within [1e-6, 1]")
    row = table_row(u, ack, rec)
    assert row == [2, 20, 23, "lr 0.01 -> 0.005, dropout 0 -> 0.1", "", "overfitting",
                   "the full rationale, longer than the message carries", "llm", "lr within [1e-6, 1]", "applied"]
    failed = Ack(run_id="r", seq=2, status="failed", applied_step=23, error="dropout: not registered")
    assert table_row(u, failed, None)[-2:] == ["", "failed: dropout: not registered"]
