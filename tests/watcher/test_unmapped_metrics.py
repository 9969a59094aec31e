"""A run whose metric names no preset maps is said at once, on the status line and in the log, with
the one policy line that maps them: it had stayed "healthy" forever."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atm.adapters.mlflow_backend import MlflowBackend
from atm.policies import load_policy
from atm.watcher.daemon import Daemon
from atm.watcher.poll import guess_key, unmapped_roles
from atm.watcher.status import log_changes
from atm.watcher.snapshot import resolve_roles


@pytest.mark.parametrize(
    ("role", "keys", "guess"),
    [
        ("val_loss", ["trn/xent", "dev/xent", "dev/acc"], "dev/xent"),
        ("train_loss", ["trn/xent", "dev/xent"], "trn/xent"),
        ("val_loss", ["valid_nll", "train_nll"], "valid_nll"),
        ("return", ["charts/episodic_return", "losses/value_loss"], "charts/episodic_return"),
        ("val_loss", ["accuracy", "lr"], None),
    ],
)
def test_a_role_is_guessed_from_the_words_of_the_logged_names(role: str, keys: list[str], guess: str | None) -> None:
    assert guess_key(role, keys) == guess


def test_only_runs_without_their_evaluation_metric_are_named() -> None:
    lm = load_policy("lm")
    assert unmapped_roles(lm, ["train_loss", "val_loss"]) == {}
    assert unmapped_roles(lm, ["train_loss", "step_time"]) == {"val_loss": None}
    assert unmapped_roles(lm, ["trn/xent", "dev/xent", "atm/lr"]) == {"val_loss": "dev/xent", "train_loss": "trn/xent"}


def _log(client: MlflowClient, rid: str, names: tuple[str, ...], steps: range) -> None:
    for step in steps:
        for name in names:
            client.log_metric(rid, name, 2.0 - 0.01 * step, step=step)


def test_an_unknown_val_metric_is_said_at_once_with_the_line_that_maps_it(
    mlflow_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The shape of a new user's script: its own metric names, two evaluations in when the daemon first reads it.
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("names")).info.run_id
    _log(client, rid, ("trn/xent", "dev/xent"), range(1, 3))
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1, on_change=log_changes())
    with caplog.at_level("INFO", logger="atm.watch"):
        daemon.tick(rid, wait=True)
    daemon.stop()
    line = "metrics: {val_loss: [dev/xent], train_loss: [trn/xent]}"
    assert daemon.status[rid].note == f"unmapped: val_loss, train_loss (policy file: extends: lm, {line})"
    status = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"run {rid}: ")]
    assert any(f"unmapped: val_loss, train_loss (policy file: extends: lm, {line})" in m for m in status)
    said = [r.getMessage() for r in caplog.records if "no metric for val_loss" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(f"in a file that starts with `extends: lm`: {line}")

    # The line, as given, maps them: the status clears.
    (tmp_path / "mine.yaml").write_text(f"extends: lm\n{line}\n")
    mine = load_policy(str(tmp_path / "mine.yaml"))
    assert {"val_loss": "dev/xent", "train_loss": "trn/xent"}.items() <= resolve_roles(mine, ["trn/xent", "dev/xent"]).items()
    fixed = Daemon(MlflowBackend(mlflow_uri), mine, interval=0.1)
    fixed.tick(rid, wait=True)
    fixed.stop()
    assert fixed.status[rid].note == ""


def test_a_run_before_its_first_evaluation_is_shown_unmapped_but_not_warned_about(
    mlflow_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("early")).info.run_id
    _log(client, rid, ("train_loss",), range(1, 5))  # its first evaluation may simply not have come yet
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    with caplog.at_level("WARNING", logger="atm.watch"):
        daemon.tick(rid, wait=True)
    daemon.stop()
    note = daemon.status[rid].note
    assert note.startswith("unmapped: val_loss: no key like val_loss logged yet (the policy reads val_loss, val/loss, eval_loss, ...)")
    assert note.endswith("if the job logs it under another name: policy file: extends: lm, metrics: {val_loss: [YOUR_METRIC]}")
    assert "no metric for val_loss" not in caplog.text
    _log(client, rid, ("val_loss",), range(4, 5))
    again = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    again.tick(rid, wait=True)
    again.stop()
    assert again.status[rid].note == ""


def test_a_return_only_rl_run_is_told_to_be_judged_by_its_return_not_to_map_a_success_rate() -> None:
    # A gymnasium task (Pendulum) under rl-ppo, whose evaluation metric is safe success: it logs none, and
    # mapping one it never logs is not the fix (a trial's user was told to, and had to guess).
    from atm.adapters.base import RunView
    from atm.watcher.poll import unmapped_status
    from atm.watcher.snapshot import missing_role_note

    rl = load_policy("rl-ppo")
    keys = ["eval/mean_reward", "rollout/ep_rew_mean", "train/entropy_loss", "train/approx_kl"]
    view = RunView("r", "", "RUNNING", {k: [(1, 0.0)] for k in keys}, 0.0, False)
    for said in (unmapped_status(rl, view), missing_role_note(rl, keys)):
        assert "limits: {eval_metric: return}" in said and "solved_return" in said and "eval/mean_reward" in said
        assert "YOUR_METRIC" not in said and "safe_success: [" not in said
    # A run that logs no return either is still told to map its evaluation metric.
    view = RunView("r", "", "RUNNING", {"train/loss": [(1, 0.0)]}, 0.0, False)
    assert "safe_success: [YOUR_METRIC]" in unmapped_status(rl, view)
