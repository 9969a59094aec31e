"""What a daemon poll costs as runs grow long and many, against the transport floor measured in the same run.

Two parts, each written to ``benchmarks/results/`` as JSON plus a Markdown table:

``tick``: one run whose metrics (train loss, val loss, grad norm) already hold H points each
(H = 2k, 20k, 100k), a job attached (its listener announced on the run) and a writer appending
a few points before every tick, as a live job does. It times ``Daemon.tick`` (poll, reconcile,
fold what is new, decide on a new evaluation), beside, in the same loop, the transport floor
(``get_run`` plus the store's windowed read of just the new points, the two calls a poll cannot do
without) and the whole-history snapshot rebuild that every tick did before telemetry was folded
incrementally. Target: the tick at 100k points within 1.5x of the tick at 2k.

``fleet``: R runs of S steps each (default 200 x 20k: train loss and grad norm a point a step, val loss
every 10), a writer process logging 5 steps to every run each interval (one ``log_batch`` a run), and
in turn, each for a minute after every run was read twice: the transport floor (pollers that only call
``get_run`` and read the new steps of the metrics that moved, on the daemon's schedule) and the daemon
(``atm-watch --experiment``, rules; with ``--shards N``, N processes ``--shard k/N``). Reported: each
process's own CPU-seconds per minute (from /proc: what else runs on the cores does not count), polls
per run per minute against the configured rate, lag from a point being logged to the poll that read it
and from an evaluation being logged to the daemon's decision on it (p50/p95), RSS, runs polled by two
shards. Targets: at most one core, >= 95% of the rate, decision lag p95 <= 2 intervals, RSS <= 1 GiB.

Histories are generated into MLflow's own tables (``metrics`` and ``latest_metrics``, the rows
``log_batch`` writes) by SQL, and one run's are read back through ``MlflowClient`` before measuring;
runs, tags and every new point go through the tracker. ``--store postgres`` runs a real ``mlflow
server`` on a PostgreSQL 15 database started here (``initdb``/``pg_ctl`` as the ``postgres`` user);
``sqlite`` uses a local store file; ``auto`` (default) takes postgres when it can start. ``--lock
PATH`` sets up first (run the script under ``nice``) and waits for the lock before measuring.

    .venv/bin/python benchmarks/scale.py                 # both parts (about 15 minutes)
    .venv/bin/python benchmarks/scale.py --part tick --quick
    nice .venv/bin/python benchmarks/scale.py --part fleet --runs 1000 --shards 4 --lock /tmp/atm-cpu.lock
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
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


def history_rows(run_id: str, steps: int, start_ms: int) -> list[tuple[str, float, int, str, int]]:
    """What a job that ran ``steps`` steps logged: train loss and grad norm every step, val loss every
    ``EVAL_EVERY``; rows of (key, value, timestamp ms, run id, step), a millisecond a step."""
    rows = []
    for key in METRICS:
        every = EVAL_EVERY if key == "val_loss" else 1
        rows += [(key, curve(key, step), start_ms + step, run_id, step) for step in range(0, steps, every)]
    return rows


def last_rows(run_id: str, steps: int, start_ms: int) -> list[tuple[str, float, int, str, int]]:
    """The newest point of each metric: what MLflow keeps in its ``latest_metrics`` table (``get_run`` reads it)."""
    out = []
    for key in METRICS:
        every = EVAL_EVERY if key == "val_loss" else 1
        step = (steps - 1) // every * every
        out.append((key, curve(key, step), start_ms + step, run_id, step))
    return out


class Store:
    """A tracking store to benchmark against: its URI for the daemon, and bulk loading of history."""

    uri: str
    kind: str

    def load(self, run_ids: list[str], steps: int, start_ms: int) -> None:
        """Every run's history straight into MLflow's tables: the rows ``log_batch`` would have written,
        in ``metrics`` (every point) and ``latest_metrics`` (the newest point of each metric)."""
        raise NotImplementedError

    def pids(self) -> list[int]:
        """Processes serving the store, started here."""
        return []

    def close(self) -> None:
        pass


class SqliteStore(Store):
    kind = "sqlite"

    def __init__(self, root: Path) -> None:
        self.path = root / "mlflow.db"
        self.uri = f"sqlite:///{self.path}"
        from mlflow.tracking import MlflowClient

        MlflowClient(self.uri).search_experiments()  # creates the tables

    def load(self, run_ids: list[str], steps: int, start_ms: int) -> None:
        import sqlite3

        with sqlite3.connect(self.path) as db:
            for rid in run_ids:
                db.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                               "VALUES (?, ?, ?, ?, ?, 0)", history_rows(rid, steps, start_ms))
                db.executemany("INSERT INTO latest_metrics (key, value, timestamp, run_uuid, step, is_nan) "
                               "VALUES (?, ?, ?, ?, ?, 0)", last_rows(rid, steps, start_ms))


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
        subprocess.run(as_pg + ["pg_ctl", "-D", str(self.data), "-o", f"-p {port} -k /tmp -c fsync=off "
                                "-c max_connections=200 -c shared_buffers=1GB", "-l",
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

    def load(self, run_ids: list[str], steps: int, start_ms: int) -> None:
        """Generated in the database (``generate_series``), the same values as :func:`history_rows`, with
        the metrics table's keys and indexes dropped meanwhile and built again after (as a restore does):
        kept, they made it about 35k rows a second here; nothing crosses a socket a point at a time."""
        import psycopg2

        value = ("CASE m.key WHEN 'grad_norm' THEN 1.0 + 0.1 * sin(s.step / 7.0) "
                 "ELSE 0.5 + 3.0 / (1.0 + s.step / 500.0) + CASE m.key WHEN 'val_loss' THEN 0.05 ELSE 0.0 END END")
        every = "(VALUES ('train_loss', 1), ('val_loss', %(eval)s), ('grad_norm', 1)) AS m(key, every)"
        with psycopg2.connect(self.dsn) as db, db.cursor() as cur:
            cur.execute("SET maintenance_work_mem = '1GB'")
            cur.execute("SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
                        "WHERE conrelid = 'metrics'::regclass AND contype IN ('p', 'f')")
            constraints = cur.fetchall()
            cur.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'metrics' AND indexname NOT IN "
                        "(SELECT conname FROM pg_constraint WHERE conrelid = 'metrics'::regclass)")
            indexes = cur.fetchall()
            for name, _ in constraints:
                cur.execute(f'ALTER TABLE metrics DROP CONSTRAINT "{name}"')
            for name, _ in indexes:
                cur.execute(f'DROP INDEX "{name}"')
            for chunk in range(0, len(run_ids), 50):
                cur.execute(
                    f"INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                    f"SELECT m.key, {value}, %(start)s + s.step, r.id, s.step, false "
                    f"FROM unnest(%(runs)s::text[]) AS r(id) CROSS JOIN {every} CROSS JOIN LATERAL "
                    f"(SELECT g * m.every AS step FROM generate_series(0, (%(steps)s - 1) / m.every) g) s",
                    {"runs": run_ids[chunk: chunk + 50], "steps": steps, "start": start_ms, "eval": EVAL_EVERY})
            for name, definition in constraints:
                cur.execute(f'ALTER TABLE metrics ADD CONSTRAINT "{name}" {definition}')
            for _, definition in indexes:
                cur.execute(definition)
            cur.execute(
                f"INSERT INTO latest_metrics (key, value, timestamp, run_uuid, step, is_nan) "
                f"SELECT m.key, {value}, %(start)s + s.step, r.id, s.step, false "
                f"FROM unnest(%(runs)s::text[]) AS r(id) CROSS JOIN {every} "
                f"CROSS JOIN LATERAL (SELECT (%(steps)s - 1) / m.every * m.every AS step) s",
                {"runs": run_ids, "steps": steps, "start": start_ms, "eval": EVAL_EVERY})
        db = psycopg2.connect(self.dsn)
        try:
            db.autocommit = True  # VACUUM runs outside a transaction
            with db.cursor() as cur:
                cur.execute("VACUUM ANALYZE metrics")
                cur.execute("VACUUM ANALYZE latest_metrics")
        finally:
            db.close()

    def pids(self) -> list[int]:
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        return [self.server.pid, postmaster]

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


def make_runs(store: Store, experiment_id: str, count: int, steps: int, prefix: str = "r") -> dict[str, int]:
    """``count`` runs that each ran ``steps`` steps, with a job's listener announced on each (through the
    tracker), their histories bulk-loaded; returns run id -> last step."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.tracking import MlflowClient

    from atm.adapters.mlflow_backend import MlflowChannel
    from atm.schema import ListenerInfo

    client = MlflowClient(store.uri)

    def one(i: int) -> str:
        run_id = client.create_run(experiment_id, run_name=f"{prefix}{i}").info.run_id
        MlflowChannel(run_id, store.uri).announce(ListenerInfo(
            run_id=run_id, knobs=["lr", "weight_decay", "dropout"],
            values={"lr": 1e-3, "weight_decay": 0.0, "dropout": 0.1}, actions=["stop", "rollback"],
            apply_mode="auto", pid=os.getpid(), started_at=time.time()))
        return run_id

    with ThreadPoolExecutor(8) as pool:
        run_ids = list(pool.map(one, range(count)))
    start_ms = int(time.time() * 1000) - steps - 1000
    store.load(run_ids, steps, start_ms)
    return {rid: steps - 1 for rid in run_ids}


