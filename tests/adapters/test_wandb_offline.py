"""W&B offline runs for real: a job process logging with ``wandb.init(mode="offline")`` and ``atm.listen``,
this process playing the daemon through :class:`WandbBackend`.

Checks what lands in the job (its optimizer trace), on disk (inbox, outbox, decision log) and in
the run wandb will sync (every record of the transaction log, tags, charts, table, run files).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from atm.adapters.base import RunNotFound
from atm.adapters._wandb._local import RunLayout, write_atomic
from atm.adapters._wandb._txlog import FILE_HEADER, LogTail, RunLog
from atm.adapters.wandb_backend import UnreadableRun, WandbBackend, WandbChannel, run_status
from atm.schema import Ack, Change, DecisionRecord, Diagnosis, Status, Update
from atm.training.listener import Knob, Listener
from atm.watcher.reconcile import reconcile

T = TypeVar("T")

JOB = r'''
"""A training job as a user writes it for W&B (offline), plus atm.listen. Writes its optimizer trace.

With --torch a real torch optimizer carries the lr (applied at the next optimizer.step());
without, a plain knob does (applied as soon as the update arrives): no torch import, a faster start.
"""
import argparse, json, os, signal, time
ap = argparse.ArgumentParser()
ap.add_argument("--dir", required=True)
ap.add_argument("--project", default="atm-tests")
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--sleep", type=float, default=0.05)
ap.add_argument("--listen", action="store_true")
ap.add_argument("--torch", action="store_true")
ap.add_argument("--until-applied", type=int, default=0)
ap.add_argument("--max-seconds", type=float, default=90)
ap.add_argument("--kill-after", type=int, default=0)
ap.add_argument("--trace")
args = ap.parse_args()
import wandb
run = wandb.init(mode="offline", dir=args.dir, project=args.project, config={"lr": 0.01})
if args.torch:
    import torch
    torch.set_num_threads(1)
    param = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([param], lr=0.01)
    def train_step():
        opt.zero_grad()
        loss = (param ** 2).sum()
        loss.backward()
        opt.step()
        return float(loss), opt.param_groups[0]["lr"]
else:
    hp = {"lr": 0.01, "w": 1.0}
    def train_step():
        hp["w"] -= hp["lr"] * 2 * hp["w"]
        return hp["w"] ** 2, hp["lr"]
listener, step = None, 0
if args.listen:
    import atm
    if args.torch:
        listener = atm.listen(opt, poll_interval=0.1)
    else:
        listener = atm.listen(knobs={"lr": (lambda: hp["lr"], lambda v: hp.__setitem__("lr", v))},
                              step=lambda: step, poll_interval=0.1)
trace, stop_at, t_end = [], None, time.time() + args.max_seconds
while True:
    loss, lr = train_step()
    step += 1
    trace.append({"step": step, "lr": lr})
    run.log({"loss": loss})
    if args.kill_after and step == args.kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    if args.until_applied:
        if stop_at is None and listener is not None and len(listener.applied) >= args.until_applied:
            stop_at = step + 10
        if (stop_at is not None and step >= stop_at) or time.time() > t_end:
            break
    elif step >= args.steps:
        break
    time.sleep(args.sleep)
if listener is not None:
    listener.close()
run.finish()
if args.trace:
    json.dump({"trace": trace, "applied": [u.seq for u in (listener.applied if listener else [])]}, open(args.trace, "w"))
'''


def start_job(tmp: Path, *args: str, flush: bool = True) -> subprocess.Popen:
    script = tmp / "job.py"
    script.write_text(JOB)
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline")
    env.pop("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", None)
    if flush:
        env["WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL"] = "1"
    return subprocess.Popen([sys.executable, str(script), "--dir", str(tmp), *args],
                            stdout=open(tmp / "job.log", "w"), stderr=subprocess.STDOUT, env=env)


def wait_for(fn: Callable[[], T | None], proc: subprocess.Popen | None = None, timeout: float = 90, what: str = "") -> T:
    deadline = time.time() + timeout
    while True:
        got = fn()
        if got:
            return got
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or fn}")
        if proc is not None and proc.poll() is not None and what != "finish":
            got = fn()
            if got:
                return got
            raise AssertionError(f"job exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.05)


def job_log(tmp: Path) -> str:
    return (tmp / "job.log").read_text()[-3000:]


def all_records(run_dir: Path) -> tuple[LogTail, list]:
    """Every record of a finished run, through a fresh reader that checks every checksum."""
    (path,) = run_dir.glob("run-*.wandb")
    tail = LogTail(path)
    records = tail.read()
    assert tail.corrupt_chunks == 0
    assert tail.offset == path.stat().st_size, "the log must end on a complete record"
    assert len(records) == tail.records_read, "every record decodes as wandb's protobuf Record"
    return tail, records


def record(run_id: str, seq: int, step: int, old: float = 0.01, new: float = 0.003) -> DecisionRecord:
    return DecisionRecord(
        run_id=run_id, seq=seq, step=step, status=Status.PENDING, source="rules", diagnosis=Diagnosis.OVERFITTING,
        changes={"lr": Change(old=old, new=new)}, rationale="val loss rising for 3 evals", reason="within policy bounds",
    )


# --------------------------------------------------------------------------- a live job


def test_log_is_read_incrementally_while_the_job_writes_it(tmp_path: Path) -> None:
    job = start_job(tmp_path, "--steps", "50", "--sleep", "0.05")
    backend = WandbBackend(tmp_path / "wandb")
    try:
        rid = wait_for(lambda: next(iter(backend.running_runs("atm-tests")), None), job, what="the run")
        assert backend.running_runs("another-project") == []
        reader = backend._target(rid)
        polls: list[tuple[int, int, bool]] = []
        while True:
            view = backend.poll(rid)
            tail = reader.tail  # type: ignore[union-attr]
            polls.append((tail.offset, len(view.history.get("loss", [])), view.moved))
            if view.status != "RUNNING":
                break
            time.sleep(0.1)
        assert job.wait(60) == 0, job_log(tmp_path)
    finally:
        if job.poll() is None:
            job.kill()
    assert view.status == "FINISHED"
    offsets = [o for o, _, _ in polls]
    counts = [n for _, n, _ in polls]
    assert offsets == sorted(offsets) and counts == sorted(counts)
    assert len({n for n in counts if 0 < n < 50}) >= 2, f"the history should grow over several polls: {counts}"
    assert any(not moved for _, _, moved in polls), "a poll with nothing new reports moved=False"
    # Each step exactly once: nothing was read twice.
    assert [s for s, _ in view.history["loss"]] == list(range(50))
    final, _ = all_records(reader.layout.run_dir)  # type: ignore[union-attr]
    assert reader.tail.records_read == final.records_read  # type: ignore[union-attr]
    assert reader.tail.bytes_read < 2 * final.offset  # type: ignore[union-attr]
    assert backend.running_runs("atm-tests") == []
    assert backend.poll(rid).moved is False


def test_update_reaches_the_job_and_shows_in_the_wandb_run(tmp_path: Path) -> None:
    trace_file = tmp_path / "trace.json"
    job = start_job(tmp_path, "--listen", "--until-applied", "1", "--sleep", "0.03", "--trace", str(trace_file))
    backend = WandbBackend(tmp_path / "wandb")
    try:
        rid = wait_for(lambda: next(iter(backend.running_runs("atm-tests")), None), job, what="the run")

        def attached():
            v = backend.poll(rid)
            return v if v.listener is not None and v.history.get("loss") else None

        view = wait_for(attached, job, what="the listener")
        assert view.listener is not None and view.listener.values["lr"] == pytest.approx(0.01)
        assert view.listener.run_id == rid and view.status == "RUNNING"
        rec = record(rid, 1, step=view.history["loss"][-1][0])
        backend.reserve_seq(rid, 1)
        backend.write_log(rid, [rec])
        backend.publish(rec)
        backend.publish(rec)  # idempotent by seq
        ack = wait_for(lambda: backend.poll(rid).acks.get(1), job, what="the ack")
        assert job.wait(90) == 0, job_log(tmp_path)
    finally:
        if job.poll() is None:
            job.kill()
    assert ack.status == "applied" and ack.values == {"lr": pytest.approx(0.003)}
    view = backend.poll(rid)
    assert view.status == "FINISHED" and view.last_seq == 1 and list(view.updates) == [1]

    # In the job: the knob took the new lr when acknowledged (between steps, from the listener's
    # thread: the step in flight then may have used either value), and only then.
    data = json.loads(trace_file.read_text())
    assert data["applied"] == [1]
    lrs = {row["step"]: row["lr"] for row in data["trace"]}
    assert ack.applied_step is not None
    assert all(lr == pytest.approx(0.01) for s, lr in lrs.items() if s <= ack.applied_step)
    assert all(lr == pytest.approx(0.003) for s, lr in lrs.items() if s >= ack.applied_step + 2)

    # In the run W&B will sync: valid records, the job's own steps untouched, atm's charts, tags, table, files.
    run_dir = RunLayout(next((tmp_path / "wandb").glob("offline-run-*")))
    _, records = all_records(run_dir.run_dir)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "exit" in kinds
    steps = [r.history.step.num for r in records if r.WhichOneof("record_type") == "history"]
    assert steps == sorted(set(steps)), "W&B's _step must stay strictly increasing"
    state = RunLog()
    state.apply(records)
    n = len(data["trace"])
    assert [s for s, _ in state.history["loss"]] == list(range(n)), "atm must not add steps to the job's own sequence"
    assert (ack.applied_step, pytest.approx(0.003)) in state.history["atm/lr"]
    assert state.history["atm/lr"][0] == (state.history["atm/lr"][0][0], pytest.approx(0.01))  # the initial value
    assert "atm#1 lr 0.01->0.003" in state.tags
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert "atm/interventions.jsonl" in saved
    (table_file,) = run_dir.files_dir.glob("media/table/atm/interventions_*.table.json")
    table = json.loads(table_file.read_text())
    assert table["columns"][:4] == ["seq", "decided_step", "applied_step", "changes"]
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["seq"] == 1 and row["applied_step"] == ack.applied_step and row["changes"] == "lr 0.01 -> 0.003"
    assert row["verdict"] == "within policy bounds" and row["status"] == "applied"
    assert backend.read_log(rid)[0].seq == 1
    assert (run_dir.outbox / "ack-000001.json").exists() and run_dir.listener_file.exists()
    assert not list(run_dir.inbox.glob(".tmp-*")), "atomic writes leave no temporary files"
    assert run_dir.inbox.parent.parent == run_dir.run_dir and "files" not in run_dir.inbox.parts[-3:]

    # wandb's own CLI still recognises the directory as a run it can sync (dry run: no network).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    out = subprocess.run([sys.executable, "-m", "wandb", "sync", "--dry-run", str(run_dir.run_dir)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and "Would sync 1 run" in out.stdout + out.stderr, out.stdout + out.stderr


def test_a_job_killed_by_a_signal_is_reported_killed(tmp_path: Path) -> None:
    job = start_job(tmp_path, "--listen", "--kill-after", "40", "--sleep", "0.05")
    assert job.wait(90) == -9, job_log(tmp_path)
    backend = WandbBackend(tmp_path / "wandb")
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    view = backend.poll(str(run_dir))
    assert view.listener is not None, "the listener announced itself before the kill"
    assert view.status == "KILLED"
    assert backend.running_runs("atm-tests") == []


SWEEP = r'''
"""Runs of two projects, one after another, as a sweep leaves them; the first one resumed last."""
import json, sys, time
import wandb
made = []
def run(project, **resume):
    r = wandb.init(mode="offline", dir=sys.argv[1], project=project, settings=wandb.Settings(console="off"), **resume)
    r.log({"loss": 1.0}, step=1)
    made.append(r.id)
    r.finish()
    time.sleep(1.1)  # run folders are named to the second
run("atm-tests"); run("elsewhere"); run("atm-tests"); run("atm-tests", id=made[0], resume="allow")
print(json.dumps(made[:3]))
'''


def test_every_run_of_a_project_oldest_first_and_the_projects_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    from atm.watcher.cli import main

    script = tmp_path / "sweep.py"
    script.write_text(SWEEP)
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline")
    out = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    first, other, second = json.loads(out.stdout.strip().splitlines()[-1])
    wandb_dir = tmp_path / "wandb"
    assert len(list(wandb_dir.glob(f"offline-run-*-{first}"))) == 2  # resumed: a folder per process
    backend = WandbBackend(wandb_dir)
    assert backend.experiment_runs("atm-tests") == [first, second]  # ended runs, each once, oldest first
    assert backend.experiment_runs("elsewhere") == [other]
    assert backend.running_runs("atm-tests") == []
    with pytest.raises(RunNotFound, match=r"no W&B run of project 'nope' under .*--wandb-dir"):
        backend.experiment_runs("nope")

    backend.write_log(first, [record(first, 1, step=1)])
    assert main(["history", "--backend", "wandb", "--experiment", "atm-tests", "--wandb-dir", str(wandb_dir),
                 "--json"]) == 0
    items = json.loads(capsys.readouterr().out)
    assert [(i["run_id"], [r["seq"] for r in i["interventions"]]) for i in items] == [(first, [1]), (second, [])]
    assert items[0]["interventions"][0]["changes"] == {"lr": {"old": 0.01, "new": 0.003}}
    # Without --backend: no MLflow store here, so the project is looked for among W&B's offline runs.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["history", "--experiment", "atm-tests"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("experiment 'atm-tests': 2 runs, oldest first")
    assert text.index(f"run {first}") < text.index(f"no interventions on run {second}")
    assert "lr 0.01→0.003" in text and other not in text


# --------------------------------------------------------------------------- run directories without a job


def fake_run_dir(root: Path, run_id: str = "abc123", stamp: str = "20260101_120000") -> Path:
    """A run directory with an empty (header-only) transaction log, as wandb creates it at init."""
    run_dir = root / "wandb" / f"offline-run-{stamp}-{run_id}"
    (run_dir / "files").mkdir(parents=True)
    (run_dir / f"run-{run_id}.wandb").write_bytes(FILE_HEADER)
    return run_dir


def test_a_dry_run_decision_log_goes_up_with_the_run(tmp_path: Path) -> None:
    # Nothing is ever published or acknowledged, yet the log is part of what W&B will sync.
    job = start_job(tmp_path, "--listen", "--steps", "100", "--sleep", "0.05")
    backend = WandbBackend(tmp_path / "wandb")
    try:
        rid = wait_for(lambda: next(iter(backend.running_runs("atm-tests")), None), job, what="the run")
        wait_for(lambda: backend.poll(rid).listener, job, what="the listener")
        backend.write_log(rid, [record(rid, 1, step=10).model_copy(update={"status": Status.DRY_RUN})])
        assert job.wait(90) == 0, job_log(tmp_path)
    finally:
        if job.poll() is None:
            job.kill()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    _, records = all_records(run_dir)
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert "atm/interventions.jsonl" in saved


def test_run_resolution(tmp_path: Path) -> None:
    older = fake_run_dir(tmp_path, "abc123", "20260101_120000")
    newer = fake_run_dir(tmp_path, "abc123", "20260102_120000")  # resumed: the newest dir is the live one
    backend = WandbBackend(tmp_path / "wandb")
    assert backend._target("abc123").layout.run_dir == newer.resolve()  # type: ignore[union-attr]
    assert backend._target(str(older)).layout.run_dir == older.resolve()  # type: ignore[union-attr]
    assert backend._target(str(older / "run-abc123.wandb")).layout.run_dir == older.resolve()  # type: ignore[union-attr]
    assert backend.poll("abc123").status == "RUNNING"
    with pytest.raises(RunNotFound, match=r"no W&B run 'nope'.*--wandb-dir.*entity/project/run_id"):
        backend.poll("nope")
    (newer / "run-abc123.wandb").write_bytes(FILE_HEADER[:6] + b"\x07")
    with pytest.raises(UnreadableRun, match="format version 7"):
        WandbBackend(tmp_path / "wandb").poll("abc123")


def test_an_approval_naming_the_run_by_its_folder_or_file_is_taken_and_another_runs_is_not(tmp_path: Path) -> None:
    from atm.adapters._wandb._local import approval_name
    from atm.schema import Approval
    from atm.signing import resolve_key, sign

    run_dir = fake_run_dir(tmp_path, "abc123")
    WandbBackend(tmp_path / "wandb").write_approval("abc123", Approval(seq=1, decision="approve", by="alice@box"))
    # Signed answers that name the run as the watcher's --run may (its folder, its .wandb file), and a copy
    # of another run's.
    for seq, named in ((2, str(run_dir)), (3, str(run_dir / "run-abc123.wandb")), (4, "abc124")):
        signed = sign(Approval(run_id=named, seq=seq, decision="approve", by="bob@box"), resolve_key())
        write_atomic(RunLayout(run_dir).approvals / approval_name(seq), signed.model_dump_json())
    for spelling in ("abc123", str(run_dir), str(run_dir / "run-abc123.wandb")):
        view = WandbBackend(tmp_path / "wandb").poll(spelling)
        assert sorted(a.seq for a in view.approvals) == [1, 2, 3], spelling
        assert [str(p) for p in view.problems] == ["approval #4 is for run abc124, not this one: a copy from another "
                                                   "run; ignored"], spelling


def test_run_status_rules() -> None:
    assert run_status(0, None) == "FINISHED"
    assert run_status(1, True) == "FAILED"
    assert run_status(None, False) == "KILLED"
    assert run_status(None, True) == "RUNNING"
    assert run_status(None, None) == "RUNNING"  # another host, or no listener: the daemon's idle rule decides


def test_restart_resumes_after_acked_updates(tmp_path: Path) -> None:
    run_dir = fake_run_dir(tmp_path)
    backend = WandbBackend(tmp_path / "wandb")
    for seq, old, new in ((1, 0.01, 0.005), (2, 0.005, 0.004)):
        backend.publish(record("abc123", seq, step=10 * seq, old=old, new=new))
    first = WandbChannel(run_dir)
    values: list[float] = []
    knobs = {"lr": Knob(set=values.append, get=lambda: values[-1] if values else 0.01)}
    lst = Listener(first, knobs, poll_interval=0.05).start()
    wait_for(lambda: len(first.acked()) == 2, what="two acks")
    lst.close()
    assert values == [0.005, 0.004]

    backend.publish(record("abc123", 3, step=30, old=0.004, new=0.002))
    second = WandbChannel(run_dir)  # a restarted job attaching to the same run
    assert sorted(second.acked()) == [1, 2]
    lst2 = Listener(second, knobs, poll_interval=0.05).start()
    wait_for(lambda: 3 in second.acked(), what="the third ack")
    lst2.close()
    assert values == [0.005, 0.004, 0.002], "updates acked before the restart are not applied again"
    assert [u.seq for u in lst2.applied] == [3]
    assert sorted(backend.poll("abc123").acks) == [1, 2, 3]


@pytest.mark.parametrize("polling", [False, True], ids=["inotify", "polling"])
def test_inbox_watch_wakes_the_listener(tmp_path: Path, polling: bool) -> None:
    run_dir = fake_run_dir(tmp_path)
    channel = WandbChannel(run_dir, polling=polling)
    try:
        assert channel.observer_kind == ("polling" if polling else "native")
        woke = threading.Event()
        channel.on_update(woke.set)
        write_atomic(RunLayout(run_dir).inbox / "notes.txt", "not an update")
        assert not woke.wait(1.2 if polling else 0.3)
        WandbBackend(tmp_path / "wandb").publish(record("abc123", 1, step=10))
        assert woke.wait(5), "the watcher must call back when an update file lands"
        assert [u.seq for u in channel.fetch(0)] == [1]
    finally:
        channel.close()


def test_polling_observer_is_chosen_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATM_WANDB_POLLING", "1")
    channel = WandbChannel(fake_run_dir(tmp_path))
    try:
        assert channel.observer_kind == "polling"
    finally:
        channel.close()


def test_malformed_and_partial_files_are_ignored(tmp_path: Path) -> None:
    run_dir = fake_run_dir(tmp_path)
    layout = RunLayout(run_dir)
    backend = WandbBackend(tmp_path / "wandb")
    backend.publish(record("abc123", 1, step=10))
    write_atomic(layout.inbox / "update-000002.json", "{not json")
    (layout.inbox / ".tmp-x.part").write_text('{"half": ')
    write_atomic(layout.outbox / "ack-000001.json", "[]")
    write_atomic(layout.listener_file, "garbage")
    channel = WandbChannel(run_dir)
    try:
        assert [u.seq for u in channel.fetch(0)] == [1]
        assert channel.acked() == {}
        view = backend.poll("abc123")
        assert list(view.updates) == [1] and view.acks == {} and view.listener is None
    finally:
        channel.close()


def test_channel_ack_and_announce_without_a_live_run(tmp_path: Path) -> None:
    run_dir = fake_run_dir(tmp_path)
    backend = WandbBackend(tmp_path / "wandb")
    backend.publish(record("abc123", 1, step=10))
    channel = WandbChannel(run_dir)
    try:
        update = channel.fetch(0)[0]
        assert isinstance(update, Update)
        channel.ack(Ack(run_id="abc123", seq=1, status="applied", applied_step=12, values={"lr": 0.003}))
        channel.log_values({"lr": 0.003}, 12)  # no live run: nothing to chart, and no error
        assert backend.poll("abc123").acks[1].applied_step == 12
    finally:
        channel.close()


# --------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_default_flush_interval_still_delivers_everything(tmp_path: Path) -> None:
    """Without WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL the SDK flushes about every 15 s: later, but complete."""
    job = start_job(tmp_path, "--steps", "400", "--sleep", "0.05", flush=False)
    backend = WandbBackend(tmp_path / "wandb")
    try:
        rid = wait_for(lambda: next(iter(backend.running_runs("atm-tests")), None), job, what="the run")
        seen: list[int] = []
        while True:
            view = backend.poll(rid)
            seen.append(len(view.history.get("loss", [])))
            if view.status != "RUNNING":
                break
            time.sleep(0.5)
        assert job.wait(60) == 0, job_log(tmp_path)
    finally:
        if job.poll() is None:
            job.kill()
    assert [s for s, _ in view.history["loss"]] == list(range(400))
    assert len({n for n in seen if 0 < n < 400}) >= 1, f"points arrive in flushes while the job runs: {seen}"


HF_STYLE_JOB = r'''
"""A job that logs like the HF Trainer (one row a log call, no step=, its own x axis declared) and what
its listener writes into it: the job logs at 190, the listener applies a change (its ack's wall time
goes to a file), writes its values at the job's step then (197) into the row the job opens next, then
the job logs its train and eval rows at 200 (the listener's table joins the eval row) and one at 210."""
import json, sys, time
from pathlib import Path
import wandb
from atm.adapters._wandb._ui import RunUI, TABLE_COLUMNS, TABLE_KEY
run = wandb.init(mode="offline", dir=sys.argv[1], project="hf-style")
run.define_metric("train/global_step")
run.define_metric("*", step_metric="train/global_step", step_sync=True)
ui = RunUI(run, Path(run.dir), online=False)
run.log({"train/loss": 1.0, "train/global_step": 190})
time.sleep(0.3)
applied_at = time.time()
ui.log_values({"lr": 0.003}, 197)
time.sleep(0.3)
run.log({"train/loss": 0.9, "train/global_step": 200})
run.log({TABLE_KEY: wandb.Table(columns=TABLE_COLUMNS, data=[[1] * len(TABLE_COLUMNS)])}, commit=False)
run.log({"eval/loss": 1.1, "train/global_step": 200})
time.sleep(0.3)
run.log({"train/loss": 0.8, "train/global_step": 210})
json.dump({"run_id": run.id, "applied_at": applied_at}, open(sys.argv[1] + "/job.json", "w"))
run.finish()
'''


def test_a_change_applied_between_two_rows_takes_effect_at_the_next_rows_step(tmp_path: Path) -> None:
    """The listener's values share the row the job logs next, and that row is the job's first after the
    change: effective_step is its step (200), not the step of the first row the listener left alone (210)."""
    script = tmp_path / "job.py"
    script.write_text(HF_STYLE_JOB)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=120,
                   env=dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline",
                            WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL="1"))
    job = json.loads((tmp_path / "job.json").read_text())
    view = WandbBackend(tmp_path / "wandb").poll(job["run_id"])
    assert [s for s, _ in view.history["train/loss"]] == [190, 200, 210]
    assert [s for s, _ in view.history["atm/lr"]] == [197]
    ack = Ack(run_id=job["run_id"], seq=1, status="applied", applied_step=197, applied_at=job["applied_at"],
              values={"lr": 0.003})
    (rec,), _ = reconcile([record(job["run_id"], 1, step=190)], dataclasses.replace(view, acks={1: ack}))
    assert rec.status == Status.APPLIED and rec.effective_step == 200, list(view.timeline)


WANDB_OVERFIT_JOB = r'''
"""tests/jobs/overfit_job.py's workload, logging to W&B offline like a user would."""
import json, sys, time
import torch, torch.nn as nn, wandb, atm
out_dir, steps = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0); torch.set_num_threads(1)
x = torch.randn(200, 16); w = torch.randn(16, 1); y = x @ w + torch.randn(200, 1)
xt, yt, xv, yv = x[:48], y[:48], x[48:], y[48:]
model = nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Dropout(0.0), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
loss_fn = nn.MSELoss()
run = wandb.init(mode="offline", dir=out_dir, project="atm-overfit")
open(out_dir + "/run_id", "w").write(run.id)
listener = atm.listen(opt, knobs={"dropout": atm.dropout(model)}, poll_interval=0.2)
trace = []
for step in range(1, steps + 1):
    model.train(); opt.zero_grad()
    loss = loss_fn(model(xt), yt); loss.backward()
    gn = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)); opt.step()
    trace.append({"step": step, "lr": opt.param_groups[0]["lr"], "dropout": float(model[2].p),
                  "weight_decay": opt.param_groups[0]["weight_decay"]})
    if step % 10 == 0:
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(xv), yv))
        run.log({"train_loss": float(loss.detach()), "val_loss": val, "grad_norm": gn}, step=step)
    time.sleep(0.05)
