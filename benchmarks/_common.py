"""Shared by the benchmarks: write figures as JSON + a short Markdown table, and print them; start servers."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "p50": percentile(xs, 0.5), "p95": percentile(xs, 0.95), "mean": statistics.fmean(xs) if xs else float("nan")}


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}


def write(name: str, data: dict[str, Any], table: list[list[str]], header: list[str], notes: str = "") -> None:
    """Write results/NAME.json and results/NAME.md and print the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {**data, "machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    md = f"# {name}\n\n" + "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else "")
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
    print(f"(written to {RESULTS / (name + '.json')} and .md)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mlflow_server(root: Path) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on loopback with a sqlite store under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{root / 'server.db'}"
    subprocess.run([sys.executable, "-c", f"from mlflow.tracking import MlflowClient; MlflowClient({db!r}).search_experiments()"],
                   check=True, capture_output=True)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", db,
         "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
        env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError((root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start in 120 s")
