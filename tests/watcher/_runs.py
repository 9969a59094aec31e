"""A run the daemon tests share: MLflow metrics that overfit after step 80, with a listener announced."""

from __future__ import annotations

import time

from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.schema import Change, DecisionRecord, Diagnosis, ListenerInfo, Status


def overfitting_run(uri: str, upto: int = 20, experiment: str = "daemon") -> str:
    """A run whose val loss turns up after step 80 while train loss keeps falling, with a listener attached."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    rid = client.create_run(exp.experiment_id if exp is not None else client.create_experiment(experiment)).info.run_id
    log_evals(client, rid, 1, upto)
    MlflowChannel(rid, uri).announce(ListenerInfo(
        run_id=rid, knobs=["lr", "dropout", "weight_decay"], values={"lr": 2e-3, "dropout": 0.0, "weight_decay": 0.0},
        actions=["stop"], apply_mode="auto", pid=1, started_at=0.0))
    return rid


def log_evals(client, rid: str, start: int, end: int, every_s: float | None = None) -> None:  # noqa: ANN001 - an MlflowClient
    """Evaluations ``start``..``end`` (step 10 i); logged as fast as the store takes them, or stamped
    ``every_s`` seconds apart from now on the job's clock (a run's pace, as the daemon reads it)."""
    now_ms = int(time.time() * 1000)
    for i in range(start, end + 1):
        step = i * 10
        ts = None if every_s is None else now_ms + int((i - start) * every_s * 1000)
        client.log_metric(rid, "train_loss", 3.0 / i, timestamp=ts, step=step)
        client.log_metric(rid, "val_loss", 2.0 - 0.1 * min(i, 8) + 0.06 * max(0, i - 8), timestamp=ts, step=step)


def publish_first_change(backend: MlflowBackend, rid: str, step: int, lr: tuple[float, float]) -> None:
    """Decision #1 on ``rid`` at ``step``, an lr change (old, new), published and logged as the daemon does."""
    record = DecisionRecord(run_id=rid, seq=1, step=step, status=Status.PENDING, source="rules",
                            diagnosis=Diagnosis.PLATEAU, changes={"lr": Change(old=lr[0], new=lr[1])})
    backend.reserve_seq(rid, 1)
    backend.publish(record)
    backend.write_log(rid, [record])