def make_run(store: Store, experiment_id: str, points: int, name: str) -> str:
    """One run of ``points`` steps (see :func:`make_runs`)."""
    return next(iter(make_runs(store, experiment_id, 1, points, prefix=name)))


def check_load(uri: str, run_id: str, steps: int) -> dict[str, Any]:
    """What the tracker returns for a loaded run, through MlflowClient: every point of every metric, the
    values :func:`curve` gives, and the newest of each in ``get_run``. Raises AssertionError otherwise."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    counts = {}
    for key in METRICS:
        every = EVAL_EVERY if key == "val_loss" else 1
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        want = list(range(0, steps, every))
        assert [m.step for m in hist] == want, f"{key}: {len(hist)} points, expected {len(want)}"
        bad = [m.step for m in hist if abs(m.value - curve(key, m.step)) > 1e-9]
        assert not bad, f"{key}: values differ from curve() at steps {bad[:5]}"
        counts[key] = len(hist)
    latest = {m.key: m.step for m in client.get_run(run_id).data._metric_objs}
    want_latest = {k: (steps - 1) // e * e for k, e in (("train_loss", 1), ("val_loss", EVAL_EVERY), ("grad_norm", 1))}
    assert latest == want_latest, f"get_run's latest steps {latest}, expected {want_latest}"
    return {"run_id": run_id, "points": counts, "latest_steps": latest}


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
#
# Three kinds of child process (``scale.py --child KIND CONFIG``), so that each one's CPU time is its own:
# the writer (the jobs), the floor pollers and the daemons. Each poller writes one line per poll,
# ``P <time> <run> <newest train step it saw>``; a daemon also ``D <time> <decision lag s>`` per decision.


def _events(path: Path) -> Any:
    """A line-buffered event file shared by threads."""
    fh = open(path, "w", buffering=1)
    lock = threading.Lock()

    def say(line: str) -> None:
        with lock:
            fh.write(line + "\n")

    return say


def child_writer(cfg: dict[str, Any]) -> None:
    """The jobs: every ``period`` seconds each run logs ``per_cycle`` train steps (one ``log_batch``), an
    evaluation every ``EVAL_EVERY`` steps; a line ``<run> <step> <time>`` once the tracker took it."""
    from concurrent.futures import ThreadPoolExecutor

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg["uri"])
    steps: dict[str, int] = dict(cfg["runs"])
    say = _events(Path(cfg["log"]))
    period, n = cfg["period"], cfg["per_cycle"]

    def one(rid: str) -> None:
        steps[rid] = append(client, rid, steps[rid], n)
        say(f"{rid} {steps[rid]} {time.time():.3f}")

    with ThreadPoolExecutor(cfg["threads"]) as pool:
        while True:
            started = time.time()
            list(pool.map(one, list(steps)))
            say(f"cycle {time.time() - started:.3f} {started:.3f}")
            time.sleep(max(0.0, period - (time.time() - started)))


def child_floor(cfg: dict[str, Any]) -> None:
    """The transport floor: the same runs, workers and schedule as a daemon, and per poll only the reads
    no poll can do without, through the tracker: ``get_run`` (the newest point of every metric) and, for
    each metric that moved, the store's step-window read of the new steps (the call the daemon makes)."""
    from mlflow.tracking import MlflowClient
    from mlflow.utils.rest_utils import http_request

    from atm.watcher.schedule import PollSchedule
    from atm.watcher.shard import Shard, owns

    client = MlflowClient(cfg["uri"])
    store = client._tracking_client.store
    creds = store.get_host_creds() if hasattr(store, "get_host_creds") else None
    say = _events(Path(cfg["events"]))
    shard = Shard(*cfg["shard"])
    exp = client.get_experiment_by_name(cfg["experiment"]).experiment_id
    runs = [r.info.run_id for r in client.search_runs([exp], "attributes.status = 'RUNNING'", max_results=5000)
            if owns(r.info.run_id, shard)]
    seen: dict[str, dict[str, tuple[int, int]]] = {r: {} for r in runs}
    schedule, lock = PollSchedule(cfg["interval"]), threading.Condition()
    for r in runs:
        schedule.add(r, time.monotonic())

    def poll(rid: str) -> None:
        run = client.get_run(rid)
        last = seen[rid]
        for m in run.data._metric_objs:
            prev = last.get(m.key)
            if prev is not None and (m.step, m.timestamp) > prev:
                if creds is None:  # a database store in this process
                    store.get_metric_history_bulk_interval([rid], m.key, 2500, prev[0] + 1, m.step)
                else:
                    resp = http_request(creds, "/ajax-api/2.0/mlflow/metrics/get-history-bulk-interval", "GET",
                                        params={"run_ids": rid, "metric_key": m.key, "start_step": prev[0] + 1,
                                                "end_step": m.step, "max_results": 2500}, timeout=30)
                    resp.raise_for_status()
                    resp.json()
            last[m.key] = (m.step, m.timestamp)
        say(f"P {time.time():.3f} {rid} {last.get('train_loss', (-1, 0))[0]}")

    def work() -> None:
        while True:
            with lock:
                rid = schedule.take(time.monotonic())
                if rid is None:
                    wait = schedule.wait_time(time.monotonic())
                    lock.wait(0.5 if wait is None else min(wait, 0.5))
                    continue
            try:
                poll(rid)
            except Exception as exc:  # noqa: BLE001 - counted as a missed poll; said once a run
                say(f"E {time.time():.3f} {rid} {type(exc).__name__}")
            with lock:
                schedule.give_back(rid, time.monotonic())
                lock.notify()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(cfg["workers"])]
    for t in threads:
        t.start()
    threads[0].join()


