"""An off-policy SB3 job (SAC, its entropy coefficient learned: ``lr`` is its one knob) sent a signed
update that names knobs it does not have, on a real MLflow sqlite store.

The update is refused knob by knob in plain words (the job has no such knob, and which knobs it has),
acknowledged as failed, said once in the job's log, and training goes on; a knob it has, in the same
update, is applied.
"""

from __future__ import annotations

import logging
import time

import mlflow
import pytest
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import atm
from atm.adapters.base import parse_messages
from atm.adapters.mlflow_backend import MlflowBackend
from atm.schema import Change, DecisionRecord, Diagnosis, Status


def _record(run_id: str, seq: int, **changes: tuple[float, float]) -> DecisionRecord:
    return DecisionRecord(run_id=run_id, seq=seq, step=100 * seq, status=Status.PENDING, source="rules",
                          diagnosis=Diagnosis.PLATEAU,
                          changes={k: Change(old=o, new=n, max_factor=5.0, min=0.0) for k, (o, n) in changes.items()})


class UntilApplied(BaseCallback):
    """Ends learning once the atm callback's listener has applied ``n`` updates (or after 60 s)."""

    def __init__(self, atm_callback: BaseCallback, n: int) -> None:
        super().__init__()
        self.atm_callback, self.n, self.deadline = atm_callback, n, time.time() + 60

    def _on_step(self) -> bool:
        listener = self.atm_callback.listener
        done = listener is not None and len(listener.applied) >= self.n
        return not done and time.time() < self.deadline


def test_sac_refuses_knobs_it_lacks_and_applies_the_one_it_has(tmp_path, monkeypatch, caplog) -> None:
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    backend = MlflowBackend(uri)
    with mlflow.start_run() as run:
        rid = run.info.run_id
        # Published before the job starts: the listener takes them in order when it attaches.
        backend.publish(_record(rid, 1, n_epochs=(10, 5), clip_range=(0.2, 0.1)))
        backend.publish(_record(rid, 2, n_epochs=(10, 5), lr=(3e-4, 6e-4)))
        model = SAC("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1, seed=0), learning_starts=50,
                    buffer_size=2_000, seed=0, device="cpu")
        assert model.ent_coef == "auto"
        listen = atm.sb3_callback(poll_interval=0.05)
        with caplog.at_level(logging.WARNING, logger="atm.listener"):
            model.learn(5_000, callback=[listen, UntilApplied(listen, 2)])  # raises nothing into training
    assert model.num_timesteps < 5_000, "the updates never reached the job"

    acks = parse_messages(mlflow.MlflowClient(uri).get_run(rid).data.tags).acks
    assert acks[1].status == "failed" and acks[1].values == {}
    assert acks[1].error == ("n_epochs: this job has no such knob, so it was not changed (its knobs: lr); "
                             "clip_range: this job has no such knob, so it was not changed (its knobs: lr)")
    assert acks[2].status == "applied" and acks[2].values == pytest.approx({"lr": 6e-4})
    assert "n_epochs: this job has no such knob" in acks[2].error
    assert model.lr_schedule(1.0) == pytest.approx(6e-4)
    assert [g["lr"] for g in model.actor.optimizer.param_groups] == pytest.approx([6e-4])
    # Said once per update in the job's log.
    said = [r.getMessage() for r in caplog.records if "no such knob" in r.getMessage()]
    assert [m.split(":")[0] for m in said] == ["atm update #1", "atm update #2"]
