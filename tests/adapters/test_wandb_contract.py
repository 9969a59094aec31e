"""The backend contract suite (test_backend_contract.py) run against W&B offline runs.

The job side is a real process holding real ``wandb`` runs (``wandb.init(mode="offline")``) and a
real :class:`WandbChannel` on each, driven over a pipe: W&B lets only the live process write its
run, so the channel must live there, exactly as the listener does. This module re-collects every
contract test that takes the ``harness`` fixture, with the W&B harness below.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import test_backend_contract as contract  # the sibling module; pytest puts this folder on sys.path
from atm.adapters._wandb._local import find_run_dir, RunLayout
from atm.adapters._wandb._txlog import LogTail, RunLog
from atm.adapters.wandb_backend import WandbBackend
from atm.schema import Ack, ListenerInfo, Update

JOB_SERVER = r'''
import json, sys
import wandb
from atm.adapters.wandb_backend import WandbChannel
from atm.schema import Ack, ListenerInfo
runs, channels = {}, {}
out = sys.stdout
print(json.dumps({"ready": True}), file=out, flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op, reply = cmd["op"], {}
    try:
        if op == "new":
            run = wandb.init(mode="offline", dir=cmd["dir"], project="contract", reinit="create_new",
                             settings=wandb.Settings(console="off"))
            runs[run.id] = run
            channels[run.id] = WandbChannel(run.settings.sync_dir, run=run, run_id=run.id)
            reply = {"id": run.id}
        elif op == "log":
            runs[cmd["id"]].log({cmd["key"]: cmd["value"]}, step=cmd["step"], commit=True)
        elif op == "finish":
            channels.pop(cmd["id"]).close()
            runs.pop(cmd["id"]).finish()
        elif op == "channel":
            ch, args = channels[cmd["id"]], cmd["args"]
            method = cmd["method"]
            if method == "announce":
                ch.announce(ListenerInfo.model_validate(args[0]))
            elif method == "fetch":
                reply = {"result": [u.model_dump(mode="json") for u in ch.fetch(args[0])]}
            elif method == "acked":
                reply = {"result": [a.model_dump(mode="json") for a in ch.acked().values()]}
            elif method == "ack":
                ch.ack(Ack.model_validate(args[0]))
            elif method == "log_values":
                ch.log_values(args[0], args[1])
                runs[cmd["id"]].log({}, commit=True)  # the job logs its next row, committing atm's values
    except Exception as exc:
        reply = {"error": repr(exc)}
    print(json.dumps(reply), file=out, flush=True)
for run_id, run in runs.items():
    channels[run_id].close()
    run.finish()
'''


class JobServer:
    """A process holding live W&B runs, answering one JSON command per line."""

    def __init__(self, root: Path):
        script = root / "job_server.py"
        script.write_text(JOB_SERVER)
        env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL="0.05")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(root / "job_server.log", "w"), text=True, env=env)
        self.lock = threading.Lock()
        assert json.loads(self._readline()) == {"ready": True}

    def _readline(self) -> str:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise RuntimeError(f"the job server exited ({self.proc.poll()})")
        return line

    def call(self, **cmd: Any) -> dict[str, Any]:
        with self.lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            reply = json.loads(self._readline())
        if "error" in reply:
            raise RuntimeError(f"job server: {reply['error']}")
        return reply

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class WandbHarness:
    """Plays the job for the contract suite: real offline runs in the job server, this process as the daemon."""

    missing_run_id = "nosuchrun"
    experiment = "contract"  # the project the job server makes runs in

    def __init__(self, server: JobServer, root: Path):
        self.server = server
        self.root = root
        self._views: dict[str, tuple[LogTail, RunLog]] = {}

    def new_run(self) -> str:
        rid = self.server.call(op="new", dir=str(self.root))["id"]
        self._wait(rid, lambda state: state.run_id == rid)
        return rid

    def log(self, run_id: str, key: str, value: float, step: int) -> None:
        self.server.call(op="log", id=run_id, key=key, value=value, step=step)
        self._wait(run_id, lambda state: any(s == step for s, _ in state.history.get(key, [])))

    def finish(self, run_id: str) -> None:
        self.server.call(op="finish", id=run_id)
        self._wait(run_id, lambda state: state.exit_code is not None)

    def backend(self) -> Any:
        return WandbBackend(self.root / "wandb")

    def channel(self, run_id: str) -> Any:
        return JobChannel(self, run_id)

    def _wait(self, run_id: str, done: Callable[[RunLog], bool], timeout: float = 30) -> None:
        """Until the job's writes are in its transaction log (it flushes every 50 ms here)."""
        deadline = time.time() + timeout
        while True:
            if run_id not in self._views:
                run_dir = find_run_dir(run_id, self.root / "wandb")
                log = RunLayout(run_dir).transaction_log() if run_dir else None
                if log is not None:
                    self._views[run_id] = (LogTail(log), RunLog())
            if run_id in self._views:
                tail, state = self._views[run_id]
                state.apply(tail.read())
                if done(state):
                    return
            if time.time() > deadline:
                raise AssertionError(f"run {run_id}: the job's write did not reach the transaction log in {timeout} s")
            time.sleep(0.02)


class JobChannel:
    """The contract's Channel, served by the real WandbChannel inside the job process."""

    def __init__(self, harness: WandbHarness, run_id: str):
        self.harness = harness
        self.run_id = run_id

    def _call(self, method: str, *args: Any) -> Any:
        return self.harness.server.call(op="channel", id=self.run_id, method=method, args=list(args)).get("result")

    def announce(self, info: ListenerInfo) -> None:
        self._call("announce", info.model_dump(mode="json"))

    def fetch(self, after_seq: int) -> list[Update]:
        return [Update.model_validate(u) for u in self._call("fetch", after_seq)]

    def acked(self) -> dict[int, Ack]:
        return {a.seq: a for a in (Ack.model_validate(x) for x in self._call("acked"))}

    def ack(self, ack: Ack) -> None:
        self._call("ack", ack.model_dump(mode="json"))

    def log_values(self, values: dict[str, float], step: int | None) -> None:
        self._call("log_values", values, step)
        self.harness._wait(self.run_id, lambda s: all(f"atm/{k}" in s.history for k in values))

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def job_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobServer]:
    server = JobServer(tmp_path_factory.mktemp("wandb-job"))
    yield server
    server.close()


@pytest.fixture
def harness(job_server: JobServer, tmp_path: Path) -> WandbHarness:
    return WandbHarness(job_server, tmp_path)


# Every contract test that runs on a harness, collected here again with the W&B one.
for _name, _test in vars(contract).items():
    if _name.startswith("test_") and "harness" in inspect.signature(_test).parameters:
        globals()[_name] = _test