listener.close()
run.finish()
json.dump({"trace": trace, "applied_seqs": [u.seq for u in listener.applied]}, open(out_dir + "/trace.json", "w"))
'''


@pytest.mark.slow
def test_overfitting_wandb_job_is_managed_by_atm_watch(tmp_path: Path) -> None:
    """The whole loop on W&B: atm-watch --backend wandb with the rules proposer and the lm policy."""
    script = tmp_path / "job.py"
    script.write_text(WANDB_OVERFIT_JOB)
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline", WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL="1")
    job = subprocess.Popen([sys.executable, str(script), str(tmp_path), "360"], env=env,
                           stdout=open(tmp_path / "job.log", "w"), stderr=subprocess.STDOUT)
    rid = wait_for(lambda: (tmp_path / "run_id").exists() and (tmp_path / "run_id").read_text(), job, what="the run id")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "atm.watcher.cli", "watch", "--backend", "wandb", "--run", rid, "--wandb-dir",
         str(tmp_path / "wandb"), "--policy", "lm", "--proposer", "rules", "--interval", "0.5", "--no-table"],
        stdout=open(tmp_path / "daemon.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        assert job.wait(240) == 0, job_log(tmp_path)
        assert daemon.wait(60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        for p in (job, daemon):
            if p.poll() is None:
                p.kill()
    out = subprocess.run(
        [sys.executable, "-m", "atm.watcher.cli", "history", "--backend", "wandb", "--run", rid,
         "--wandb-dir", str(tmp_path / "wandb"), "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    hist = json.loads(out.stdout)
    applied = [h for h in hist if h["status"] == "applied"]
    assert applied, f"no intervention applied: {hist}\n{(tmp_path / 'daemon.log').read_text()[-3000:]}"
    assert hist[0]["diagnosis"] == "overfitting"
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data["applied_seqs"] == [h["seq"] for h in hist if h["status"] in ("applied", "failed")]
    for h in applied:
        row = data["trace"][h["applied_step"] - 1]
        for param, ch in h["changes"].items():
            assert row[param] == pytest.approx(ch["new"], rel=1e-6), f"{param} in force at step {h['applied_step']}"
    run_dir = next((tmp_path / "wandb").glob(f"offline-run-*-{rid}"))
    _, records = all_records(run_dir)
    state = RunLog()
    state.apply(records)
    assert any(t.startswith(f"atm#{applied[-1]['seq']} ") for t in state.tags)
