"""Forged and foreign files in a W&B run's atm inbox, against a real offline run and a real torch job.

The job is a separate process (``wandb.init(mode="offline")``, a small nn.Linear with AdamW and
``atm.listen(opt)``); this process writes into the run's inbox as anyone with access to the run
folder could, and plays the watcher through the real :class:`WandbBackend`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from atm.adapters._wandb._local import RunLayout, update_name, write_atomic
from atm.adapters.wandb_backend import WandbBackend
from atm.schema import Ack, Change, DecisionRecord, Diagnosis, Status, Update
from atm.signing import key_from_text, resolve_key, sign

T = TypeVar("T")

JOB = r'''
import argparse, json, time
from pathlib import Path
ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--done", required=True)
ap.add_argument("--trace", required=True)
args = ap.parse_args()
import torch, wandb
import atm
torch.set_num_threads(1)
torch.manual_seed(0)
run = wandb.init(mode="offline", dir=args.dir, project="atm-signed")
model = torch.nn.Linear(4, 1)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
listener = atm.listen(opt, poll_interval=0.05)
lrs, t_end = [], time.time() + 120
while not Path(args.done).exists() and time.time() < t_end:
    opt.zero_grad()
    loss = model(torch.randn(16, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    lrs.append(opt.param_groups[0]["lr"])
    run.log({"loss": float(loss)})
    time.sleep(0.02)
listener.close()
run.finish()
json.dump({"lrs": lrs, "applied": [u.seq for u in listener.applied]}, open(args.trace, "w"))
'''


def wait_for(fn: Callable[[], T | None], proc: subprocess.Popen, log: Path, timeout: float = 90, what: str = "") -> T:
    deadline = time.time() + timeout
    while True:
        got = fn()
        if got:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"job exited ({proc.returncode}) while waiting for {what}: {log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {log.read_text()[-3000:]}")
        time.sleep(0.05)


def _unsigned(rid: str, seq: int, **changes: tuple[float, float]) -> Update:
    return Update(run_id=rid, seq=seq, step=10, diagnosis=Diagnosis.OVERFITTING, source="rules",
                  changes={k: Change(old=o, new=n) for k, (o, n) in changes.items()})


def _acks(layout: RunLayout) -> dict[int, Ack]:
    out = {}
    for path in layout.outbox.glob("ack-*.json"):
        ack = Ack.model_validate_json(path.read_text())
        out[ack.seq] = ack
    return out


def test_forged_inbox_files_are_refused_and_the_watcher_still_steers(tmp_path: Path) -> None:
    script, done, trace, log = tmp_path / "job.py", tmp_path / "done", tmp_path / "trace.json", tmp_path / "job.log"
    script.write_text(JOB)
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL="1")
    job = subprocess.Popen([sys.executable, str(script), "--dir", str(tmp_path), "--done", str(done), "--trace", str(trace)],
                           stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)
    watcher = WandbBackend(tmp_path / "wandb")
    try:
        rid = wait_for(lambda: next(iter(watcher.running_runs("atm-signed")), None), job, log, what="the run")
        wait_for(lambda: watcher.poll(rid).listener, job, log, what="the listener")
        layout = RunLayout(next((tmp_path / "wandb").glob("offline-run-*")))
        other = key_from_text("a-colleagues-own-atm-key", "other")
        forged = {
            1: _unsigned(rid, 1, lr=(1e-3, 10.0)).model_dump_json(),
            2: _unsigned(rid, 2, lr=(1e-3, -1.0)).model_dump_json(),
            3: _unsigned(rid, 3, lr=(1e-9, 1e-3)).model_dump_json(),
            4: "{not json",
            5: sign(_unsigned(rid, 5, lr=(1e-3, 2e-3)), other).model_dump_json(),
            6: sign(_unsigned(rid, 9, lr=(1e-3, 5e-4)), resolve_key()).model_dump_json(),  # a genuine #9 filed as #6
        }
        for seq, text in forged.items():
            write_atomic(layout.inbox / update_name(seq), text)
        def all_refused() -> dict[int, Ack] | None:
            acks = _acks(layout)
            return acks if set(acks) >= set(forged) else None

        acks = wait_for(all_refused, job, log, what="rejections")
        assert all(acks[s].status == "rejected" for s in forged)
        assert "update #1 is not signed" in acks[1].error
        assert "file inbox/update-000004.json: not a valid update" in acks[4].error
        assert f"signed with key id {other.key_id}, this job has key id {resolve_key().key_id}" in acks[5].error
        assert "holds update #9, filed under #6" in acks[6].error

        view = watcher.poll(rid)
        assert view.updates == {} and view.last_seq >= 6
        reported = " | ".join(str(p) for p in view.problems)
        assert "update #1 is not signed" in reported and "update-000004.json: not a valid update" in reported

        # The watcher's own update lands.
        rec = DecisionRecord(run_id=rid, seq=7, step=1, status=Status.PENDING, source="rules", diagnosis=Diagnosis.PLATEAU,
                             changes={"lr": Change(old=1e-3, new=5e-4, max_factor=2.0, min=1e-6)})
        watcher.reserve_seq(rid, 7)
        watcher.publish(rec)
        ack = wait_for(lambda: watcher.poll(rid).acks.get(7), job, log, what="the ack of #7")
        assert ack.status == "applied" and ack.values["lr"] == pytest.approx(5e-4)
        assert list(watcher.poll(rid).updates) == [7]
        done.write_text("")
        assert job.wait(90) == 0, log.read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    data = json.loads(trace.read_text())
    assert data["applied"] == [7]
    # Training went on throughout, and the lr was only ever the job's own or the watcher's.
    # (Steps at both values: it trained before the watcher's update and after it, however fast the machine.)
    assert all(lr == 1e-3 or lr == pytest.approx(5e-4) for lr in data["lrs"])
    assert 1e-3 in data["lrs"] and any(lr == pytest.approx(5e-4) for lr in data["lrs"])
    assert data["lrs"][-1] == pytest.approx(5e-4)
