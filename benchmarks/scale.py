"""What a daemon poll costs as runs grow long and many, against the transport floor measured in the same run.

Two parts, each written to ``benchmarks/results/`` as JSON plus a Markdown table:

``tick``: one run whose metrics (train loss, val loss, grad norm) already hold H points each
(H = 2k, 20k, 100k), a job attached (its listener announced on the run) and a writer appending
a few points before every tick, as a live job does. It times ``Daemon.tick`` (poll, reconcile,
fold what is new, decide on a new evaluation), beside, in the same loop, the transport floor
(``get_run`` plus the store's windowed read of just the new points, the two calls a poll cannot do
without) and the whole-history snapshot rebuild that every tick did before telemetry was folded
incrementally. Target: the tick at 100k points within 1.5x of the tick at 2k.

``fleet``: R runs of P points each (default 200 x 20k), a writer process appending to every run,
one daemon process watching them all at a 5 s interval for a minute: CPU-seconds per minute, polls
per run per minute against the configured rate, lag from a point being logged to the daemon
reading it (p50/p95), RSS. Targets: at most one core, >= 95% of the rate, lag p95 <= 2 intervals,
RSS <= 1 GiB.

Histories are put in the store by bulk SQL into MLflow's own tables (the last point of each
metric through ``log_batch``, so the store's latest-value table is MLflow's own); everything the
daemon reads afterwards goes through MLflow. ``--store postgres`` runs a real ``mlflow server``
on a PostgreSQL 15 database started here (``initdb``/``pg_ctl`` as the ``postgres`` user);
``sqlite`` uses a local store file; ``auto`` (default) takes postgres when it can start.

    .venv/bin/python benchmarks/scale.py                 # both parts (about 15 minutes)
    .venv/bin/python benchmarks/scale.py --part tick --quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import free_port, percentile, summary, write  # noqa: E402

METRICS = ("train_loss", "val_loss", "grad_norm")
#: Steps between two evaluations (val_loss points), in train steps.
EVAL_EVERY = 10


def curve(key: str, step: int) -> float:
    """A healthy run: both losses fall slowly, the gradient norm wobbles. Nothing to decide."""
    if key == "grad_norm":
        return 1.0 + 0.1 * math.sin(step / 7)
    base = 0.5 + 3.0 / (1.0 + step / 500)
    return base + (0.05 if key == "val_loss" else 0.0)


# --------------------------------------------------------------------------- stores


class Store:
    """A tracking store to benchmark against: its URI for the daemon, and bulk loading of history."""

    uri: str
    kind: str

    def bulk_insert(self, rows: list[tuple[str, float, int, str, int]]) -> None:
        """Rows of (key, value, timestamp ms, run id, step) straight into MLflow's metrics table."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, root: Path) -> None:
        self.path = root / "mlflow.db"
        self.uri = f"sqlite:///{self.path}"
        from mlflow.tracking import MlflowClient

        MlflowClient(self.uri).search_experiments()  # creates the tables

    def bulk_insert(self, rows: list[tuple[str, float, int, str, int]]) -> None:
        import sqlite3

        with sqlite3.connect(self.path) as db:
            db.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, 0)",
                           rows)


