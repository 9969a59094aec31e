"""The example scripts under examples/, run on a tiny configuration against a real MLflow sqlite store.

Each test creates the run first and publishes an update on it through the real MLflow backend (what
``atm-watch`` would publish), then runs the example as its own process on that run (``MLFLOW_RUN_ID``),
and checks in the store what the job did: its acknowledgement and the values it logged.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atm.adapters.mlflow_backend import MlflowBackend
from atm.schema import Ack, Status
from atm.testing import make_record

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def prepare_run(uri: str, experiment: str, **changes: tuple[float, float]) -> str:
    """A run with update #1 published on it, before the job starts (the listener resumes from the run)."""
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    MlflowBackend(tracking_uri=uri).publish(
        make_record(1, step=0, status=Status.PENDING, changes=changes, run_id=run_id)
    )
    return run_id


def run_example(name: str, uri: str, run_id: str, *args: str, tmp_path: Path) -> str:
    env = dict(os.environ, MLFLOW_RUN_ID=run_id, PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--tracking-uri", uri, *args],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"run_id {run_id}" in out.stdout
    return out.stdout + out.stderr


def ack_of(uri: str, run_id: str, seq: int) -> Ack:
    tags = MlflowClient(uri).get_run(run_id).data.tags
    return Ack.model_validate_json(tags[f"atm.ack.{seq:06d}"])


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_custom_ppo_loop_takes_a_change_on_its_recipe_and_keeps_it(tmp_path: Path, mlflow_uri: str) -> None:
    run_id = prepare_run(mlflow_uri, "custom-ppo-test", lr=(3e-4, 1.5e-4), **{"reward.collision_penalty": (1.0, 5.0)})
    run_example("custom_ppo_loop.py", mlflow_uri, run_id, "--experiment", "custom-ppo-test", "--updates", "25",
                "--n-steps", "128", "--eval-every", "10", "--eval-episodes", "1", tmp_path=tmp_path)
    ack = ack_of(mlflow_uri, run_id, 1)
    assert ack.status == "applied", ack
    assert ack.values == {"lr": pytest.approx(1.5e-4), "reward.collision_penalty": pytest.approx(5.0)}
    at = ack.applied_step
    assert at is not None and at <= 22, f"applied at update {at} of 25: too late to see it hold"
    # What the Adam optimizer used each update: the recipe's value, from the update it was applied at on,
    # although the trainer re-applies its recipe to the optimizer and rebinds self.recipe every update.
    actor_lr = history(mlflow_uri, run_id, "charts/actor_lr")
    assert [s for s, _ in actor_lr] == list(range(1, 26))
    assert all(v == pytest.approx(3e-4) for s, v in actor_lr if s < at)
    assert all(v == pytest.approx(1.5e-4) for s, v in actor_lr if s >= at)
    penalty = history(mlflow_uri, run_id, "charts/collision_penalty")
    assert all(v == pytest.approx(5.0 if s >= at else 1.0) for s, v in penalty)
    ent = [v for _, v in history(mlflow_uri, run_id, "charts/ent_coef")]
    assert all(b < a for a, b in zip(ent, ent[1:]))  # the trainer's own schedule went on meanwhile
    # Metrics on the update axis, an evaluation every 10 updates, the listener's knobs on the run.
    assert [s for s, _ in history(mlflow_uri, run_id, "eval/safe_success")] == [10, 20]
    tags = MlflowClient(mlflow_uri).get_run(run_id).data.tags
    for knob in ("lr", "critic_lr", "ent_coef", "clip_range", "n_epochs", "reward.collision_penalty"):
        assert f'"{knob}"' in tags["atm.listener"]


@pytest.mark.slow
def test_custom_ppo_loop_managed_by_the_daemon_gets_an_lr_change_that_holds(tmp_path: Path, mlflow_uri: str) -> None:
    # The whole loop: atm-watch with the rules and the example's policy, on a recipe that stalls (actor lr
    # 1e-5: no evaluation episode is held to the time limit). The stall remedy raises the lr; it must reach
    # the recipe, and from it the Adam optimizer, at the update it was applied at and stay until the next.
    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("custom-ppo-daemon")).info.run_id
    daemon = subprocess.Popen(
        [sys.executable, "-m", "atm.watcher.cli", "watch", "--backend", "mlflow", "--run", run_id,
         "--tracking-uri", mlflow_uri, "--policy", str(EXAMPLES / "custom_ppo_policy.yaml"), "--proposer", "rules",
         "--interval", "0.5", "--no-table"],
        stdout=open(tmp_path / "daemon.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        run_example("custom_ppo_loop.py", mlflow_uri, run_id, "--experiment", "custom-ppo-daemon", "--updates", "60",
                    "--n-steps", "256", "--eval-every", "2", "--eval-episodes", "1", "--actor-lr", "1e-5",
                    tmp_path=tmp_path)
        assert daemon.wait(120) == 0, (tmp_path / "daemon.log").read_text()[-3000:]  # it ends with the run
    finally:
        if daemon.poll() is None:
            daemon.kill()
    out = subprocess.run(
        [sys.executable, "-m", "atm.watcher.cli", "history", "--backend", "mlflow", "--run", run_id,
         "--tracking-uri", mlflow_uri, "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lr_changes = [h for h in json.loads(out.stdout) if h["status"] == "applied" and "lr" in h["changes"]]
    assert lr_changes, (tmp_path / "daemon.log").read_text()[-3000:]
    first, at = lr_changes[0], lr_changes[0]["applied_step"]
    until = lr_changes[1]["applied_step"] if len(lr_changes) > 1 else 61
    assert first["changes"]["lr"]["new"] > 1e-5  # the stall remedy: bolder updates
    actor_lr = dict(history(mlflow_uri, run_id, "charts/actor_lr"))
    assert until - at >= 2, lr_changes
    assert all(actor_lr[s] == pytest.approx(1e-5) for s in range(1, at))
    assert all(actor_lr[s] == pytest.approx(first["applied_values"]["lr"]) for s in range(at, until)), (at, actor_lr)


def test_the_custom_ppo_policy_extends_the_preset_and_names_every_knob_of_the_example() -> None:
    from atm.policies import load_policy

    policy = load_policy(EXAMPLES / "custom_ppo_policy.yaml")
    assert policy.extends == "rl-ppo" and policy.limits.warmup.steps == 0
    assert set(policy.params) == {"lr", "critic_lr", "ent_coef", "clip_range", "n_epochs",
                                  "reward.collision_penalty", "reward.progress_scale"}


@pytest.mark.slow
def test_torch_mlflow_example_takes_an_lr_cut_through_its_warm_up_schedule(tmp_path: Path, mlflow_uri: str) -> None:
    # The cut arrives during the LambdaLR warm-up: it halves the schedule, so the lr after the warm-up
    # is half the recipe's 3e-3, not 3e-3 again.
    run_id = prepare_run(mlflow_uri, "torch-mlflow-test", lr=(3e-4, 1.5e-4))
    run_example("torch_mlflow.py", mlflow_uri, run_id, "--experiment", "torch-mlflow-test", "--epochs", "20",
                tmp_path=tmp_path)
    ack = ack_of(mlflow_uri, run_id, 1)
    assert ack.status == "applied", ack
    at = ack.applied_step
    assert at is not None and at <= 15, f"applied at epoch {at} of 20"
    lr = dict(history(mlflow_uri, run_id, "lr"))
    assert lr[20] == pytest.approx(1.5e-3)
    assert [s for s, _ in history(mlflow_uri, run_id, "val_loss")] == list(range(1, 21))


@pytest.mark.slow
def test_lightning_example_takes_an_lr_cut_through_its_cosine_schedule(
    tmp_path: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("lightning")
    import runpy

    import torch

    run_id = prepare_run(mlflow_uri, "lightning-mlflow-test", lr=(3e-3, 1.5e-3))
    # In this process: importing Lightning takes most of a new process's time, and MLFlowLogger keeps no
    # global MLflow state (the other examples use MLflow's fluent API, so they run in their own process).
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(EXAMPLES / "lightning_mlflow.py"))["main"](
            ["--tracking-uri", mlflow_uri, "--experiment", "lightning-mlflow-test", "--epochs", "15"]
        )
    finally:
        torch.set_num_threads(threads)
    assert f"run_id {run_id}" in capsys.readouterr().out
    ack = ack_of(mlflow_uri, run_id, 1)
    assert ack.status == "applied", ack
    at = ack.applied_step
    total = 15 * 4  # 64 samples in batches of 16
    assert at is not None and at <= total - 20, f"applied at step {at} of {total}"
    lr = history(mlflow_uri, run_id, "lr-AdamW")
    lr0, eta = 3e-3, 3e-3 / 20
    cosine = {s: eta + (lr0 - eta) * (1 + math.cos(math.pi * s / total)) / 2 for s in range(total + 1)}
    # Before the cut the schedule's own values, after it the same share of them: the cosine (and its floor)
    # was scaled. The share is the ack's value over the schedule's at that step (about half: a cut decided
    # on 3e-3 sets 1.5e-3 while the lr in force is within 1% of 3e-3).
    share = ack.values["lr"] / cosine[at]
    assert share == pytest.approx(0.5, rel=0.01)
    assert all(v == pytest.approx(cosine[s], rel=1e-4) for s, v in lr if s < at)
    assert all(v == pytest.approx(cosine[s] * share, rel=1e-4) for s, v in lr if s > at + 1), (at, lr)
    assert len([s for s, _ in lr if s > at + 1]) >= 30
    assert "val_loss" in MlflowClient(mlflow_uri).get_run(run_id).data.metrics


@pytest.mark.slow
def test_sb3_example_takes_an_entropy_bonus_and_a_clip_range_between_rollouts(tmp_path: Path, mlflow_uri: str) -> None:
    run_id = prepare_run(mlflow_uri, "sb3-mlflow-test", ent_coef=(0.0, 0.01), clip_range=(0.2, 0.1))
    run_example("sb3_mlflow.py", mlflow_uri, run_id, "--experiment", "sb3-mlflow-test", "--timesteps", "8192",
                "--eval-every", "2048", tmp_path=tmp_path)
    ack = ack_of(mlflow_uri, run_id, 1)
    assert ack.status == "applied", ack
    assert ack.values == {"ent_coef": pytest.approx(0.01), "clip_range": pytest.approx(0.1)}
    at = ack.applied_step
    assert at is not None and at <= 8192 - 2048, f"applied at timestep {at} of 8192"
    # SB3's own rows, sent to the run by the example's output format: the clip range each update used.
    clip = history(mlflow_uri, run_id, "train/clip_range")
    assert all(v == pytest.approx(0.2 if s < at else 0.1) for s, v in clip), (at, clip)
    assert any(s >= at for s, _ in clip)
    assert history(mlflow_uri, run_id, "atm/ent_coef")[-1][1] == pytest.approx(0.01)
    assert history(mlflow_uri, run_id, "eval/mean_reward")


@pytest.mark.slow
def test_hf_trainer_example_takes_an_lr_cut_through_its_linear_schedule(tmp_path: Path, mlflow_uri: str) -> None:
    pytest.importorskip("transformers")
    run_id = prepare_run(mlflow_uri, "hf-trainer-test", lr=(1e-3, 5e-4))
    steps = 60
    run_example("hf_trainer_mlflow.py", mlflow_uri, run_id, "--experiment", "hf-trainer-test", "--steps", str(steps),
                "--eval-every", "20", tmp_path=tmp_path)
    ack = ack_of(mlflow_uri, run_id, 1)
    assert ack.status == "applied", ack
    at = ack.applied_step
    assert at is not None and at <= steps - 20, f"applied at step {at} of {steps}"
    linear = {s: 1e-3 * (steps - s) / steps for s in range(steps + 1)}
    # What the Trainer itself logged at step s: the lr that step ran with, its schedule's value after s - 1
    # scheduler steps. From the cut on, the same share of the schedule: it was scaled, not undone.
    lr = history(mlflow_uri, run_id, "learning_rate")
    shares = [v / linear[s - 1] for s, v in lr if s - 1 > at]
    assert len(shares) >= 5 and shares[0] == pytest.approx(0.5, rel=0.02), (at, lr)
    assert shares == pytest.approx([shares[0]] * len(shares), rel=1e-4), (at, lr)
    assert all(v == pytest.approx(linear[s - 1], rel=1e-4) for s, v in lr if s - 1 < at), (at, lr)
    assert history(mlflow_uri, run_id, "eval_loss")
