"""The watcher's side of signing against real jobs: a torch job holding another key, a job refusing an
update, ``atm-watch`` stepping back from a run another watcher manages, and approval on a W&B
offline run given with ``atm approve``.

MLflow jobs train in this process (a small nn.Linear with AdamW, real optimizer steps, the real
listener); the daemon is the real :class:`Daemon` or the ``atm-watch`` command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import atm
from atm.adapters.base import parse_messages
from atm.adapters.mlflow_backend import MlflowBackend
from atm.policies import load_policy
from atm.schema import Change, DecisionRecord, Diagnosis, Status
from atm.signing import key_from_text, resolve_key
from atm.watcher import cli
from atm.watcher.daemon import Daemon


class Job:
    """A real training loop on an MLflow run: each ``step()`` is one AdamW step; every 10 steps it logs
    an evaluation of a run that starts to overfit (val loss turns up after the 8th)."""

    def __init__(self, run_id: str, client, **listen: object):
        torch.manual_seed(0)
        self.rid, self.client = run_id, client
        self.model = nn.Linear(4, 1)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        self.steps = 0
        self.lrs: list[float] = []
        self.listener = atm.listen(self.opt, run_id=run_id, backend="mlflow", poll_interval=0.05, **listen)

    def step(self) -> None:
        self.opt.zero_grad()
        self.model(torch.randn(16, 4)).pow(2).mean().backward()
        self.opt.step()
        self.lrs.append(self.opt.param_groups[0]["lr"])
        self.steps += 1
        if self.steps % 10 == 0:
            i = self.steps // 10
            self.client.log_metric(self.rid, "train_loss", 3.0 / i, step=self.steps)
            self.client.log_metric(self.rid, "val_loss", 2.0 - 0.1 * min(i, 8) + 0.06 * max(0, i - 8), step=self.steps)

    def train_until(self, cond: Callable[[], object], timeout: float = 60.0, what: str = "") -> None:
        deadline = time.time() + timeout
        while not cond():
            if time.time() > deadline:
                raise AssertionError(f"timed out: {what or cond}")
            self.step()
            time.sleep(0.005)

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]


def _run(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.create_run(client.create_experiment(name)).info.run_id


def test_a_job_holding_another_key_is_shown_plainly_and_trains_on(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    client = MlflowClient(mlflow_uri)
    rid = _run(mlflow_uri, "wrong-key")
    job_key = key_from_text("the-job-was-given-another-key", "x")
    job = Job(rid, client, key=job_key.secret.decode())
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    try:
        with caplog.at_level("WARNING", logger="atm.watch"):
            job.train_until(lambda: daemon.tick(rid, wait=True).records, what="the watcher's first decision")
            job.train_until(lambda: daemon.tick(rid).alert, what="the job's rejection, as the watcher sees it")
            for _ in range(30):
                job.step()
                daemon.tick(rid)
    finally:
        job.listener.close()
        daemon.stop()
    s = daemon.status[rid]
    assert s.state == "key mismatch"
    assert (f"the job acknowledged update #1 with another atm key than this watcher's ({resolve_key().key_id} from "
            "ATM_KEY), so it refuses every update: give the job and the watcher the same ATM_KEY") in s.error
    assert caplog.text.count("the job acknowledged update #1 with another atm key") == 1
    assert job.lr == 1e-3 and not job.listener.applied  # nothing applied, training went on
    assert daemon._states[rid].records[0].status == Status.PENDING


def _forged_next_update_with_a_torch_job(uri: str, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    from mlflow.tracking import MlflowClient

    from atm.adapters.base import update_key
    from atm.schema import Update

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    rid = _run(uri, f"forged-next-{time.time_ns()}")
    job = Job(rid, client)
    daemon = Daemon(MlflowBackend(uri), load_policy("lm"), interval=0.1)

    def records() -> list[DecisionRecord]:
        return daemon.tick(rid, wait=True).records

    try:
        with caplog.at_level("WARNING", logger="atm.watch"):
            job.train_until(lambda: [r.status for r in records()] == [Status.APPLIED], what="#1 applied")
            # At the watcher's next number, as another client of the tracker could write it.
            client.set_tag(rid, update_key(2), Update(run_id=rid, seq=2, step=job.steps, diagnosis=Diagnosis.PLATEAU,
                                                      source="rules", changes={"lr": Change(old=1e-3, new=10.0)})
                           .model_dump_json())
            job.train_until(lambda: any(r.seq == 3 and r.status == Status.APPLIED for r in records()),
                            timeout=120, what="the watcher's own next update, #3, applied")
    finally:
        job.listener.close()
        daemon.stop()
    assert max(job.lrs) < 1.0 and [u.seq for u in job.listener.applied] == [1, 3]
    assert [r.seq for r in daemon._states[rid].records] == [1, 3] and not daemon.status[rid].gave_up
    said = [r.getMessage() for r in caplog.records if r.name == "atm.watch"]
    assert sum("update #2 is not signed" in m for m in said) == 1
    # The job refused #2 and acknowledged that, signed: an ack for a number the watcher never published.
    refused = [m for m in said if "the job refused update #2" in m]
    assert len(refused) == 1 and "which this watcher did not publish" in refused[0]
    assert "nothing was applied" in refused[0] and not any("ack #2 answers no update" in m for m in said)
    again = Daemon(MlflowBackend(uri), load_policy("lm"), interval=0.1)
    assert [r.seq for r in again.tick(rid, wait=True).records] == [1, 3]
    again.stop()


def test_a_forged_next_update_never_reaches_a_torch_job_and_the_watcher_goes_on(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    _forged_next_update_with_a_torch_job(mlflow_uri, monkeypatch, caplog)


@pytest.mark.server
@pytest.mark.slow
def test_a_forged_next_update_never_reaches_a_torch_job_through_an_mlflow_server(
    mlflow_server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    _forged_next_update_with_a_torch_job(mlflow_server, monkeypatch, caplog)


def test_an_update_the_job_refuses_is_recorded_rejected_with_the_jobs_reason(
    mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    client = MlflowClient(mlflow_uri)
    rid = _run(mlflow_uri, "refused")
    job = Job(rid, client)
    daemon = Daemon(MlflowBackend(mlflow_uri), load_policy("lm"), interval=0.1)
    try:
        job.train_until(lambda: "atm.listener" in client.get_run(rid).data.tags, what="the listener")
        # Signed with the key, but past the listener's own limit: it never sets a negative lr.
        backend = MlflowBackend(mlflow_uri)
        backend.reserve_seq(rid, 1)
        backend.publish(DecisionRecord(run_id=rid, seq=1, step=0, status=Status.PENDING, source="rules",
                                       diagnosis=Diagnosis.PLATEAU, changes={"lr": Change(old=1e-3, new=-1.0)}))
        job.train_until(lambda: daemon.tick(rid).records and daemon._states[rid].records[0].status != Status.PENDING,
                        what="the job's rejection")
    finally:
        job.listener.close()
        daemon.stop()
    rec = daemon._states[rid].records[0]
    assert rec.status == Status.REJECTED and "the job refused it: " in rec.reason and "negative" in rec.reason
    assert job.lr == 1e-3
    capsys.readouterr()
    assert cli.main(["history", "--backend", "mlflow", "--run", rid, "--tracking-uri", mlflow_uri, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["status"] == "rejected"


def test_atm_watch_exits_non_zero_when_another_watcher_manages_the_run(mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    rid = _run(mlflow_uri, "two-watchers")
    client.log_metric(rid, "val_loss", 1.0, step=10)
    out = open(tmp_path / "watch.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "atm.watcher.cli", "watch", "--backend", "mlflow", "--run", rid, "--tracking-uri",
         mlflow_uri, "--interval", "0.2", "--no-table"],
        stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.time() + 180
        while "no listener" not in (tmp_path / "watch.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.1)
        # Another watcher holding the same key publishes an update on the run.
        other = MlflowBackend(mlflow_uri)
        other.reserve_seq(rid, 1)
        other.publish(DecisionRecord(run_id=rid, seq=1, step=10, status=Status.PENDING, source="rules",
                                     diagnosis=Diagnosis.PLATEAU, changes={"lr": Change(old=1e-3, new=5e-4)}))
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    text = (tmp_path / "watch.log").read_text()
    assert rc == 1, text
    assert f"key id {resolve_key().key_id} from ATM_KEY" in text  # the banner names the key
    assert f"ERROR atm.watch: run {rid}: stopped managing it: another atm-watch is managing this run (update #1" in text


def test_a_forged_update_does_not_make_atm_watch_exit(mlflow_uri: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from atm.adapters.base import update_key
    from atm.schema import Update

    client = MlflowClient(mlflow_uri)
    rid = _run(mlflow_uri, "forged-watch")
    client.log_metric(rid, "val_loss", 1.0, step=10)
    out = open(tmp_path / "watch.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "atm.watcher.cli", "watch", "--backend", "mlflow", "--run", rid, "--tracking-uri",
         mlflow_uri, "--interval", "0.2", "--no-table"],
        stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        deadline = time.time() + 180
        while "no listener" not in (tmp_path / "watch.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.1)
        client.set_tag(rid, update_key(1), Update(run_id=rid, seq=1, step=10, diagnosis=Diagnosis.PLATEAU,
                                                  source="rules", changes={"lr": Change(old=1e-3, new=10.0)})
                       .model_dump_json())
        while "update #1 is not signed" not in (tmp_path / "watch.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "watch.log").read_text()
            time.sleep(0.1)
        time.sleep(1.0)
        assert proc.poll() is None, (tmp_path / "watch.log").read_text()  # still watching
        client.set_terminated(rid)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
        out.close()
    text = (tmp_path / "watch.log").read_text()
    assert rc == 0, text
    assert "1 message not taken" in text and "another atm-watch" not in text
    assert 1 in parse_messages(client.get_run(rid).data.tags).updates  # on the run, never taken as the watcher's
    assert MlflowBackend(mlflow_uri).poll(rid).updates == {}


# --------------------------------------------------------------------------- W&B: approval by `atm approve`


WANDB_JOB = r'''
import json, sys, time
import torch, torch.nn as nn, wandb, atm
out_dir, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0); torch.set_num_threads(1)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 1))
opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
run = wandb.init(mode="offline", dir=out_dir, project="atm-approval")
open(out_dir + "/run_id", "w").write(run.id)
listener = atm.listen(opt, knobs={"dropout": atm.dropout(model)}, poll_interval=0.1)
trace = []
for step in range(1, steps + 1):
    opt.zero_grad(); model(torch.randn(16, 4)).pow(2).mean().backward(); opt.step()
    trace.append({"step": step, "lr": opt.param_groups[0]["lr"], "dropout": float(model[2].p)})
    if step % 10 == 0:
        i = step // 10
        run.log({"train_loss": 3.0 / i, "val_loss": 2.0 - 0.1 * min(i, 8) + 0.06 * max(0, i - 8)}, step=step)
    time.sleep(0.04)
listener.close()
run.finish()
json.dump({"trace": trace, "applied": [u.seq for u in listener.applied]}, open(out_dir + "/trace.json", "w"))
'''


@pytest.mark.slow
def test_a_wandb_decision_held_for_approval_reaches_the_job_once_approved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    script = tmp_path / "job.py"
    script.write_text(WANDB_JOB)
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL="1")
    job = subprocess.Popen([sys.executable, str(script), str(tmp_path), "1500"], env=env,
                           stdout=open(tmp_path / "job.log", "w"), stderr=subprocess.STDOUT)
    wandb_dir = str(tmp_path / "wandb")
    daemon = None
    try:
        deadline = time.time() + 120
        while not ((tmp_path / "run_id").exists() and (tmp_path / "run_id").read_text()):
            assert job.poll() is None and time.time() < deadline, (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.1)
        rid = (tmp_path / "run_id").read_text()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "atm.watcher.cli", "watch", "--backend", "wandb", "--run", rid, "--wandb-dir",
             wandb_dir, "--policy", "lm", "--interval", "0.3", "--no-table", "--approve"],
            stdout=open(tmp_path / "daemon.log", "w"), stderr=subprocess.STDOUT,
        )

        def held() -> list[dict]:
            capsys.readouterr()
            assert cli.main(["history", "--backend", "wandb", "--run", rid, "--wandb-dir", wandb_dir, "--json"]) == 0
            return [r for r in json.loads(capsys.readouterr().out) if r["status"] == "awaiting-approval"]

        while not (waiting := held()):
            assert job.poll() is None and time.time() < deadline, (tmp_path / "daemon.log").read_text()[-3000:]
            time.sleep(0.3)
        seq = waiting[0]["seq"]
        # Nothing reached the job while it waited.
        assert not list(Path(wandb_dir).glob(f"*-{rid}/atm/inbox/update-*.json"))
        assert cli.main(["approve", "--backend", "wandb", "--run", rid, "--wandb-dir", wandb_dir, str(seq)]) == 0
        assert job.wait(240) == 0, (tmp_path / "job.log").read_text()[-3000:]
        assert daemon.wait(60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        for p in (job, daemon):
            if p is not None and p.poll() is None:
                p.kill()
    capsys.readouterr()
    assert cli.main(["history", "--backend", "wandb", "--run", rid, "--wandb-dir", wandb_dir, "--json"]) == 0
    rows = {r["seq"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows[seq]["status"] == "applied" and "(atm approve, signed)" in rows[seq]["approval"]
    assert all(r["status"] in ("rejected", "expired") for s, r in rows.items() if s > seq)
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["applied"] == [seq]
