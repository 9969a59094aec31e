"""atm-watch as a replica: the real command with a shard from a pod's ordinal, its metrics endpoint and health file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from atm.testing import wait_for
from atm.watcher.shard import Shard, owns


def make_runs(uri: str, experiment: str, n: int) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.create_experiment(experiment)
    runs = []
    for i in range(n):
        rid = client.create_run(exp).info.run_id
        client.log_metric(rid, "train_loss", 1.0 / (i + 1), step=10)
        runs.append(rid)
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def metrics(base: str) -> set[str]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        return set(r.read().decode().splitlines())


def test_once_watches_only_the_runs_of_its_shard(mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    from atm.watcher.cli import watch_main

    runs = make_runs(mlflow_uri, "fleet", 8)
    code = watch_main(["--experiment", "fleet", "--tracking-uri", mlflow_uri, "--once", "--shard", "1/3"])
    assert code == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert listed == {r for r in runs if owns(r, Shard(1, 3))}


def test_a_shard_with_runs_of_your_own_choosing_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    from atm.watcher.cli import watch_main

    with pytest.raises(SystemExit):
        watch_main(["--run", "abc", "--shard", "0/2"])
    assert "with --run you choose the runs yourself" in capsys.readouterr().err


@pytest.mark.slow
def test_a_replica_serves_metrics_and_health_and_stops_on_sigterm(mlflow_uri: str, tmp_path: Path) -> None:
    pytest.importorskip("prometheus_client")
    runs = make_runs(mlflow_uri, "fleet", 10)
    mine = [r for r in runs if owns(r, Shard(1, 2))]
    port = free_port()
    health = tmp_path / "health"
    exe = Path(sys.executable).parent / "atm-watch"
    # As in the StatefulSet: the number of shards from ATM_SHARDS, this replica's from the pod's name.
    env = dict(os.environ, ATM_SHARDS="2", HOSTNAME="atm-watch-1")
    env.pop("ATM_SHARD", None)
    proc = subprocess.Popen(
        [str(exe), "--experiment", "fleet", "--tracking-uri", mlflow_uri, "--interval", "0.5", "--workers", "2",
         "--metrics-port", str(port), "--health-file", str(health), "--no-table"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or answers(f"{base}/readyz"), timeout=120)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        wait_for(lambda: health.exists() and health.read_text().startswith("ok"), timeout=60)
        wait_for(lambda: f"atm_runs_watched {float(len(mine))}" in metrics(base), timeout=60)
        assert answers(f"{base}/healthz")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    # The banner is a log line, on stderr like every other line of atm-watch without its table.
    said = out + err
    assert "2 workers, shard 1/2" in said and f"metrics on :{port}" in said