class PostgresStore(Store):
    """PostgreSQL 15 in a temporary cluster, and a real ``mlflow server`` on it (2 workers)."""

    kind = "postgres"

    def __init__(self, root: Path) -> None:
        import urllib.request

        self.root = root
        self.data = root / "pg"
        port = free_port()
        self.port = port
        self.data.mkdir(parents=True)
        shutil.chown(self.data, "postgres")
        os.chmod(root, 0o755)
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(as_pg + ["initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres"], check=True,
                       capture_output=True)
        subprocess.run(as_pg + ["pg_ctl", "-D", str(self.data), "-o", f"-p {port} -k /tmp -c fsync=off", "-l",
                                str(self.data / "log"), "-w", "start"], check=True, capture_output=True)
        subprocess.run(as_pg + ["createdb", "-h", "127.0.0.1", "-p", str(port), "mlflow"], check=True, capture_output=True)
        self.dsn = f"postgresql://postgres@127.0.0.1:{port}/mlflow"
        # psycopg2 named: SQLAlchemy's default PostgreSQL driver is psycopg 3, which atm does not install.
        store_uri = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
        from mlflow.tracking import MlflowClient

        MlflowClient(store_uri).search_experiments()  # creates the tables before the server's workers race to
        http = free_port()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(http),
             "--backend-store-uri", store_uri, "--artifacts-destination", str(root / "artifacts"), "--workers", "2"],
            stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )
        self.uri = f"http://127.0.0.1:{http}"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                if self.server.poll() is not None:
                    raise RuntimeError((root / "server.log").read_text()[-2000:])
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not answer in 180 s")

    def bulk_insert(self, rows: list[tuple[str, float, int, str, int]]) -> None:
        import psycopg2
        from psycopg2.extras import execute_values

        with psycopg2.connect(self.dsn) as db, db.cursor() as cur:
            execute_values(cur, "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES %s",
                           [(k, v, t, r, s, False) for k, v, t, r, s in rows], page_size=10_000)

    def close(self) -> None:
        self.server.terminate()
        try:
            self.server.wait(15)
        except subprocess.TimeoutExpired:
            self.server.kill()
        subprocess.run(["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(self.data), "-m", "fast", "stop"],
                       capture_output=True)


def open_store(kind: str, root: Path) -> Store:
    if kind in ("postgres", "auto"):
        try:
            return PostgresStore(root)
        except Exception as exc:  # no PostgreSQL, no psycopg2, not root ...
            if kind == "postgres":
                raise
            print(f"scale: PostgreSQL not available ({type(exc).__name__}: {exc}); using sqlite", flush=True)
    return SqliteStore(root)


def make_run(store: Store, experiment_id: str, points: int, name: str) -> str:
    """A run whose metrics hold ``points`` points each, with a job's listener announced on it."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from atm.adapters.mlflow_backend import MlflowChannel
    from atm.schema import ListenerInfo

    client = MlflowClient(store.uri)
    run_id = client.create_run(experiment_id, run_name=name).info.run_id
    now = int(time.time() * 1000) - points * 10
    rows = []
    for key in METRICS:
        every = EVAL_EVERY if key == "val_loss" else 1
        for i in range(points - 1):
            step = i * every
            rows.append((key, curve(key, step), now + step, run_id, step))
    for chunk in range(0, len(rows), 200_000):
        store.bulk_insert(rows[chunk: chunk + 200_000])
    last = [Metric(key, curve(key, (points - 1) * (EVAL_EVERY if key == "val_loss" else 1)), now + points * 10,
                   (points - 1) * (EVAL_EVERY if key == "val_loss" else 1)) for key in METRICS]
    client.log_batch(run_id, metrics=last)
    MlflowChannel(run_id, store.uri).announce(ListenerInfo(
        run_id=run_id, knobs=["lr", "weight_decay", "dropout"], values={"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.1},
        actions=["stop", "rollback"], apply_mode="auto", pid=os.getpid(), started_at=time.time()))
    return run_id


def append(client: Any, run_id: str, last_step: int, n: int) -> int:
    """What a live job logs between two polls: ``n`` train steps, and an evaluation when one falls due."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = []
    for step in range(last_step + 1, last_step + n + 1):
        metrics += [Metric("train_loss", curve("train_loss", step), ts, step), Metric("grad_norm", 1.0, ts, step)]
        if step % EVAL_EVERY == 0:
            metrics.append(Metric("val_loss", curve("val_loss", step), ts, step))
    client.log_batch(run_id, metrics=metrics)
    return last_step + n


# --------------------------------------------------------------------------- part 1: tick cost


def part_tick(store: Store, histories: list[int], ticks: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from atm.adapters.mlflow_backend import MlflowBackend
    from atm.policies import load_policy
    from atm.watcher.daemon import Daemon
    from atm.watcher.snapshot import build_snapshot

    client = MlflowClient(store.uri)
    exp = client.create_experiment(f"scale-tick-{int(time.time())}")
    policy = load_policy("lm")
    out: dict[str, Any] = {}
    for h in histories:
        t0 = time.perf_counter()
        run_id = make_run(store, exp, h, f"h{h}")
        load_s = time.perf_counter() - t0
        backend = MlflowBackend(store.uri)
        daemon = Daemon(backend, policy, interval=5.0)
        t0 = time.perf_counter()
        daemon.tick(run_id)
        first_s = time.perf_counter() - t0
        step = h - 1
        tick_ms, floor_ms, rebuild_ms = [], [], []
        reader = MlflowBackend(store.uri)  # its step-window read, on a backend of its own (no cache)
        for i in range(ticks):
            before = step
            step = append(client, run_id, step, 10)
            # Floor: the two reads a poll cannot do without (the run's latest values, then the new points).
            t0 = time.perf_counter()
            client.get_run(run_id)
            for key in METRICS:
                reader._window_rows(run_id, key, before + 1, step)
            floor_ms.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            daemon.tick(run_id, wait=True)
            tick_ms.append((time.perf_counter() - t0) * 1000)
            if i < 3:
                view = backend.poll(run_id)
                t0 = time.perf_counter()
                build_snapshot(run_id, policy, view.history, {"lr": 1e-3})
                rebuild_ms.append((time.perf_counter() - t0) * 1000)
        daemon.stop()
        out[str(h)] = {
            "points_per_metric": h, "load_s": round(load_s, 1), "first_tick_s": round(first_s, 2),
            "tick_ms": summary(tick_ms), "floor_ms": summary(floor_ms), "rebuild_ms": summary(rebuild_ms),
            "decisions": len(daemon._states[run_id].records),
        }
        print(f"tick: {h} points/metric: tick p50 {percentile(tick_ms, .5):.1f} ms, floor p50 "
              f"{percentile(floor_ms, .5):.1f} ms, whole-history rebuild p50 {percentile(rebuild_ms, .5):.0f} ms",
              flush=True)
    return out


# --------------------------------------------------------------------------- part 2: a fleet of runs


WRITER = r'''
import json, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
from mlflow.tracking import MlflowClient
from scale import append
client = MlflowClient({uri!r})
runs = json.loads({runs!r})
steps = {{r: s for r, s in runs.items()}}
period, until = {period}, time.time() + {seconds}
log = open({log!r}, "w")
while time.time() < until:
    started = time.time()
    for r in steps:
        steps[r] = append(client, r, steps[r], 5)
        log.write(f"{{r}} {{steps[r]}} {{time.time():.3f}}\n")
    log.flush()
    time.sleep(max(0.0, period - (time.time() - started)))
'''


def part_fleet(store: Store, runs: int, points: int, interval: float, seconds: float, workers: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from atm.adapters.mlflow_backend import MlflowBackend
    from atm.policies import load_policy
    from atm.watcher.daemon import Daemon

    client = MlflowClient(store.uri)
    exp = client.create_experiment(f"scale-fleet-{runs}x{points}-{int(time.time())}")
    t0 = time.perf_counter()
    run_ids = {make_run(store, exp, points, f"r{i}"): points - 1 for i in range(runs)}
    load_s = time.perf_counter() - t0
    print(f"fleet: {runs} runs x {points} points loaded in {load_s:.0f} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="atm-scale-"))
    write_log = tmp / "writes.log"
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(
        root=str(Path(__file__).resolve().parents[1]), bench=str(Path(__file__).resolve().parent), uri=store.uri,
        runs=json.dumps(run_ids), period=interval, seconds=seconds + 30, log=str(write_log))])

    backend = MlflowBackend(store.uri)
    seen: dict[str, list[tuple[float, int]]] = {r: [] for r in run_ids}
    polls = {r: 0 for r in run_ids}
    poll = backend.poll

    def counted_poll(run_id: str) -> Any:
        view = poll(run_id)
        polls[run_id] += 1
        pts = view.history.get("train_loss")
        if pts:
            seen[run_id].append((time.time(), pts[-1][0]))
        return view

    backend.poll = counted_poll  # type: ignore[method-assign]
    kwargs: dict[str, Any] = {"interval": interval}
    if "workers" in Daemon.__init__.__code__.co_varnames:
        kwargs["workers"] = workers
    daemon = Daemon(backend, load_policy("lm"), **kwargs)
    watcher = threading.Thread(target=daemon.watch, args=(list(run_ids),), daemon=True)
    watcher.start()
    # Steady state only: every run's first read of its whole history comes first (reported apart).
    t0 = time.time()
    while min(polls.values()) < 2 and time.time() - t0 < 1800:
        time.sleep(1.0)
    warmup_s = time.time() - t0
    print(f"fleet: every run read once in {warmup_s:.0f} s; measuring for {seconds:.0f} s", flush=True)
    for r in polls:
        polls[r] = 0
    cpu0, wall0 = time.process_time(), time.time()
    time.sleep(seconds)
    cpu1, wall1 = time.process_time(), time.time()
    counts = dict(polls)
    daemon.stop()
    writer.terminate()
    writer.wait(30)
    minutes = (wall1 - wall0) / 60
    rate = [c / minutes / (60 / interval) for c in counts.values()]
    lags = []
    for line in write_log.read_text().splitlines():
        r, step, at = line.split()
        at_f, step_i = float(at), int(step)
        if not wall0 <= at_f <= wall1 - 2 * interval:
            continue
        first = next((t for t, s in seen[r] if s >= step_i and t >= at_f), None)
        if first is not None:
            lags.append(first - at_f)
    rss = _rss_mb()
    result = {
        "runs": runs, "points_per_metric": points, "interval_s": interval, "measured_s": round(wall1 - wall0, 1),
        "daemon_options": {k: v for k, v in kwargs.items()},
        "cpu_s_per_min": round((cpu1 - cpu0) / minutes, 1),
        "polls_per_run_per_min": summary([c / minutes for c in counts.values()]),
        "share_of_rate": {"min": round(min(rate), 3), "p50": round(percentile(rate, .5), 3)},
        "lag_s": summary(lags), "rss_mb": rss, "load_s": round(load_s), "first_reads_s": round(warmup_s),
    }
    print(f"fleet: {runs} runs: {result['cpu_s_per_min']} CPU-s/min, rate share min {result['share_of_rate']['min']}, "
          f"lag p95 {result['lag_s']['p95']:.1f} s, RSS {rss['rss']:.0f} MB", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _rss_mb() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            name, value = line.split(":")
            out["rss" if name == "VmRSS" else "peak"] = int(value.split()[0]) / 1024
    return out


# --------------------------------------------------------------------------- main


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["tick", "fleet", "all"], default="all")
    p.add_argument("--store", choices=["auto", "postgres", "sqlite"], default="auto")
    p.add_argument("--histories", default="2000,20000,100000", help="points per metric for the tick part")
    p.add_argument("--ticks", type=int, default=20)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--points", type=int, default=20_000)
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="2k/20k histories, 10 ticks, 20 runs x 2k for 30 s")
    args = p.parse_args()
    if args.quick:
        args.histories, args.ticks, args.runs, args.points, args.seconds = "2000,20000", 10, 20, 2000, 30.0
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    root = Path(tempfile.mkdtemp(prefix="atm-scale-store-"))
    store = open_store(args.store, root)
    try:
        data: dict[str, Any] = {"store": store.kind}
        if args.part in ("tick", "all"):
            hs = [int(h) for h in args.histories.split(",")]
            data["tick"] = part_tick(store, hs, args.ticks)
            t = data["tick"]
            base = t[str(hs[0])]["tick_ms"]["p50"]
            rows = [[f"{int(h):,}", f"{v['tick_ms']['p50']:.1f}", f"{v['tick_ms']['p95']:.1f}",
                     f"{v['tick_ms']['p50'] / base:.2f}x", f"{v['floor_ms']['p50']:.1f}",
                     f"{v['tick_ms']['p50'] / v['floor_ms']['p50']:.1f}x", f"{v['rebuild_ms']['p50']:.0f}",
                     f"{v['first_tick_s']:.1f}"] for h, v in t.items()]
            write("scale_tick", data, rows,
                  ["points/metric", "tick p50 ms", "tick p95 ms", "vs smallest", "floor p50 ms", "tick/floor",
                   "whole rebuild ms", "first tick s"],
                  notes=f"Store: {store.kind}. One run, 3 metrics, 10 new train steps per tick. Floor: get_run plus "
                        "the windowed read of the new points. Whole rebuild: the snapshot from the whole history, "
                        "which every tick did before telemetry was folded incrementally. "
                        "Command: `.venv/bin/python benchmarks/scale.py --part tick`.")
        if args.part in ("fleet", "all"):
            f = part_fleet(store, args.runs, args.points, args.interval, args.seconds, args.workers)
            data["fleet"] = f
            write("scale_fleet", data, [[str(f["runs"]), f"{f['points_per_metric']:,}", f"{f['cpu_s_per_min']}",
                                         f"{f['polls_per_run_per_min']['p50']:.1f} / {60 / f['interval_s']:.0f}",
                                         f"{f['share_of_rate']['min']:.2f}", f"{f['lag_s']['p50']:.1f}",
                                         f"{f['lag_s']['p95']:.1f}", f"{f['rss_mb']['rss']:.0f}",
                                         f"{f['first_reads_s']}"]],
                  ["runs", "points/metric", "CPU-s/min", "polls/run/min (p50 / rate)", "min share of rate",
                   "lag p50 s", "lag p95 s", "RSS MB", "first reads s"],
                  notes=f"Store: {store.kind}; interval {f['interval_s']} s; a writer process appends 5 steps to "
                        "every run each interval. Measured after every run's first read of its whole history "
                        "(first reads s). Lag: from a point being logged to the first poll that read it. "
                        "Command: `.venv/bin/python benchmarks/scale.py --part fleet`.")
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
