"""atm-watch as a service: liveness, the health file, and the metrics endpoint served on loopback."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from atm.watcher.service import STALL_AFTER_S, ErrorKind, Service, liveness


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_liveness_fails_on_a_stuck_poll_or_no_progress_and_says_which() -> None:
    assert liveness(100.0, 99.0, [("a", 98.0)], stall_after=60) == (True, "ok: last progress 1.0 s ago")
    live, why = liveness(100.0, 99.0, [("a", 20.0), ("b", 35.0), ("c", 90.0)], stall_after=60)
    assert not live and why == "stalled: the poll of run a has been running for 80 s (2 poll(s) past 60 s)"
    live, why = liveness(100.0, 30.0, [], stall_after=60)
    assert not live and why == "stalled: no poll finished and no worker was idle for 70 s"


def test_the_health_file_is_kept_fresh_only_while_the_watch_is_live(tmp_path: Path) -> None:
    clock = FakeClock()
    health = tmp_path / "health"
    service = Service(metrics=False, health_file=health, stall_after=60, clock=clock)
    service.idle()
    assert health.read_text().startswith("ok")
    health.unlink()
    clock.now += 1
    service.idle()
    assert not health.exists()  # rewritten every few seconds, not on every wake of every worker
    service.poll_started("stuck")
    clock.now += 100
    service.idle()  # other workers are idle, but one poll hangs: the file is left to age
    assert not health.exists()
    assert service.live() == (False, "stalled: the poll of run stuck has been running for 100 s (1 poll(s) past 60 s)")
    service.poll_finished("stuck", 100.0, ErrorKind.UNREACHABLE)
    assert health.exists() and service.live()[0]


def test_a_health_file_that_cannot_be_written_is_said_at_start(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"cannot write the health file .*/missing/health: No such file or directory"):
        Service(metrics=False, health_file=tmp_path / "missing" / "health")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_healthz_and_readyz_over_http() -> None:
    pytest.importorskip("prometheus_client")
    clock = FakeClock()
    service = Service(clock=clock)
    port = service.serve(0, host="127.0.0.1")
    base = f"http://127.0.0.1:{port}"
    try:
        assert get(f"{base}/readyz")[0] == 503
        service.watching(3)
        service.poll_started("a")
        service.poll_finished("a", 0.04)
        service.poll_finished("b", 0.3, ErrorKind.POOL_EXHAUSTED)
        service.listing_finished(ErrorKind.UNREACHABLE)
        service.decided(1.5)
        service.decided(None)  # an evaluation whose time is unknown: counted nowhere
        code, text = get(f"{base}/metrics")
        assert code == 200
        lines = set(text.splitlines())
        assert "atm_runs_watched 3.0" in lines
        assert "atm_polls_total 2.0" in lines
        assert 'atm_tick_seconds_bucket{le="0.05"} 1.0' in lines and "atm_tick_seconds_count 2.0" in lines
        assert "atm_decision_lag_seconds_count 1.0" in lines and 'atm_decision_lag_seconds_bucket{le="2.0"} 1.0' in lines
        assert 'atm_errors_total{kind="pool_exhausted"} 1.0' in lines
        assert 'atm_errors_total{kind="unreachable"} 1.0' in lines
        assert 'atm_errors_total{kind="not_found"} 0.0' in lines and 'atm_errors_total{kind="unexpected"} 0.0' in lines
        assert get(f"{base}/readyz") == (200, "ready\n")
        assert get(f"{base}/healthz")[0] == 200
        clock.now += STALL_AFTER_S + 1
        code, text = get(f"{base}/healthz")
        assert code == 503 and text.startswith("stalled: no poll finished")
        assert get(f"{base}/other")[0] == 404
    finally:
        service.close()


def test_metrics_without_prometheus_client_name_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'atm\[server\]'"):
        Service()
    Service(metrics=False)  # the daemon itself needs nothing more


def test_atm_watch_says_what_to_install_for_metrics(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                    mlflow_uri: str) -> None:
    from atm.watcher.cli import watch_main

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    code = watch_main(["--experiment", "e", "--tracking-uri", mlflow_uri, "--metrics-port", "0", "--no-table"])
    assert code == 2
    assert "--metrics-port needs prometheus_client: pip install 'atm[server]'" in capsys.readouterr().err
