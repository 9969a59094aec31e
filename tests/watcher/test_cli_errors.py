"""Errors a new user meets in the command line, each with the fix in its words,
and the options `--help` documents with their defaults."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from atm.watcher.cli import main, watch_parser
from atm.watcher.locate import server_down

from tests.conftest import free_port


def _run_with_metrics(uri: str, experiment: str = "errs") -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    rid = client.create_run(exp.experiment_id if exp else client.create_experiment(experiment)).info.run_id
    for step in range(1, 4):
        client.log_metric(rid, "train_loss", 2.0 - 0.1 * step, step=step)
        client.log_metric(rid, "val_loss", 2.1 - 0.1 * step, step=step)
    return rid


def _offline_wandb_run(folder: Path, run_id: str = "myrun0001") -> Path:
    """A W&B offline run folder as wandb 0.31 starts it: the transaction log's header, nothing logged yet."""
    from atm.adapters._wandb._txlog import FILE_HEADER

    run_dir = folder / f"offline-run-20260101_120000-{run_id}"
    (run_dir / "files").mkdir(parents=True)
    (run_dir / f"run-{run_id}.wandb").write_bytes(FILE_HEADER)
    return run_dir


def test_a_run_id_cut_to_the_12_characters_tables_show_is_answered_with_the_whole_id(
    mlflow_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rid = _run_with_metrics(mlflow_uri)
    assert main(["history", "--backend", "mlflow", "--run", rid[:12], "--tracking-uri", mlflow_uri]) == 1
    err = capsys.readouterr().err
    assert f"it is the start of run {rid}: pass the whole id, --run {rid}" in err
    # Without --backend too: the store holds it, cut short, so that is the answer (not "look elsewhere").
    assert main(["history", "--run", rid[:12], "--tracking-uri", mlflow_uri]) == 1
    assert f"--run {rid}" in capsys.readouterr().err


def test_a_run_id_that_starts_no_run_says_where_to_look(mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    _run_with_metrics(mlflow_uri)
    assert main(["history", "--backend", "mlflow", "--run", "0" * 32, "--tracking-uri", mlflow_uri]) == 1
    err = capsys.readouterr().err
    assert "check the id" in err and "--tracking-uri (or MLFLOW_TRACKING_URI)" in err


def test_history_without_backend_finds_an_mlflow_run_through_the_environment(
    mlflow_uri: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = _run_with_metrics(mlflow_uri)
    monkeypatch.delenv("ATM_BACKEND", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    assert main(["history", "--run", rid]) == 0
    assert f"no interventions on run {rid}" in capsys.readouterr().out


def test_history_without_backend_finds_a_wandb_offline_run_or_names_the_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATM_BACKEND", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")  # no such store
    _offline_wandb_run(tmp_path / "wandb")
    assert main(["history", "--run", "myrun0001"]) == 0  # ./wandb, W&B's default folder
    assert "no interventions on run myrun0001" in capsys.readouterr().out
    assert not (tmp_path / "none.db").exists()  # looking did not create a store

    assert main(["history", "--run", "otherrun"]) == 1
    err = capsys.readouterr().err
    assert "run otherrun was not found, and --backend was not given" in err
    assert "mlflow: no MLflow store at" in err and "wandb: no W&B run 'otherrun'" in err
    assert "--backend mlflow --tracking-uri URI" in err and "--backend wandb --wandb-dir DIR" in err


def test_a_wandb_dir_that_does_not_exist_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "wandbb"
    with pytest.raises(SystemExit, match=r"--wandb-dir .*wandbb: no such folder .*offline-run-\* folders"):
        main(["history", "--backend", "wandb", "--run", "abc", "--wandb-dir", str(missing)])


def test_a_watcher_started_with_wait_before_the_job_waits_for_its_wandb_folder(tmp_path: Path) -> None:
    # The README's pattern, the watcher first: the job's wandb.init has not made ./wandb yet.
    from atm.watcher.cli import watch_main

    missing = tmp_path / "wandb"
    assert watch_main(["--backend", "wandb", "--run", "abc", "--wandb-dir", str(missing), "--policy", "rl-ppo",
                       "--wait", "0.5", "--interval", "0.1"]) == 1
    with pytest.raises(SystemExit, match="no such folder"):
        watch_main(["--backend", "wandb", "--run", "abc", "--wandb-dir", str(missing), "--policy", "rl-ppo"])


def test_a_dead_tracking_server_is_said_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    assert main(["history", "--backend", "mlflow", "--run", "a" * 32, "--tracking-uri", dead]) == 1
    assert time.monotonic() - started < 5  # MLflow's client alone retries for ~17 s
    err = capsys.readouterr().err
    assert f"the MLflow server at {dead} does not answer" in err and "check --tracking-uri" in err


def test_a_server_that_never_answers_is_told_from_a_live_one(mlflow_server: str) -> None:
    assert server_down(mlflow_server) == ""
    with socket.socket() as mute:  # accepts connections (the kernel's backlog), never answers
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        uri = f"http://127.0.0.1:{mute.getsockname()[1]}"
        started = time.monotonic()
        assert server_down(uri, timeout=0.5) == f"the MLflow server at {uri} does not answer (no answer within 0.5 s)"
        assert time.monotonic() - started < 3


@pytest.mark.slow
def test_atm_watch_says_a_dead_server_at_once_and_keeps_watching() -> None:
    import subprocess
    import sys

    dead = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "atm.watcher.cli", "watch", "--run", "a" * 32, "--tracking-uri",
                             dead, "--no-table"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        started = time.monotonic()
        line = proc.stderr.readline()  # type: ignore[union-attr]
        assert f"the MLflow server at {dead} does not answer" in line and "retrying in the background" in line
        assert time.monotonic() - started < 15  # the interpreter's start and imports, then 3 s at most
        time.sleep(1)
        assert proc.poll() is None  # still watching: it retries until the server answers
    finally:
        proc.terminate()
        proc.wait(10)


def test_wait_reads_as_progress_not_as_an_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from atm.adapters.wandb_backend import WandbBackend
    from atm.policies import load_policy
    from atm.testing import wait_for
    from atm.watcher.daemon import Daemon
    from atm.watcher.status import log_changes

    daemon = Daemon(WandbBackend(tmp_path / "wandb"), load_policy("lm"), interval=0.05, wait_for_run=30,
                    on_change=log_changes())
    watcher = threading.Thread(target=daemon.watch, args=(["myrun0001"],), daemon=True)
    caplog.set_level("INFO", logger="atm.watch")
    watcher.start()
    try:
        wait_for(lambda: daemon.status.get("myrun0001") is not None and daemon.status["myrun0001"].state == "waiting")
        _offline_wandb_run(tmp_path / "wandb")
        wait_for(lambda: daemon.status["myrun0001"].state == "no listener", timeout=10)
    finally:
        daemon.stop()
        watcher.join(timeout=10)
    out = caplog.text
    status = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run myrun0001: waiting")]
    assert status[0].startswith("run myrun0001: waiting, the run is not started yet; looking for it up to")
    assert "error" not in out and "not found" not in out and "no W&B run" not in out


def test_help_documents_the_proposer_and_explain_experiment_with_their_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert "default: rules" in " ".join(watch_parser().format_help().split())
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--experiment EXPERIMENT explain every RUNNING run" in text and "(default: lm)" in text


def test_explain_experiment_explains_each_running_run(mlflow_uri: str, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = _run_with_metrics(mlflow_uri), _run_with_metrics(mlflow_uri)
    assert main(["explain", "--backend", "mlflow", "--experiment", "errs", "--tracking-uri", mlflow_uri]) == 0
    out = capsys.readouterr().out
    assert f"=== run {first} ===" in out and f"=== run {second} ===" in out
    assert out.count("no listener has attached") == 2


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    # `atm policy schema | head -1`: the pipe closes while atm writes. Python's default was two
    # tracebacks (the write, then the flush at exit).
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import sys; from atm.watcher.cli import main; sys.exit(main())",
                             "policy", "schema"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before atm has written anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
