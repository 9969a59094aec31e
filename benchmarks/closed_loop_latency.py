"""Closed-loop latency on MLflow: a metric logged by the job -> the update applied in that job.

A real `mlflow server` on loopback; a job process that logs `val_loss` every 0.25 s and steps its
optimizer at ~100 Hz with `atm.listen`; the daemon polling the run. The proposer is a
benchmark-only fake (`AlternatingProposer`) that answers instantly, so the figure is the loop
itself (daemon poll, tag write, listener poll, apply at the next step), excluding proposer time.

    python benchmarks/closed_loop_latency.py [--updates 20] [--interval 0.5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from _common import start_mlflow_server, summary, write

from atm.adapters.mlflow_backend import MlflowBackend
from atm.policies import parse_policy
from atm.schema import Diagnosis, Proposal
from atm.watcher.daemon import Daemon
from atm.watcher.proposer import ProposalResult

POLICY = """
name: latency-bench
metrics: {val_loss: [val_loss]}
params:
  lr: {min: 1.0e-5, max: 1.0, multipliers: [0.5, 2.0]}
limits: {max_changes: 1, stale_after: {evals: 1000}, eval_metric: val_loss}
"""

JOB = """
import sys, time, torch, mlflow, atm
mlflow.set_tracking_uri(sys.argv[1]); mlflow.set_experiment("latency")
opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
with mlflow.start_run() as run:
    open(sys.argv[2], "w").write(run.info.run_id)
    lst = atm.listen(opt, poll_interval=float(sys.argv[3]))
    step, t_end = 0, time.time() + float(sys.argv[4])
    while time.time() < t_end and len(lst.applied) < int(sys.argv[5]):
        step += 1
        opt.step()
        if step % 25 == 0:
            mlflow.log_metric("val_loss", 1.0 / step, step=step)
        time.sleep(0.01)
    lst.close()
"""


class AlternatingProposer:
    """Benchmark fake: always proposes the other allowed lr, instantly."""

    name = "alternating"

    def propose(self, snapshot, policy, ctx, offer):  # noqa: ANN001
        lr = snapshot.params["lr"]
        return ProposalResult(Proposal(diagnosis=Diagnosis.PLATEAU, changes={"lr": max(offer.choices["lr"]) if lr < 0.01 else min(offer.choices["lr"])},
                                       rationale="latency benchmark"), self.name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--interval", type=float, default=0.5, help="daemon and listener poll interval (s)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="atm-latency-"))
    server, uri = start_mlflow_server(tmp / "server")
    try:
        (tmp / "job.py").write_text(textwrap.dedent(JOB))
        rid_file = tmp / "rid"
        job = subprocess.Popen([sys.executable, str(tmp / "job.py"), uri, str(rid_file), str(args.interval), "300", str(args.updates)],
                               stdout=open(tmp / "job.log", "w"), stderr=subprocess.STDOUT)
        while not rid_file.exists() or not rid_file.read_text():
            if job.poll() is not None:
                raise SystemExit((tmp / "job.log").read_text())
            time.sleep(0.2)
        run_id = rid_file.read_text()
        backend = MlflowBackend(uri)
        daemon = Daemon(backend, parse_policy(POLICY), AlternatingProposer(), interval=args.interval)
        t = threading.Thread(target=daemon.watch, args=([run_id],), daemon=True)
        t.start()
        job.wait(600)
        daemon.stop_event.set()
        t.join(30)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        logged = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run_id, "val_loss")}
        view = backend.poll(run_id)
        lat = []
        for seq, update in sorted(view.updates.items()):
            ack = view.acks.get(seq)
            if ack is not None and update.step in logged:
                lat.append(ack.applied_at - logged[update.step])
    finally:
        server.terminate()
    s = summary(lat)
    write(
        "closed_loop_latency",
        {"backend": "mlflow server (loopback, sqlite)", "poll_interval_s": args.interval, "latency_s": s, "samples": lat},
        [[f"{args.interval:g}", str(s["n"]), f"{s['p50']:.2f}", f"{s['p95']:.2f}"]],
        ["poll interval (s), daemon and listener", "updates", "p50 (s)", "p95 (s)"],
        notes="Latency = ack.applied_at - timestamp of the metric the decision was based on; proposer time excluded (instant fake proposer).",
    )


if __name__ == "__main__":
    main()
