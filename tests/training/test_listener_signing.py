"""Only the watcher can steer a job: the listener applies signed updates within their limits, and
refuses everything else with an ack that says why, without ever raising into training.

A real torch model and optimizer; the tracker side is ``atm.testing.FakeChannel``, on which a test
places messages as another client of the tracker could (real trackers: test_signed_updates_mlflow.py,
tests/adapters/test_wandb_signed.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import atm
from atm.adapters.base import MessageProblem
from atm.schema import Ack, Change, Diagnosis, Update
from atm.signing import key_from_text, resolve_key, sign
from atm.testing import FakeChannel, wait_for
from atm.training.listener import Listener, own_acks, resume_after
from atm.training.torch_hooks import optimizer_knobs

OTHER = key_from_text("someone-elses-key-000000", "other")


def make_job(lr: float = 1e-3):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, opt


def step(model, opt, n: int = 1) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()


def lr_of(opt) -> float:
    return opt.param_groups[0]["lr"]


def test_forged_updates_are_never_applied_and_acked_as_rejected(caplog: pytest.LogCaptureFixture) -> None:
    model, opt = make_job()
    ch = FakeChannel()
    with caplog.at_level("WARNING", logger="atm.listener"):
        lst = atm.listen(opt, channel=ch, poll_interval=0.01)
        try:
            ch.put(ch.update(1, lr=(1e-3, 10.0)))                       # forged lr=10
            ch.put(ch.update(2, lr=(1e-3, -1.0)))                       # forged lr=-1
            ch.put(ch.update(3, lr=(1e-9, 1e-3)))                       # the ratio trick: x1e6
            ch.put(sign(ch.update(4, lr=(1e-3, 5e-4)), OTHER))          # another key
            ch.put(sign(ch.update(5, lr=(1e-3, 5e-4)), resolve_key()).model_copy(update={"step": 11}))  # altered
            wait_for(lambda: set(ch.acks) >= {1, 2, 3, 4, 5})
            step(model, opt, 3)
            assert lr_of(opt) == 1e-3 and lst.applied == []
            assert all(ch.acks[s].status == "rejected" for s in range(1, 6))
            assert "not signed" in ch.acks[1].error
            assert f"signed with key id {OTHER.key_id}, this job has key id {resolve_key().key_id}" in ch.acks[4].error
            assert "give both sides the same ATM_KEY" in ch.acks[4].error
            assert "does not match its signature" in ch.acks[5].error
            # Refused once: the same message on later polls is not logged or acked again.
            n_logged = caplog.text.count("update #1 is not signed")
            step(model, opt, 2)
            wait_for(lambda: True)
            assert n_logged == 1
            # The watcher's own update, after all that, lands.
            ch.publish(6, lr=(1e-3, 5e-4))
            wait_for(lambda: lst._pending)
            step(model, opt)
            assert lr_of(opt) == pytest.approx(5e-4) and [u.seq for u in lst.applied] == [6]
            wait_for(lambda: 6 in ch.acks)
            assert ch.acks[6].status == "applied"
        finally:
            lst.close()


def test_a_forged_update_far_ahead_does_not_hide_the_watchers_next_ones() -> None:
    model, opt = make_job()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        ch.put(ch.update(50, lr=(1e-3, 10.0)))
        wait_for(lambda: 50 in ch.acks)
        ch.publish(1, lr=(1e-3, 5e-4))
        wait_for(lambda: lst._pending)
        step(model, opt)
        assert [u.seq for u in lst.applied] == [1] and lr_of(opt) == pytest.approx(5e-4)
    finally:
        lst.close()


def test_the_watchers_update_replacing_a_forged_one_under_the_same_number_is_applied() -> None:
    model, opt = make_job()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        ch.put(ch.update(1, lr=(1e-3, 10.0)))
        wait_for(lambda: 1 in ch.acks)
        ch.publish(1, lr=(1e-3, 5e-4))
        wait_for(lambda: lst._pending)
        step(model, opt)
        assert lr_of(opt) == pytest.approx(5e-4)
        wait_for(lambda: ch.acks[1].status == "applied")
    finally:
        lst.close()


def test_signed_updates_past_the_limits_are_rejected_whole() -> None:
    model, opt = make_job()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        # Signed, yet negative: a bug on the watcher's side is still not applied (nor its other change).
        ch.publish(1, lr=(1e-3, -1.0), weight_decay=(0.01, 0.02))
        wait_for(lambda: lst._pending)
        step(model, opt)
        assert lr_of(opt) == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.01
        wait_for(lambda: 1 in ch.acks)
        assert ch.acks[1].status == "rejected" and "lr would be -1: lr may not be negative" in ch.acks[1].error
        # Dealt with for good: the next update applies, and #1 never comes back.
        ch.publish(2, lr=(1e-3, 5e-4))
        wait_for(lambda: lst._pending)
        step(model, opt, 2)
        assert [u.seq for u in lst.applied] == [2] and lr_of(opt) == pytest.approx(5e-4)
    finally:
        lst.close()


def test_a_signed_ratio_from_near_zero_multiplies_by_at_most_its_bound() -> None:
    model, opt = make_job(lr=2e-4)
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        update = ch.update(1)
        update.changes["lr"] = Change(old=1e-9, new=1e-3, max_factor=2.0, min=1e-6)
        ch.put(sign(update, resolve_key()))
        wait_for(lambda: lst._pending)
        step(model, opt)
        # Not 2e-4 x 1e6: a move past the policy's factor is the value it names.
        assert lr_of(opt) == pytest.approx(1e-3)
    finally:
        lst.close()


def test_a_wrong_key_on_the_job_is_said_plainly_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    model, opt = make_job()
    ch = FakeChannel()
    with caplog.at_level("WARNING", logger="atm.listener"):
        lst = atm.listen(opt, channel=ch, poll_interval=0.01, key="the-job-has-another-key-entirely")
        try:
            ch.publish(1, lr=(1e-3, 5e-4))
            wait_for(lambda: 1 in ch.acks)
            step(model, opt, 5)
            assert lr_of(opt) == 1e-3
            ack = ch.acks[1]
            job_id = key_from_text("the-job-has-another-key-entirely", "x").key_id
            assert ack.status == "rejected"
            assert f"signed with key id {resolve_key().key_id}, this job has key id {job_id}" in ack.error
            assert "give both sides the same ATM_KEY" in ack.error
            assert caplog.text.count("update #1 is signed with key id") == 1
        finally:
            lst.close()


def test_a_job_without_a_usable_key_rejects_everything_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    model, opt = make_job()
    ch = FakeChannel(key=resolve_key())
    monkeypatch.setenv("ATM_KEY", "short")
    with caplog.at_level("WARNING", logger="atm.listener"):
        lst = atm.listen(opt, channel=ch, poll_interval=0.01)
        try:
            ch.publish(1, lr=(1e-3, 5e-4))
            wait_for(lambda: 1 in ch.acks)
            step(model, opt, 2)
            assert lr_of(opt) == 1e-3 and ch.acks[1].status == "rejected"
            assert "this job has no atm key (ATM_KEY: the atm key is 5 characters" in ch.acks[1].error
            assert "every update will be rejected" in caplog.text
        finally:
            lst.close()


def test_a_copy_of_another_runs_update_is_refused() -> None:
    model, opt = make_job()
    ch = FakeChannel()
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        ch.put(sign(ch.update(1, lr=(1e-3, 5e-4)).model_copy(update={"run_id": "run-2"}), resolve_key()))
        wait_for(lambda: 1 in ch.acks)
        step(model, opt)
        assert lr_of(opt) == 1e-3 and "signed for run run-2, and this job is run run-1" in ch.acks[1].error
    finally:
        lst.close()


def test_malformed_updates_are_reported_once_and_acked_when_numbered(caplog: pytest.LogCaptureFixture) -> None:
    model, opt = make_job()
    ch = FakeChannel()
    ch.problems = [
        MessageProblem("tag atm.update.000002", "not a valid update (Invalid JSON); ignored", "update", 2),
        MessageProblem("tag atm.update.x", "is not an atm update name; ignored", "update", None),
    ]
    with caplog.at_level("WARNING", logger="atm.listener"):
        lst = atm.listen(opt, channel=ch, poll_interval=0.01)
        try:
            wait_for(lambda: 2 in ch.acks)
            step(model, opt, 3)
            assert ch.acks[2].status == "rejected" and "tag atm.update.000002: not a valid update" in ch.acks[2].error
            assert caplog.text.count("atm.update.000002") == 1 and caplog.text.count("tag atm.update.x") == 1
        finally:
            lst.close()


def test_a_forged_ack_far_ahead_does_not_make_a_resumed_job_skip_updates() -> None:
    model, opt = make_job()
    ch = FakeChannel()
    ch.publish(1, lr=(1e-3, 5e-4))
    ch.ack(Ack(run_id="run-1", seq=1, status="applied", applied_step=5, values={"lr": 5e-4}))
    ch.acks[50] = Ack(run_id="run-1", seq=50, status="applied", applied_step=9)     # written in, unsigned
    ch.acks[2] = sign(Ack(run_id="run-1", seq=2, status="applied", applied_step=9), OTHER)  # another key's
    ch.publish(2, weight_decay=(0.01, 0.02))
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        wait_for(lambda: lst._pending)
        step(model, opt)
        assert [u.seq for u in lst.applied] == [2] and opt.param_groups[0]["weight_decay"] == pytest.approx(0.02)
        assert lr_of(opt) == 1e-3  # #1 was applied by the earlier process: not again
    finally:
        lst.close()


def test_resume_counts_only_the_jobs_own_acks_of_genuine_updates() -> None:
    key = resolve_key()
    ch = FakeChannel()
    genuine = {s: sign(ch.update(s, lr=(1.0, 0.5)), key) for s in (1, 2, 3)}
    forged = {7: ch.update(7, lr=(1.0, 0.5))}
    acks = {
        1: sign(Ack(run_id="run-1", seq=1, status="applied", applied_step=1), key),
        3: sign(Ack(run_id="run-1", seq=3, status="rejected", applied_step=1, error="lr would be -1"), key),
        7: sign(Ack(run_id="run-1", seq=7, status="rejected", applied_step=None, error="not signed"), key),
        9: Ack(run_id="run-1", seq=9, status="applied", applied_step=1),
    }
    assert resume_after(own_acks(acks, key, "run-1"), {**genuine, **forged}, key) == 3
    assert resume_after(own_acks(acks, key, "run-1"), forged, key) == 1   # #3's update not read: its rejection does not count
    assert resume_after(own_acks(acks, None, "run-1"), genuine, None) == 0  # without the key nothing is trusted


# --------------------------------------------------------------------------- the property

_values = st.one_of(
    st.floats(min_value=-10, max_value=10, allow_nan=False),
    st.sampled_from([0.0, 1e-12, 1e-9, -1e-9, 1e-3, 10.0, 1e300, -1e300, math.nan, math.inf, -math.inf]),
)
_change = st.builds(
    lambda old, new, f, m: Change.model_construct(old=old, new=new, max_factor=f, min=m),
    _values, _values,
    st.one_of(st.none(), st.sampled_from([0.5, 1.0, 2.0, 5.0, math.inf, math.nan])),
    st.one_of(st.none(), st.sampled_from([0.0, 1e-6, -1.0, math.nan])),
)
_KNOBS = ["lr", "weight_decay", "momentum", "dropout"]


def _job():
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=0.01)
    box = {"dropout": 0.1}
    knobs = {**optimizer_knobs(opt), "dropout": atm.attr(type("Cfg", (), box)(), "dropout")}
    return opt, knobs


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    changes=st.dictionaries(st.sampled_from(_KNOBS), _change, min_size=1, max_size=3),
    signing=st.sampled_from(["valid", "none", "other", "tampered", "other-run"]),
    seq=st.integers(min_value=1, max_value=10**6),
)
def test_no_update_that_fails_its_signature_or_limits_ever_changes_a_value(changes, signing, seq) -> None:
    key = resolve_key()
    _opt, knobs = _job()
    ch = FakeChannel(key=key)
    lst = Listener(ch, knobs, apply="manual", key=key)
    before = lst.current_values()
    update = Update.model_construct(
        run_id="run-1", seq=seq, step=1, changes=changes, action=None, diagnosis=Diagnosis.PLATEAU, rationale="",
        source="rules", created_at=1.0, signature=None, key_id=None, schema_version=1,
    )
    if signing == "valid":
        update = sign(update, key)
    elif signing == "other":
        update = sign(update, OTHER)
    elif signing == "tampered":
        update = sign(update, key).model_copy(update={"step": 2})
    elif signing == "other-run":
        update = sign(update.model_copy(update={"run_id": "run-2"}), key)
    ch.put(update)
    lst._cycle()
    lst.apply_pending()
    lst._flush()
    after = lst.current_values()
    ack = ch.acks.get(seq)
    assert ack is not None, "every update is acknowledged"
    if signing != "valid":
        assert after == before and ack.status == "rejected"
        return
    if ack.status == "rejected":
        assert after == before
        return
    for name, value in after.items():
        assert math.isfinite(value)
        if name in ("lr", "weight_decay"):
            assert value >= 0
        if value != before[name]:
            c = changes[name]
            bound = c.max_factor if c.max_factor is not None else 10.0
            # Either the value the watcher named, or the value in force times a factor within the bound.
            assert value == pytest.approx(c.new) or 1 / bound - 1e-9 <= value / before[name] <= bound + 1e-9


def test_a_signed_ack_copied_from_another_run_does_not_make_a_resumed_job_skip_updates() -> None:
    # Every job of one key signs its acks alike: another run's ack #50, copied onto this run, checks.
    model, opt = make_job()
    ch = FakeChannel()
    ch.acks[50] = sign(Ack(run_id="run-2", seq=50, status="applied", applied_step=9), resolve_key())
    ch.publish(1, lr=(1e-3, 5e-4))
    lst = atm.listen(opt, channel=ch, poll_interval=0.01)
    try:
        wait_for(lambda: lst._pending)
        step(model, opt)
        assert [u.seq for u in lst.applied] == [1] and lr_of(opt) == pytest.approx(5e-4)
    finally:
        lst.close()
    # A W&B job names its run by its bare id where the watcher's update names entity/project/id.
    key = resolve_key()
    acks = {1: sign(Ack(run_id="team/proj/run-1", seq=1, status="applied", applied_step=1), key),
            2: sign(Ack(run_id="run-1", seq=2, status="applied", applied_step=1), key),
            50: sign(Ack(run_id="run-2", seq=50, status="applied", applied_step=1), key)}
    assert resume_after(own_acks(acks, key, "run-1"), {}, key) == 2