def child_daemon(cfg: dict[str, Any]) -> None:
    """``atm-watch --experiment E [--shard k/N]`` as a user runs it (rules proposer), with one line per poll
    and per decision written out."""
    import atm.watcher.service as service
    from atm.adapters.mlflow_backend import MlflowBackend
    from atm.watcher.cli import watch_main

    say = _events(Path(cfg["events"]))
    poll = MlflowBackend.poll

    def counted(self: MlflowBackend, run_id: str, select: Any = None) -> Any:
        view = poll(self, run_id, select)
        pts = view.history.get("train_loss")
        say(f"P {time.time():.3f} {run_id} {pts[-1][0] if pts else -1}")
        return view

    def decided(self: Any, lag_s: float | None) -> None:
        say(f"D {time.time():.3f} {lag_s if lag_s is not None else 'nan'}")

    MlflowBackend.poll = counted  # type: ignore[method-assign]
    service.Hooks.decided = decided  # type: ignore[method-assign]
    k, n = cfg["shard"]
    argv = ["--experiment", cfg["experiment"], "--tracking-uri", cfg["uri"], "--interval", str(cfg["interval"]),
            "--workers", str(cfg["workers"]), "--no-table", "--log-level", "WARNING"]
    sys.exit(watch_main(argv + (["--shard", f"{k}/{n}"] if n > 1 else [])))


