"""A real `mlflow server` (sqlite-backed, on loopback) with 50 live runs, managed by one daemon with 4 poll workers."""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections import Counter

import pytest

from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.policies import load_policy
from atm.schema import ListenerInfo
from atm.testing import wait_for
from atm.watcher.daemon import Daemon
from atm.watcher.service import ErrorKind, Service

RUNS = 50
WORKERS = 4
#: Runs with a listener and an overfitting curve: the daemon decides on them while it polls the rest.
MANAGED = 5


class CountingService(Service):
    """The real metrics service, also counting polls per run and keeping every error kind seen."""

    def __init__(self) -> None:
        super().__init__()
        self.polls: Counter[str] = Counter()
        self.errors: list[tuple[str, ErrorKind]] = []
        self.lags: list[float] = []
        self._count_lock = threading.Lock()

    def poll_finished(self, run_id: str, seconds: float, error: ErrorKind | None = None) -> None:
        super().poll_finished(run_id, seconds, error)
        with self._count_lock:
            self.polls[run_id] += 1
            if error is not None:
                self.errors.append((run_id, error))

    def decided(self, lag_s: float | None) -> None:
        super().decided(lag_s)
        if lag_s is not None:
            self.lags.append(lag_s)


def log_points(client, rid: str, start: int, end: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = []
    for i in range(start, end + 1):
        metrics.append(Metric("train_loss", 3.0 / i, ts, i * 10))
        metrics.append(Metric("val_loss", 2.0 - 0.1 * min(i, 8) + 0.06 * max(0, i - 8), ts, i * 10))
    client.log_batch(rid, metrics=metrics)


@pytest.mark.slow
@pytest.mark.server
def test_four_workers_poll_fifty_live_runs_on_a_real_server_without_errors(mlflow_server: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    experiment = f"pool-{uuid.uuid4().hex[:8]}"
    exp_id = client.create_experiment(experiment)
    runs = []
    for n in range(RUNS):
        rid = client.create_run(exp_id).info.run_id
        log_points(client, rid, 1, 20)
        runs.append(rid)
    for rid in runs[:MANAGED]:
        MlflowChannel(rid, mlflow_server).announce(ListenerInfo(
            run_id=rid, knobs=["lr", "dropout", "weight_decay"], values={"lr": 2e-3, "dropout": 0.0, "weight_decay": 0.0},
            actions=["stop"], apply_mode="auto", pid=1, started_at=time.time()))

    service = CountingService()
    port = service.serve(0, host="127.0.0.1")
    daemon = Daemon(MlflowBackend(mlflow_server), load_policy("lm"), interval=1.0, workers=WORKERS, hooks=service)
    watcher = threading.Thread(target=daemon.watch, kwargs={"experiment": experiment}, daemon=True)
    watcher.start()
    try:
        wait_for(lambda: len(service.polls) == RUNS, timeout=300)
        # The jobs go on logging while the daemon watches.
        for step in range(21, 24):
            for rid in runs:
                log_points(client, rid, step, step)
        floor = min(service.polls.values())
        wait_for(lambda: min(service.polls[r] for r in runs) >= floor + 3, timeout=300)
        wait_for(lambda: all(daemon.status[r].decisions >= 1 for r in runs[:MANAGED]), timeout=300)
        threads = [t for t in threading.enumerate() if t.name.startswith("atm-poll-")]
        assert len(threads) == WORKERS
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            metrics = set(r.read().decode().splitlines())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
            assert r.status == 200
    finally:
        daemon.stop()
        watcher.join(timeout=60)
        service.close()
    assert service.errors == []
    assert f"atm_runs_watched {float(RUNS)}" in metrics
    assert all(f'atm_errors_total{{kind="{k.value}"}} 0.0' in metrics for k in ErrorKind)
    assert all(daemon.status[r].step == 230 for r in runs)  # every run read up to its newest point
    assert len(service.lags) >= MANAGED and all(lag >= 0 for lag in service.lags)
