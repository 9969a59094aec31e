"""atm-watch as a service: what the daemon reports as it works, Prometheus metrics, liveness.

The daemon calls a few hooks (:class:`Hooks`; the base class does nothing). :class:`Service`
turns them into

- Prometheus metrics on ``--metrics-port`` (``/metrics``): runs watched, polls, poll (tick)
  latency, decision lag, errors by kind;
- ``/healthz``, which fails (503) when the watch stalls: no poll finished and no worker found
  itself idle for ``stall_after`` seconds, or one poll has been running that long;
- ``/readyz``: the tracker answered once since the start;
- a health file (``--health-file``) rewritten every few seconds while the watch is live, for a
  liveness check without a port (its age is the check).

``prometheus_client`` is imported only when metrics are served, so the daemon runs without it.
"""

from __future__ import annotations

import enum
import http.server
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("atm.watch")

#: A poll that takes longer than this, or this long without any progress, means the watch is stuck.
#: MLflow's client gives up on a dead server after about 2 minutes (30 s timeout, 3 retries with
#: back-off), so a live daemon facing a dead tracker stays under it.
STALL_AFTER_S = 300.0
#: How often the health file is rewritten while the watch is live.
HEALTH_FILE_EVERY_S = 5.0

TICK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LAG_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class ErrorKind(str, enum.Enum):
    """Why a poll (or the listing of an experiment's runs) failed; the ``kind`` label of ``atm_errors_total``."""

    UNREACHABLE = "unreachable"
    POOL_EXHAUSTED = "pool_exhausted"
    NOT_FOUND = "not_found"
    UNEXPECTED = "unexpected"


class Hooks:
    """What the daemon reports as it works. This base ignores it all (no metrics, no health checks).

    Called from the daemon's workers and its watch loop at once: implementations are thread-safe.
    """

    def poll_started(self, run_id: str) -> None:
        """A worker began polling ``run_id``."""

    def poll_finished(self, run_id: str, seconds: float, error: ErrorKind | None = None) -> None:
        """The poll of ``run_id`` ended after ``seconds``, with ``error`` when it failed."""

    def listing_finished(self, error: ErrorKind | None = None) -> None:
        """The experiment's runs were listed (or the listing failed)."""

    def decided(self, lag_s: float | None) -> None:
        """A decision was settled; ``lag_s``: seconds since its evaluation was logged, when known."""

    def watching(self, runs: int) -> None:
        """The number of runs being watched changed."""

    def idle(self) -> None:
        """A worker found no run due, or the watch loop went round: the watch is alive."""


def liveness(now: float, last_progress: float, busy_since: Iterable[tuple[str, float]],
             stall_after: float = STALL_AFTER_S) -> tuple[bool, str]:
    """Whether the watch is live, and why not.

    Args:
        now, last_progress: monotonic seconds; progress is a poll finishing or a worker finding
            nothing to do.
        busy_since: (run id, monotonic start) of every poll in progress.
    Returns:
        (live, a one-line reason for the probe's output).
    """
    stuck = [(rid, now - t) for rid, t in busy_since if now - t > stall_after]
    if stuck:
        rid, age = max(stuck, key=lambda p: p[1])
        return False, (f"stalled: the poll of run {rid} has been running for {age:.0f} s "
                       f"({len(stuck)} poll(s) past {stall_after:.0f} s)")
    quiet = now - last_progress
    if quiet > stall_after:
        return False, f"stalled: no poll finished and no worker was idle for {quiet:.0f} s"
    return True, f"ok: last progress {quiet:.1f} s ago"