CHILDREN = {"writer": child_writer, "floor": child_floor, "daemon": child_daemon}


def spawn(kind: str, cfg: dict[str, Any], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", kind, json.dumps(cfg)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def cpu_s(pid: int) -> float:
    """The process's CPU time (user + system) so far, in seconds: its own, whatever else shares the cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            name, value = line.split(":")
            out["rss" if name == "VmRSS" else "peak"] = round(int(value.split()[0]) / 1024, 1)
    return out


def read_events(paths: list[Path]) -> tuple[list[dict[str, list[tuple[float, int]]]], list[tuple[float, float]], int]:
    """Per file: run -> [(time, train step seen)]; all decisions (time, lag); errors."""
    polls, decisions, errors = [], [], 0
    for path in paths:
        mine: dict[str, list[tuple[float, int]]] = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            parts = line.split()
            if parts[0] == "P" and len(parts) == 4:
                mine.setdefault(parts[2], []).append((float(parts[1]), int(parts[3])))
            elif parts[0] == "D" and len(parts) == 3:
                decisions.append((float(parts[1]), float(parts[2])))
            elif parts[0] == "E":
                errors += 1
        polls.append(mine)
    return polls, decisions, errors


def measure_pollers(kind: str, cfg: dict[str, Any], shards: int, run_ids: list[str], tmp: Path, write_log: Path,
                    seconds: float, interval: float) -> dict[str, Any]:
    """Start ``shards`` pollers of ``kind``, wait until every run was read twice (the first read of a daemon
    is the whole history), measure for ``seconds``, stop them; the figures of the window."""
    files = [tmp / f"{kind}-{k}.events" for k in range(shards)]
    procs = [spawn(kind, {**cfg, "shard": [k, shards], "events": str(files[k])}, tmp / f"{kind}-{k}.log")
             for k in range(shards)]
    started = time.time()
    try:
        while True:
            time.sleep(2.0)
            for k, p in enumerate(procs):
                if p.poll() is not None:
                    raise RuntimeError(f"{kind} {k} exited: {(tmp / f'{kind}-{k}.log').read_text()[-3000:]}")
            polls, _, _ = read_events(files)
            counts: dict[str, int] = {}
            for mine in polls:
                for r, ps in mine.items():
                    counts[r] = counts.get(r, 0) + len(ps)
            if len(counts) >= len(run_ids) and min(counts.values()) >= 2:
                break
            if time.time() - started > 3600:
                raise RuntimeError(f"{kind}: {sum(1 for c in counts.values() if c >= 2)} of {len(run_ids)} runs "
                                   "read twice after an hour")
        warm_s = time.time() - started
        print(f"fleet: {kind}: every run read twice after {warm_s:.0f} s; measuring {seconds:.0f} s", flush=True)
        time.sleep(interval)
        t0, cpu0 = time.time(), [cpu_s(p.pid) for p in procs]
        time.sleep(seconds)
        t1, cpu1 = time.time(), [cpu_s(p.pid) for p in procs]
        rss = [rss_mb(p.pid) for p in procs]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    polls, decisions, errors = read_events(files)
    minutes = (t1 - t0) / 60
    per_run: dict[str, list[tuple[float, int]]] = {}
    owners: dict[str, int] = {}
    for mine in polls:
        for r, ps in mine.items():
            owners[r] = owners.get(r, 0) + 1
            per_run.setdefault(r, []).extend(ps)
    rates, counted = [], []
    for r in run_ids:
        ts = sorted(t for t, _ in per_run.get(r, []) if t0 <= t <= t1)
        counted.append(len(ts) / minutes)
        # Polls per minute from the spacing of the window's polls (its count alone is off by one at the edges).
        rates.append((len(ts) - 1) / (ts[-1] - ts[0]) * 60 if len(ts) >= 2 and ts[-1] > ts[0] else len(ts) / minutes)
    full = 60 / interval
    lags = []
    for line in write_log.read_text().splitlines():
        r, step, at = line.split()
        if r == "cycle":
            continue
        at_f, step_i = float(at), int(step)
        if not t0 <= at_f <= t1 - 2 * interval:
            continue
        first = next((t for t, s in sorted(per_run.get(r, [])) if s >= step_i and t >= at_f), None)
        if first is not None:
            lags.append(first - at_f)
    dec = [lag for t, lag in decisions if t0 <= t <= t1 and not math.isnan(lag)]
    cpu = [round((c1 - c0) / minutes, 1) for c0, c1 in zip(cpu0, cpu1)]
    return {
        "processes": shards, "workers_each": cfg["workers"], "measured_s": round(t1 - t0, 1),
        "first_reads_s": round(warm_s), "cpu_s_per_min": cpu, "cpu_s_per_min_total": round(sum(cpu), 1),
        "rss_mb": rss, "polls_per_run_per_min": summary(rates), "polls_counted_per_run_per_min": summary(counted),
        "share_of_rate": {"min": round(min(rates) / full, 3), "p5": round(percentile(rates, .05) / full, 3),
                          "p50": round(percentile(rates, .5) / full, 3),
                          "runs_below_95pct": sum(1 for x in rates if x < 0.95 * full)},
        "read_lag_s": summary(lags), "decision_lag_s": summary(dec), "decisions": len(dec), "poll_errors": errors,
        "runs_polled": len(owners), "runs_polled_by_two": sum(1 for c in owners.values() if c > 1),
        "runs_never_polled": len(set(run_ids) - set(owners)),
    }


def descendants(roots: list[int]) -> list[int]:
    """``roots`` and every process under them."""
    parent: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += parent.get(pid, [])
    return out


def hold_lock(path: str | None, store: Store) -> float:
    """Wait for the machine's measurement lock (held until this process exits), then give this process and the
    servers started here normal priority again: the set-up ran niced while others measured. Seconds waited."""
    if path is None:
        return 0.0
    import fcntl

    started = time.time()
    fh = open(path, "a")
    fcntl.flock(fh, fcntl.LOCK_EX)
    hold_lock.fh = fh  # type: ignore[attr-defined]  # kept open: the lock lasts as long as the process
    for pid in descendants([os.getpid(), *store.pids()]):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, 0)
        except OSError:
            pass
    return time.time() - started


def part_fleet(store: Store, runs: int, steps: int, interval: float, seconds: float, workers: int,
               shards: int, writer_threads: int, lock: str | None = None) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.uri)
    name = f"scale-fleet-{runs}x{steps}-{int(time.time())}"
    exp = client.create_experiment(name)
    t0 = time.perf_counter()
    run_steps = make_runs(store, exp, runs, steps)
    load_s = time.perf_counter() - t0
    check = check_load(store.uri, next(iter(run_steps)), steps)
    print(f"fleet: {runs} runs x {steps} steps loaded in {load_s:.0f} s; the server returns them: {check}", flush=True)
    waited = hold_lock(lock, store)
    if lock:
        print(f"fleet: measuring (waited {waited:.0f} s for {lock})", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="atm-scale-"))
    write_log = tmp / "writes.log"
    writer = spawn("writer", {"uri": store.uri, "runs": run_steps, "period": interval, "per_cycle": 5,
                              "threads": writer_threads, "log": str(write_log)}, tmp / "writer.log")
    out: dict[str, Any] = {"runs": runs, "steps": steps, "points_per_metric": {
        k: len(range(0, steps, EVAL_EVERY if k == "val_loss" else 1)) for k in METRICS},
        "interval_s": interval, "load_s": round(load_s), "load_check": check, "shards": shards}
    try:
        cfg = {"uri": store.uri, "experiment": name, "interval": interval, "workers": workers}
        for kind in ("floor", "daemon"):
            out[kind] = measure_pollers(kind, cfg, shards, list(run_steps), tmp, write_log, seconds, interval)
            f = out[kind]
            print(f"fleet: {kind}: CPU-s/min {f['cpu_s_per_min']}, rate share min {f['share_of_rate']['min']}, "
                  f"read lag p95 {f['read_lag_s']['p95']:.1f} s, decision lag p95 {f['decision_lag_s']['p95']:.1f} s, "
                  f"RSS {[r['rss'] for r in f['rss_mb']]} MB", flush=True)
        if writer.poll() is not None:
            raise RuntimeError(f"the writer exited: {(tmp / 'writer.log').read_text()[-3000:]}")
    finally:
        writer.terminate()
        writer.wait(30)
    cycles = [float(line.split()[1]) for line in write_log.read_text().splitlines() if line.startswith("cycle")]
    out["writer"] = {"threads": writer_threads, "steps_per_cycle": 5, "cycle_s": summary(cycles),
                     "cycles_late": sum(1 for c in cycles if c > interval)}
    shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- main


def fleet_table(f: dict[str, Any]) -> list[list[str]]:
    rows = []
    for kind in ("floor", "daemon"):
        m = f[kind]
        dec = m["decision_lag_s"]
        rows.append([
            kind, f"{f['runs']} x {f['steps']:,}", str(m["processes"]),
            f"{max(m['cpu_s_per_min'])} / {m['cpu_s_per_min_total']}",
            f"{m['polls_per_run_per_min']['p50']:.1f} / {60 / f['interval_s']:.0f}",
            f"{m['share_of_rate']['min']:.2f} / {m['share_of_rate']['p5']:.2f} ({m['share_of_rate']['runs_below_95pct']})",
            f"{m['read_lag_s']['p50']:.1f} / {m['read_lag_s']['p95']:.1f}",
            "-" if not dec["n"] else f"{dec['p50']:.1f} / {dec['p95']:.1f}",
            f"{max(r['rss'] for r in m['rss_mb']):.0f}", str(m["runs_polled_by_two"]), f"{m['first_reads_s']}",
        ])
    return rows


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        CHILDREN[sys.argv[2]](json.loads(sys.argv[3]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["tick", "fleet", "all"], default="all")
    p.add_argument("--store", choices=["auto", "postgres", "sqlite"], default="auto")
    p.add_argument("--histories", default="2000,20000,100000", help="points per metric for the tick part")
    p.add_argument("--ticks", type=int, default=20)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--points", type=int, default=20_000, help="fleet: steps each run has logged (train metrics: a "
                   "point a step; val_loss every 10)")
    p.add_argument("--interval", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--workers", type=int, default=4, help="fleet: poll workers of each daemon (and floor poller)")
    p.add_argument("--shards", type=int, default=1, help="fleet: daemon processes, each atm-watch --shard k/N")
    p.add_argument("--writer-threads", type=int, default=8)
    p.add_argument("--lock", default=None, metavar="PATH",
                   help="fleet: set up (servers, history) first, then wait for this lock file before measuring; run "
                        "the script under `nice` and the set-up disturbs others' measurements less")
    p.add_argument("--quick", action="store_true", help="2k/20k histories, 10 ticks, 20 runs x 2k for 30 s")
    args = p.parse_args()
    if args.quick:
        args.histories, args.ticks, args.runs, args.points, args.seconds = "2000,20000", 10, 20, 2000, 30.0
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: the servers started here stop too
    # One key for the children (the daemons sign with it): no key file is created in the user's home.
    os.environ.setdefault("ATM_KEY", "scale-benchmark-key-0123456789")
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
            f = part_fleet(store, args.runs, args.points, args.interval, args.seconds, args.workers, args.shards,
                           args.writer_threads, args.lock)
            data["fleet"] = f
            command = (f"nice .venv/bin/python benchmarks/scale.py --part fleet --runs {args.runs} --points {args.points} "
                       f"--shards {args.shards} --seconds {args.seconds:g} --lock /tmp/atm-cpu.lock")
            write("scale_fleet" if args.shards == 1 else "scale_fleet_sharded", data, fleet_table(f),
                  ["poller", "runs x steps", "processes", "CPU-s/min (max process / all)",
                   "polls/run/min p50 / rate", "share of rate min / p5 (runs < 95%)", "read lag p50 / p95 s",
                   "decision lag p50 / p95 s", "RSS MB (max process)", "runs polled by two", "first reads s"],
                  notes=f"Store: {store.kind}, a real `mlflow server` (2 workers); interval {f['interval_s']} s, "
                        f"{args.workers} poll workers a process. History bulk-loaded into MLflow's tables (train "
                        "metrics a point a step, val_loss every 10 steps), checked through MlflowClient. A writer "
                        "process logs 5 steps to every run each interval (one log_batch a run) during both "
                        "measurements. floor: only get_run and the step-window read of the new steps, the same "
                        "schedule. daemon: atm-watch --experiment (rules), one process a shard. CPU: each process's "
                        "own CPU time. The machine's 2 cores are shared by PostgreSQL, the mlflow server, the writer "
                        f"and the pollers. Command: `{command}`.")
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
