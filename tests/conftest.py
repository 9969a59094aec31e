"""Shared fixtures: real MLflow stores (sqlite under a temp dir) and a real `mlflow server` on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(autouse=True)
def _isolated_environment():
    """Undo environment variables a test's libraries set (MLflow exports MLFLOW_EXPERIMENT_ID and
    MLFLOW_RUN_ID for child processes), so one test's run never leaks into the next test's jobs."""
    saved = dict(os.environ)
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        # A library that called mlflow.set_tracking_uri (Lightning's MLFlowLogger does) leaves it set for
        # the whole process, over MLFLOW_TRACKING_URI: a later test's listener then talked to the old store.
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    os.environ.update(saved)


#: The key every test's watcher and listener share (jobs started as subprocesses inherit it).
TEST_KEY = "atm-test-key-0123456789abcdef"


@pytest.fixture(autouse=True, scope="session")
def _atm_key(tmp_path_factory: pytest.TempPathFactory):
    """Every test signs and checks with ``TEST_KEY``, and a per-user key file, if a test asks for
    one, lands in a temporary config folder: no test reads or writes the real ~/.config/atm/key.
    Session-wide, so that processes started by module- and session-scoped fixtures (job servers,
    daemons) have it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATM_KEY", TEST_KEY)
        mp.delenv("ATM_KEY_FILE", raising=False)
        mp.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
        yield


@pytest.fixture(scope="session")
def scenario_dir() -> Path:
    """The labelled scenarios that `atm eval --scenarios tests/scenarios` scores."""
    return Path(__file__).resolve().parent / "scenarios"


@pytest.fixture(scope="session")
def labelled(scenario_dir: Path):
    """``labelled("overfit_small_gpt")``: the decision situation of one labelled scenario."""
    from atm.watcher.evaluate import load_scenario, situation

    return lambda name: situation(load_scenario(scenario_dir / f"{name}.yaml"))


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store with MLflow's tables created (the migrations take seconds); tests get copies."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path: Path, _mlflow_template: Path) -> str:
    """A fresh sqlite tracking store, tables already created (so two processes can open it at once)."""
    import shutil

    path = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template, path)
    return f"sqlite:///{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real `mlflow server` subprocess on 127.0.0.1; yields its http:// URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    db = f"sqlite:///{root / 'server.db'}"
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=db).search_experiments()
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", db, "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not answer within 120 s")
    yield uri
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