class Service(Hooks):
    """Metrics, liveness and the health file of one daemon.

    Args:
        metrics: keep Prometheus metrics (needs ``prometheus_client``: ``pip install 'atm[server]'``).
        health_file: a file rewritten every few seconds while the watch is live.
        stall_after: seconds without progress (or of one poll) after which the watch counts as stalled.
        clock: monotonic seconds (tests pass their own).
    Raises:
        ImportError: ``metrics`` without ``prometheus_client``, naming what to install.
    """

    def __init__(self, *, metrics: bool = True, health_file: str | os.PathLike[str] | None = None,
                 stall_after: float = STALL_AFTER_S, clock: Callable[[], float] = time.monotonic) -> None:
        if stall_after <= 0:
            raise ValueError(f"stall_after must be positive, got {stall_after}")
        self.stall_after = stall_after
        self.clock = clock
        self.health_file = Path(health_file) if health_file is not None else None
        self._lock = threading.Lock()
        self._busy: dict[str, float] = {}
        self._last_progress = clock()
        self._file_written = float("-inf")
        self._writing = False
        self._said_file_error = False
        self.ready = False
        self.registry: Any = None
        self._server: http.server.ThreadingHTTPServer | None = None
        if metrics:
            self._make_metrics()
        if self.health_file is not None:
            try:  # a folder that does not exist or cannot be written is said now, not as a failing probe later
                self._replace_health_file("starting\n")
            except OSError as exc:
                raise OSError(f"cannot write the health file {self.health_file}: {exc.strerror or exc}") from exc

    def _make_metrics(self) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:
            raise ImportError(
                "--metrics-port needs prometheus_client: pip install 'atm[server]' (or pip install prometheus-client)"
            ) from exc
        # A registry of its own: two daemons in one process (tests, the bench) do not clash.
        self.registry = reg = prom.CollectorRegistry()
        self._runs = prom.Gauge("atm_runs_watched", "Runs this daemon is watching", registry=reg)
        self._polls = prom.Counter("atm_polls", "Polls of runs finished (rate(): polls per second)", registry=reg)
        self._tick = prom.Histogram("atm_tick_seconds", "Time to poll one run and act on it", buckets=TICK_BUCKETS,
                                    registry=reg)
        self._lag = prom.Histogram(
            "atm_decision_lag_seconds",
            "From a new evaluation being logged (the job's clock) to the decision on it settled and published",
            buckets=LAG_BUCKETS, registry=reg,
        )
        self._errors = prom.Counter("atm_errors", "Failed polls and listings, by kind", ["kind"], registry=reg)
        for kind in ErrorKind:
            self._errors.labels(kind=kind.value)  # present at 0, so rate() and alerts see them from the start
        quiet = prom.Gauge("atm_seconds_since_progress", "Seconds since a poll finished or a worker was idle",
                           registry=reg)
        quiet.set_function(lambda: self.clock() - self._last_progress)

    # ------------------------------------------------------------------ hooks

    def poll_started(self, run_id: str) -> None:
        with self._lock:
            self._busy[run_id] = self.clock()

    def poll_finished(self, run_id: str, seconds: float, error: ErrorKind | None = None) -> None:
        with self._lock:
            self._busy.pop(run_id, None)
            if error is None:
                self.ready = True
        if self.registry is not None:
            self._polls.inc()
            self._tick.observe(seconds)
            if error is not None:
                self._errors.labels(kind=error.value).inc()
        self._progress()

    def listing_finished(self, error: ErrorKind | None = None) -> None:
        if error is None:
            self.ready = True
        elif self.registry is not None:
            self._errors.labels(kind=error.value).inc()

    def decided(self, lag_s: float | None) -> None:
        if self.registry is not None and lag_s is not None:
            self._lag.observe(max(0.0, lag_s))  # the job's clock may run a little ahead of this one

    def watching(self, runs: int) -> None:
        if self.registry is not None:
            self._runs.set(runs)

    def idle(self) -> None:
        self._progress()

    # ------------------------------------------------------------------ liveness

    def live(self) -> tuple[bool, str]:
        with self._lock:
            busy = list(self._busy.items())
            last = self._last_progress
        return liveness(self.clock(), last, busy, self.stall_after)

    def _progress(self) -> None:
        now = self.clock()
        with self._lock:
            self._last_progress = now
            due = (self.health_file is not None and not self._writing
                   and now - self._file_written >= HEALTH_FILE_EVERY_S)
            self._writing = self._writing or due
        if not due:
            return
        attempted = False
        try:
            attempted = self._write_health_file()
        finally:
            with self._lock:
                self._writing = False
                if attempted:
                    self._file_written = now

    def _write_health_file(self) -> bool:
        """Rewrite the file if the watch is live; returns whether it tried (a stalled watch leaves it to age)."""
        live, why = self.live()
        if not live:
            return False
        try:
            self._replace_health_file(f"{why}\n")
        except OSError as exc:
            if not self._said_file_error:
                self._said_file_error = True
                log.warning("cannot write the health file %s (%s); a liveness check reading it will fail",
                            self.health_file, exc)
        return True

    def _replace_health_file(self, text: str) -> None:
        assert self.health_file is not None
        tmp = self.health_file.with_name(self.health_file.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.health_file)  # whole or not at all: a probe never reads half a file

    # ------------------------------------------------------------------ HTTP

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread; returns the port (0 picks one).

        Raises:
            OSError: the port is taken (the message says which).
        """
        if self.registry is None:
            raise RuntimeError("serve() needs a Service made with metrics=True")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(service.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    live, why = service.live()
                    self._send(200 if live else 503, f"{why}\n".encode())
                elif path == "/readyz":
                    ok = service.ready
                    self._send(200 if ok else 503, b"ready\n" if ok else b"the tracker has not answered yet\n")
                else:
                    self._send(404, b"atm-watch serves /metrics, /healthz and /readyz\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes come every few seconds: not worth a log line each

        try:
            server = http.server.ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from exc
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="atm-metrics", daemon=True).start()
        return int(server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


__all__ = ["STALL_AFTER_S", "ErrorKind", "Hooks", "Service", "liveness"]
