"""Delivery latency on W&B offline runs, both ways, measured on real runs.

- update -> applied: the daemon's side writes an update into the run's inbox (``WandbBackend.publish``),
  the job's listener applies it to a knob; measured from just before the write to the knob's setter
  call, in the job. Once with the inbox watcher waking the listener (``channel.on_update``), once with
  the listener as it polls today (every ``poll_interval`` = 1 s, its default).
- update -> ack seen: the same update until its ack file is in the run's outbox (watched every 20 ms).
- metric -> seen: the job logs ``probe`` every 0.1 s; a reader tails the run's transaction log every
  20 ms; measured from the row's ``_timestamp`` to the moment the reader has it. With
  ``WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1`` and with wandb's default, in a run receiving no
  updates. wandb 0.31 writes the log when a 32 KiB block fills or the interval (15 s by default)
  passes, whichever comes first, so the default's figure depends on how fast the job logs.

Job and reader share one clock (same host). About 2.5 minutes.

    python benchmarks/wandb_delivery.py [--short]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import summary, write

from atm.adapters._wandb._local import RunLayout, run_dirs
from atm.adapters._wandb._txlog import LogTail, history_values
from atm.adapters.wandb_backend import WandbBackend
from atm.schema import Change, DecisionRecord, Diagnosis, Status

JOB = r'''
import json, sys, time
import wandb, atm
out, seconds, wake, poll = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "wake", float(sys.argv[4])
run = wandb.init(mode="offline", dir=out, project="atm-bench")
sets = []
hp = {"lr": 1e-3}
def set_lr(v):
    sets.append((v, time.time()))
    hp["lr"] = v
listener = atm.listen(knobs={"lr": (lambda: hp["lr"], set_lr)}, poll_interval=poll)
if wake:
    listener.channel.on_update(listener._wake.set)  # what a Listener with the on_update hook does
i, t_end = 0, time.time() + seconds
while time.time() < t_end:
    run.log({"probe": i})
    i += 1
    time.sleep(0.1)
listener.close()
run.finish()
json.dump({"sets": sets, "probes": i}, open(out + "/job.json", "w"))
'''


@dataclass
class Measured:
    apply_s: list[float] = field(default_factory=list)
    ack_s: list[float] = field(default_factory=list)
    metric_s: list[float] = field(default_factory=list)


def run_case(root: Path, seconds: float, flush: bool, wake: bool, poll: float = 1.0, publish: bool = True) -> Measured:
    root.mkdir(parents=True)
    (root / "job.py").write_text(JOB)
    env = dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline")
    env.pop("WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL", None)
    if flush:
        env["WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL"] = "1"
    job = subprocess.Popen([sys.executable, str(root / "job.py"), str(root), str(seconds), "wake" if wake else "poll", str(poll)],
                           env=env, stdout=open(root / "job.log", "w"), stderr=subprocess.STDOUT)
    wandb_dir = root / "wandb"
    deadline = time.time() + 120
    while not (dirs := run_dirs(wandb_dir)) or not RunLayout(dirs[0]).listener_file.exists():
        if job.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"job did not start: {(root / 'job.log').read_text()[-2000:]}")
        time.sleep(0.05)
    layout = RunLayout(dirs[0])
    backend = WandbBackend(wandb_dir)
    rid = layout.run_id
    written: dict[float, float] = {}
    acked: dict[int, float] = {}
    seen: list[float] = []
    stop = threading.Event()

    def read_metrics() -> None:
        tail = LogTail(layout.transaction_log())  # type: ignore[arg-type]
        while not stop.is_set():
            for rec in tail.read():
                if rec.WhichOneof("record_type") == "history":
                    values = history_values(rec.history)
                    if "probe" in values and "_timestamp" in values:
                        seen.append(time.time() - values["_timestamp"])
            stop.wait(0.02)

    def watch_acks() -> None:
        while not stop.is_set():
            for seq in backend.poll(rid).acks:
                acked.setdefault(seq, time.time())
            stop.wait(0.02)

    threads = [threading.Thread(target=read_metrics), threading.Thread(target=watch_acks)]
    for t in threads:
        t.start()
    seq, old = 0, 1e-3
    t_end = time.time() + seconds - 3
    while publish and time.time() < t_end and job.poll() is None:
        seq += 1
        new = 1e-3 * (1 + seq / 1000)
        rec = DecisionRecord(run_id=rid, seq=seq, step=0, status=Status.PENDING, source="bench",
                             diagnosis=Diagnosis.PLATEAU, changes={"lr": Change(old=old, new=new)})
        t0 = time.time()
        backend.publish(rec)
        written[round(new, 12)] = t0
        old = new
        time.sleep(0.5)
    job.wait(120)
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    out = Measured(metric_s=seen)
    data = json.loads((root / "job.json").read_text())
    for value, t_set in data["sets"]:
        if round(value, 12) in written:
            out.apply_s.append(t_set - written[round(value, 12)])
    for s, t_seen in acked.items():
        new = round(1e-3 * (1 + s / 1000), 12)
        if new in written:
            out.ack_s.append(t_seen - written[new])
    return out


def row(label: str, xs: list[float]) -> list[str]:
    s = summary([x * 1000 for x in xs])
    return [label, str(s["n"]), f"{s['p50']:.0f}", f"{s['p95']:.0f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="shorter runs (about a minute), fewer samples")
    args = ap.parse_args()
    k = 0.5 if args.short else 1.0
    with tempfile.TemporaryDirectory(prefix="atm-wandb-bench-") as tmp:
        root = Path(tmp)
        woken = run_case(root / "wake", 30 * k, flush=True, wake=True)
        polled = run_case(root / "poll", 20 * k, flush=True, wake=False)
        default = run_case(root / "default", 50 * k, flush=False, wake=True, publish=False)
    cases = {
        "update -> applied (inbox watcher wakes the listener)": woken.apply_s,
        "update -> applied (listener polls every 1 s, as today)": polled.apply_s,
        "update -> ack seen by the daemon side (watcher, 20 ms look)": woken.ack_s,
        "metric logged -> seen by the reader (flush interval 1 s)": woken.metric_s,
        "metric logged -> seen by the reader (wandb default flush, no updates)": default.metric_s,
    }
    write(
        "wandb_delivery",
        {"cases": {name: summary(xs) for name, xs in cases.items()}, "unit": "seconds",
         "raw": {name: xs for name, xs in cases.items()}},
        [row(name, xs) for name, xs in cases.items()],
        ["path (W&B offline run, same host)", "n", "p50 ms", "p95 ms"],
        notes=("The job sets WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1 except in the last row. Updates go through "
               "<run>/atm/inbox (atomic write, watchdog inotify observer), one every 0.5 s; metrics (one row every "
               "0.1 s) through the run's .wandb log, which wandb writes when a 32 KiB block fills or the flush "
               "interval passes."),
    )


if __name__ == "__main__":
    main()
