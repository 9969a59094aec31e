"""Signed messages (atm.signing): where the key comes from, and what a signature does and does not accept."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atm.adapters.base import records_from_jsonl, records_to_jsonl
from atm.schema import (
    DEFAULT_MAX_FACTOR,
    Ack,
    Action,
    Change,
    DecisionRecord,
    Diagnosis,
    LimitExceeded,
    Status,
    Update,
    in_force,
    target_value,
)
from atm.signing import (
    KeySource,
    KeyUnavailable,
    default_key_path,
    key_from_text,
    resolve_key,
    sign,
    verify,
)
from atm.testing import scenario

KEY = key_from_text("k" * 32, "test")
OTHER = key_from_text("o" * 32, "other")


def _update(**kw) -> Update:
    base = dict(run_id="run-1", seq=3, step=100, diagnosis=Diagnosis.PLATEAU, source="rules",
                changes={"lr": Change(old=1e-3, new=5e-4, max_factor=2.0, min=1e-6)}, rationale="val loss flat — halve")
    return Update(**{**base, **kw})


# --------------------------------------------------------------------------- the key


def test_atm_key_is_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATM_KEY", "  s3cret-s3cret-s3cret\n")
    key = resolve_key()
    assert key.secret == b"s3cret-s3cret-s3cret" and key.source == "ATM_KEY"
    assert "s3cret" not in repr(key)


def test_atm_key_file_holds_the_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("s3cret-s3cret-s3cret\n")
    monkeypatch.delenv("ATM_KEY")
    monkeypatch.setenv("ATM_KEY_FILE", str(path))
    key = resolve_key()
    # The same secret through a file or the variable is the same key: a k8s Secret can be mounted either way.
    assert key.key_id == key_from_text("s3cret-s3cret-s3cret", "ATM_KEY").key_id
    assert str(path) in key.source


def test_bad_settings_say_what_to_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ATM_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(KeyUnavailable, match="both ATM_KEY and ATM_KEY_FILE are set"):
        resolve_key()
    monkeypatch.delenv("ATM_KEY")
    with pytest.raises(KeyUnavailable, match=r"ATM_KEY_FILE=.*missing: cannot read"):
        resolve_key()
    monkeypatch.delenv("ATM_KEY_FILE")
    monkeypatch.setenv("ATM_KEY", "short")
    with pytest.raises(KeyUnavailable, match="5 characters; use at least 16.*secrets.token_hex"):
        resolve_key()


def test_default_key_file_is_created_once_private(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ATM_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    first = resolve_key()
    path = tmp_path / "cfg" / "atm" / "key"
    assert first.source == str(path) and path.is_file()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(path.read_text().strip()) == 64
    assert resolve_key().secret == first.secret  # the next process (a job, a watcher) finds the same key
    assert [p.name for p in path.parent.iterdir()] == ["key"]  # no temporary file left behind


def test_default_key_path_follows_xdg_and_ignores_a_relative_one(tmp_path: Path) -> None:
    assert default_key_path({"XDG_CONFIG_HOME": "/etc/xdg-cfg", "HOME": "/h"}) == Path("/etc/xdg-cfg/atm/key")
    assert default_key_path({"XDG_CONFIG_HOME": "relative", "HOME": "/h"}) == Path("/h/.config/atm/key")
    assert default_key_path({"HOME": "/h"}) == Path("/h/.config/atm/key")


def test_a_readable_key_file_is_warned_about(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("ATM_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = tmp_path / "atm" / "key"
    path.parent.mkdir()
    path.write_text("x" * 40)
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="atm.signing"):
        resolve_key()
    assert f"chmod 600 {path}" in caplog.text


def test_processes_starting_at_once_share_one_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ATM_KEY"} | {"XDG_CONFIG_HOME": str(tmp_path)}
    code = "from atm.signing import resolve_key; print(resolve_key().key_id)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(6)]
    ids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(ids) == 1 and all(p.returncode == 0 for p in procs)
    assert ids == {resolve_key({"XDG_CONFIG_HOME": str(tmp_path), "HOME": "/nonexistent"}).key_id}


def test_key_source_resolves_lazily_and_keeps_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATM_KEY", "short")
    keys = KeySource()
    assert keys.get_or_none() is None and "at least 16" in keys.problem
    monkeypatch.setenv("ATM_KEY", "long-enough-secret-now")
    assert keys.get().source == "ATM_KEY" and keys.problem == ""
    assert KeySource(KEY).get() is KEY


# --------------------------------------------------------------------------- signatures


def test_a_signed_update_checks_after_a_round_trip_through_json() -> None:
    signed = sign(_update(), KEY)
    assert signed.key_id == KEY.key_id and signed.signature
    back = Update.model_validate_json(signed.model_dump_json())
    assert verify(back, KEY)


def test_any_change_after_signing_breaks_the_signature() -> None:
    signed = sign(_update(), KEY)
    for change in ({"seq": 4}, {"run_id": "run-2"}, {"changes": {"lr": Change(old=1e-9, new=1e-3)}},
                   {"changes": {"lr": Change(old=1e-3, new=5e-4, max_factor=1e6, min=1e-6)}}, {"action": Action.STOP}):
        tampered = signed.model_copy(update=change)
        check = verify(tampered, KEY)
        assert not check and "does not match its signature" in check.reason


def test_a_wrong_key_names_both_key_ids_and_the_fix() -> None:
    check = verify(sign(_update(), OTHER), KEY, here="this job")
    assert not check
    assert f"signed with key id {OTHER.key_id}, this job has key id {KEY.key_id}" in check.reason
    assert "give both sides the same ATM_KEY" in check.reason


def test_unsigned_and_keyless_are_refused_with_a_reason() -> None:
    check = verify(_update(), KEY)
    assert not check and "update #3 is not signed" in check.reason
    check = verify(sign(_update(), KEY), None, key_problem="ATM_KEY: too short", here="this job")
    assert not check and "this job has no atm key (ATM_KEY: too short)" in check.reason


def test_a_signature_is_bound_to_its_message_type() -> None:
    ack = sign(Ack(run_id="run-1", seq=3, status="applied", applied_step=5), KEY)
    assert verify(ack, KEY)
    # The same signature on a different kind of message does not pass.
    record = DecisionRecord(run_id="run-1", seq=3, step=100, status=Status.PENDING, source="rules",
                            diagnosis=Diagnosis.PLATEAU)
    forged = record.model_copy(update={"signature": ack.signature, "key_id": ack.key_id})
    assert not verify(forged, KEY)


def test_decision_records_are_signed_in_the_log_and_check_when_read_back() -> None:
    snap = scenario("rl_exploration_collapse").snapshot()
    record = DecisionRecord(run_id="run-1", seq=1, step=10, status=Status.APPLIED, source="llm", diagnosis=Diagnosis.PLATEAU,
                            snapshot=snap, audit={"latency_s": 1.5, "nan": float("nan"), "pair": (1, 2), "text": "é"})
    back = records_from_jsonl(records_to_jsonl([record], KEY))[0]
    assert verify(back, KEY)
    # The daemon settles a record and writes its log again: the new content is signed anew.
    back.status = Status.FAILED
    assert not verify(back, KEY)
    again = records_from_jsonl(records_to_jsonl([back], KEY))[0]
    assert verify(again, KEY) and again.status == Status.FAILED
    assert not verify(records_from_jsonl(records_to_jsonl([record]))[0], KEY)  # no key: unsigned


def test_a_newer_schema_is_named_when_a_signature_does_not_match() -> None:
    signed = sign(_update(), KEY).model_copy(update={"schema_version": 2})
    assert "schema version 2" in verify(signed, KEY).reason


def test_the_signing_module_imports_nothing_of_atm() -> None:
    import ast

    import atm.signing

    tree = ast.parse(Path(atm.signing.__file__).read_text())
    names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in names if m and m.startswith("atm")}


# --------------------------------------------------------------------------- limits (atm.schema)


def test_in_force_never_amplifies_a_ratio_past_the_bound() -> None:
    # The forged message of the issue: as a ratio it multiplied lr by 1e6.
    assert in_force(1e-9, 1e-3, 1e-3) == 1e-3
    assert in_force(1e-9, 1e-3, 1e-3, max_factor=2.0) == 1e-3
    # A decided halving still follows a scheduler that moved the value.
    assert in_force(1e-3, 5e-4, 2e-4, max_factor=2.0) == pytest.approx(1e-4)
    assert in_force(1e-3, 5e-4, 2e-4) == pytest.approx(1e-4)
    # Beyond the policy's bound the move is a set-value, not a multiplication.
    assert in_force(1e-3, 4e-3, 2e-4, max_factor=2.0) == 4e-3
    # A value in force below the smallest normal float reads as 0: halving it would underflow to 0.
    assert in_force(2.0, 1.0, 5e-324) == 1.0


@settings(max_examples=3000, deadline=None)
@given(
    old=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
    new=st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
    now=st.floats(allow_nan=True, allow_infinity=True),
    bound=st.one_of(st.none(), st.floats(min_value=1.0, max_value=1e3)),
)
def test_in_force_is_new_or_a_bounded_multiple_of_now(old: float, new: float, now: float, bound: float | None) -> None:
    got = in_force(old, new, now, bound)
    limit = DEFAULT_MAX_FACTOR if bound is None else bound
    assert got == new or (now > 0 and 1 / limit * (1 - 1e-12) <= got / now <= limit * (1 + 1e-12))


def test_target_value_refuses_negative_and_non_finite() -> None:
    with pytest.raises(LimitExceeded, match="lr would be -1: lr may not be negative"):
        target_value("lr", Change(old=1e-3, new=-1.0), 1e-3)
    with pytest.raises(LimitExceeded, match="weight_decay would be"):
        target_value("weight_decay", Change(old=0.0, new=-0.1), 0.0)
    with pytest.raises(LimitExceeded, match="ent_coef would be"):
        target_value("ent_coef", Change(old=0.01, new=-0.01, min=0.0), 0.01)
    assert target_value("shift", Change(old=1.0, new=-1.0, min=-5.0), 1.0) == -1.0  # a knob that may be negative
    nan = Change.model_construct(old=1e-3, new=math.nan, max_factor=None, min=None)
    with pytest.raises(LimitExceeded, match="not a finite number"):
        target_value("lr", nan, 1e-3)
    assert target_value("lr", Change(old=1e-3, new=10.0, max_factor=2.0), 1e-3) == 10.0  # bounded by the policy, upstream


def test_change_refuses_a_bound_below_one() -> None:
    with pytest.raises(ValueError, match="max_factor"):
        Change(old=1.0, new=2.0, max_factor=0.5)
    with pytest.raises(ValueError, match="max_factor"):
        Change(old=1.0, new=2.0, max_factor=math.inf)
