"""``atm.hf_callback()`` in a real ``transformers.Trainer``: the Trainer's own (accelerate-wrapped)
optimizer and scheduler are controlled, a change lands before the next optimizer step and is not
undone by the schedule, dropout is a knob, and a stop ends training.

The tracker side is the in-memory ``FakeChannel`` for the listener's logic; one test runs with the
Trainer's own MLflow reporting and a real sqlite store, as a user's job would.
"""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import atm  # noqa: E402
from atm.schema import Action  # noqa: E402
from atm.testing import FakeChannel, wait_for  # noqa: E402

V, T = 32, 16


def tiny_model(dropout: float = 0.0):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=T, n_embd=16, n_layer=1, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )
    return transformers.GPT2LMHeadModel(cfg)


def rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T), generator=g)
    return [{"input_ids": r, "labels": r} for r in x]


class Probe(transformers.TrainerCallback):
    """Records, at every step's end, the lr the optimizer stepped with and the model's dropout."""

    def __init__(self) -> None:
        self.lr: dict[int, float] = {}
        self.dropout: dict[int, float] = {}
        self.on_step: dict[int, object] = {}

    def on_step_end(self, args, state, control, optimizer=None, model=None, **kw):
        self.lr[state.global_step] = optimizer.param_groups[0]["lr"]
        self.dropout[state.global_step] = model.transformer.drop.p
        hook = self.on_step.get(state.global_step)
        if hook is not None:
            hook()


def trainer(tmp_path, callbacks, *, steps: int = 40, scheduler: str = "linear", report_to=None,
            weight_decay: float = 0.01):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8,
        learning_rate=1e-3, weight_decay=weight_decay, lr_scheduler_type=scheduler, logging_steps=5,
        eval_strategy="no", save_strategy="no", report_to=report_to or [], use_cpu=True, disable_tqdm=True,
    )
    return transformers.Trainer(model=tiny_model(0.1), args=args, train_dataset=rows(32, 1), callbacks=callbacks)


def test_lr_change_scales_the_trainers_schedule_and_dropout_is_a_knob(tmp_path):
    channel = FakeChannel()
    probe = Probe()
    atm_cb = atm.hf_callback(channel=channel, poll_interval=0.01)
    tr = trainer(tmp_path, [atm_cb, probe])
    # Published after step 10, halving the lr the schedule has reached; applied before the next step.
    def publish() -> None:
        channel.publish(1, lr=(probe.lr[10], probe.lr[10] / 2), dropout=(0.1, 0.3))
        wait_for(lambda: atm_cb.listener._pending)

    probe.on_step[10] = publish
    tr.train()

    assert channel.acks[1].status == "applied"
    applied = channel.acks[1].applied_step
    assert applied is not None and applied >= 10
    # Linear decay from 1e-3 over 40 steps (the lr recorded at a step's end is the next step's). After
    # the change the lr is half what the unmanaged schedule gives at every later step: the schedule's
    # base was scaled, so its next step did not reset the lr.
    unmanaged = lambda s: 1e-3 * (40 - s) / 40  # noqa: E731
    ratios = {s: lr / unmanaged(s) for s, lr in probe.lr.items() if s < 40}
    assert all(r == pytest.approx(1.0) for s, r in ratios.items() if s < applied)
    assert all(r == pytest.approx(0.5) for s, r in ratios.items() if s > applied)
    assert probe.dropout[applied + 1] == 0.3 and probe.dropout[applied - 1] == 0.1
    # The Trainer's accelerate wrapper was seen through: the knobs are the real optimizer's.
    names = set(channel.infos[-1].knobs)
    assert {"lr", "weight_decay", "beta1", "beta2", "dropout"} <= names


def test_a_weight_decay_change_leaves_the_trainers_no_decay_group_alone(tmp_path):
    # The Trainer's default weight_decay=0 puts both of its groups at 0; its second holds the biases and
    # LayerNorm weights, which it never decays. A change from 0 reached them too.
    channel = FakeChannel()
    probe = Probe()
    atm_cb = atm.hf_callback(channel=channel, poll_interval=0.01)
    tr = trainer(tmp_path, [atm_cb, probe], weight_decay=0.0)
    seen: dict[str, list[float]] = {}

    def publish() -> None:
        channel.publish(1, weight_decay=(0.0, 0.05))
        wait_for(lambda: atm_cb.listener._pending)

    def record() -> None:
        seen["wd"] = [g["weight_decay"] for g in tr.optimizer.param_groups]

    probe.on_step[10] = publish
    probe.on_step[20] = record
    tr.train()
    assert channel.acks[1].status == "applied"
    groups = tr.optimizer.param_groups
    assert len(groups) == 2 and all(p.ndim <= 1 for p in groups[1]["params"])
    assert seen["wd"] == [0.05, 0.0]


def test_stop_ends_training_and_the_update_is_applied_once(tmp_path):
    channel = FakeChannel()
    probe = Probe()
    tr = trainer(tmp_path, [atm.hf_callback(channel=channel, poll_interval=0.01), probe], steps=200)
    channel.publish(1, action=Action.STOP)
    tr.train()
    assert tr.state.global_step < 200
    assert list(channel.acks) == [1] and channel.acks[1].status == "applied"


@pytest.mark.slow
def test_attaches_to_the_run_the_trainer_reports_to(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "hf")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tr = trainer(tmp_path, [atm.hf_callback(poll_interval=0.05)], steps=20, report_to=["mlflow"])
    tr.train()
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hf").experiment_id])
    # The listener found the run MLflowCallback started, announced its knobs there and logged their values.
    assert "lr" in run.data.tags["atm.listener"] and "dropout" in run.data.tags["atm.listener"]
    assert {"loss", "atm/lr", "atm/dropout"} <= set(run.data.metrics)
    assert os.environ.get("MLFLOW_RUN_ID") in (None, run.info.run_id)
