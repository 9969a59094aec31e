"""Online W&B runs (``entity/project/run_id``) through the public API.

No W&B server is reachable from the test machine, so the API is played by fakes shaped like the
objects ``wandb.Api()`` returns in wandb 0.31 (``FakeWandbApi``, ``FakeWandbApiRun``,
``FakeWandbFile``: the attributes and methods atm calls, with the error types wandb raises).
Two tests use the real ``wandb.Api`` where it fails before any network: no API key, and a key
with a server that refuses connections on loopback.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from atm.adapters.base import BackendUnavailable, RunNotFound
from atm.adapters._wandb._local import RunLayout, write_atomic
from atm.adapters._wandb._online import Pacer, RemoteInbox, ApiHandle, translate
from atm.adapters._wandb._txlog import FILE_HEADER
from atm.adapters.wandb_backend import WandbBackend, WandbChannel
from atm.policies import load_policy
from atm.watcher.poll import keys_to_read
from atm.schema import Ack, Change, DecisionRecord, Diagnosis, ListenerInfo, Status
from wandb.apis.public.runs import RunNotFoundError
from wandb.errors import AuthenticationError, CommError, UsageError


class FakeWandbFile:
    """A run file as ``wandb.apis.public.File`` exposes it (fake)."""

    def __init__(self, name: str, text: str):
        self.name = name
        self.text = text
        self.md5 = hashlib.md5(text.encode()).hexdigest()
        self.size = len(text.encode())
        self.downloads = 0

    def download(self, root: str = ".", replace: bool = False, exist_ok: bool = False) -> Any:
        self.downloads += 1
        path = Path(root) / self.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.text)
        return open(path)


class FakeWandbApiRun:
    """A ``wandb.apis.public.Run`` (fake): history rows, run files, state, and a count of requests."""

    def __init__(self, path: str, state: str = "running"):
        self.entity, self.project, self.id = path.split("/")
        self.state = state
        self.display_name = "fake-run"
        self.rows: list[dict[str, Any]] = []
        self.stored: dict[str, FakeWandbFile] = {}
        self.requests: Counter[str] = Counter()
        self.fail_next: list[Exception] = []
        self.scans: list[tuple[str, int]] = []
        self._keys_snapshot: dict[str, Any] = {}
        self._summary: dict[str, Any] = {}
        self.load(force=True)
        self.requests.clear()

    # what the job does (through its own wandb.run, on the real server)
    def log(self, step: int, **values: Any) -> None:
        self.rows.append({"_step": step, "_timestamp": 1_700_000_000.0 + step, **values})

    def save_file(self, name: str, text: str) -> None:
        self.stored[name] = FakeWandbFile(name, text)

    # the public API surface atm uses
    def _request(self, what: str) -> None:
        self.requests[what] += 1
        if self.fail_next:
            raise self.fail_next.pop(0)

    def load(self, force: bool = False) -> dict[str, Any]:
        self._request("load")
        keys: dict[str, Any] = {}
        for row in self.rows:
            for k, v in row.items():
                kind = "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else "string"
                keys.setdefault(k, {"typeCounts": [{"type": kind, "count": 0}]})["typeCounts"][0]["count"] += 1
        self._keys_snapshot = {"lastStep": max((r["_step"] for r in self.rows), default=-1), "keys": keys}
        self._summary = {k: v for row in self.rows for k, v in row.items()}  # each key's latest, _timestamp too
        return {}

    @property
    def history_keys(self) -> dict[str, Any]:
        return self._keys_snapshot

    @property
    def summary_metrics(self) -> dict[str, Any]:
        return self._summary

    @property
    def lastHistoryStep(self) -> int:  # noqa: N802 - wandb's name
        self._request("lastHistoryStep")
        return max((r["_step"] for r in self.rows), default=-1)

    def scan_history(self, keys: list[str], min_step: int = 0, page_size: int = 1000, use_cache: bool = True) -> list[dict]:
        self._request("lastHistoryStep")  # wandb's scan asks for the last step first
        self._request("scan")
        self.scans.append((keys[0], min_step))
        return [{"_step": r["_step"], "_timestamp": r["_timestamp"], **{k: r[k] for k in keys}}
                for r in self.rows if r["_step"] >= min_step and all(k in r for k in keys)]

    def files(self, names: list[str] | None = None, pattern: str | None = None, per_page: int = 50) -> list[FakeWandbFile]:
        self._request("files")
        if names:
            return [f for n, f in self.stored.items() if n in names]
        rx = re.compile("^" + re.escape(pattern or "%").replace("%", ".*") + "$")
        return [f for n, f in sorted(self.stored.items()) if rx.match(n)]

    def upload_file(self, path: str, root: str = ".") -> FakeWandbFile:
        self._request("upload")
        name = os.path.relpath(path, root)
        self.stored[name] = FakeWandbFile(name, Path(path).read_text())
        return self.stored[name]


class FakeWandbApi:
    """``wandb.Api`` (fake): runs by path; unknown paths raise wandb's own RunNotFoundError."""

    def __init__(self, *runs: FakeWandbApiRun):
        self.runs_by_path = {f"{r.entity}/{r.project}/{r.id}": r for r in runs}
        self._handed_out: set[str] = set()

    def run(self, path: str) -> FakeWandbApiRun:
        if path not in self.runs_by_path:
            raise RunNotFoundError(f"Could not find run {path}")
        run = self.runs_by_path[path]
        if path not in self._handed_out:  # like wandb: the first api.run() loads, later calls return the cached object
            self._handed_out.add(path)
            run.load(force=True)
        return run

    def runs(self, path: str, filters: dict | None = None, order: str = "+created_at",
             per_page: int = 50) -> list[FakeWandbApiRun]:
        state = (filters or {}).get("state")
        return [r for p, r in self.runs_by_path.items() if p.startswith(path + "/") and (state is None or r.state == state)]


PATH = "team/proj/r1"


def record(seq: int, step: int = 20) -> DecisionRecord:
    return DecisionRecord(
        run_id=PATH, seq=seq, step=step, status=Status.PENDING, source="rules", diagnosis=Diagnosis.OVERFITTING,
        changes={"lr": Change(old=1e-3, new=5e-4)}, rationale="val loss rising",
    )


def backend_for(api: FakeWandbApi, tmp_path: Path) -> WandbBackend:
    return WandbBackend(tmp_path / "wandb", api_factory=lambda: api, min_request_interval=0)


def test_poll_scans_each_numeric_key_once_from_where_it_stopped(tmp_path: Path) -> None:
    run = FakeWandbApiRun(PATH)
    for s in range(10):
        run.log(s, train_loss=1.0 / (s + 1), phase="warmup", **({"val_loss": 2.0 - s / 10} if s % 5 == 4 else {}))
    backend = backend_for(FakeWandbApi(run), tmp_path)
    view = backend.poll(PATH)
    assert view.status == "RUNNING" and view.name == "fake-run" and view.moved
    assert [s for s, _ in view.history["train_loss"]] == list(range(10))
    assert view.history["val_loss"] == [(4, pytest.approx(1.6)), (9, pytest.approx(1.1))]
    assert "phase" not in view.history, "string keys are not scanned"
    assert sorted(run.scans) == [("train_loss", 0), ("val_loss", 0)]

    run.requests.clear()
    assert backend.poll(PATH).moved is False
    assert run.requests["scan"] == 0, "nothing moved: no history is read"
    assert run.requests["load"] == 1 and run.requests["files"] == 1

    for s in range(10, 15):
        run.log(s, train_loss=0.05, **({"val_loss": 0.9} if s == 14 else {}))
    view = backend.poll(PATH)
    assert run.scans[-2:] == [("train_loss", 10), ("val_loss", 10)]
    assert [s for s, _ in view.history["train_loss"]] == list(range(15))
    assert [s for s, _ in view.history["val_loss"]] == [4, 9, 14]
    assert view.last_metric_time == pytest.approx(1_700_000_014.0)


def test_poll_scans_only_the_keys_picked(tmp_path: Path) -> None:
    run = FakeWandbApiRun(PATH)
    noise = {"samples_per_s": 900.0, "epoch": 0.5, "throughput/tokens_per_s": 9000.0, **{f"grad_norm/layer_{i}": 0.1 for i in range(8)}}
    for s in range(10):
        run.log(s, train_loss=1.0 / (s + 1), phase="warmup", **noise, **({"val_loss": 2.0 - s / 10} if s % 5 == 4 else {}))
    run.log(10, **{"atm/lr": 1e-3})
    lm = load_policy("lm")
    backend = backend_for(FakeWandbApi(run), tmp_path)
    view = backend.poll(PATH, select=lambda keys: keys_to_read(lm, keys))
    assert sorted(run.scans) == [("atm/lr", 0), ("train_loss", 0), ("val_loss", 0)], "atm/* is scanned anyway"
    assert sorted(view.history) == ["atm/lr", "train_loss", "val_loss"]
    assert sorted(view.keys) == sorted(["atm/lr", "train_loss", "val_loss", *noise]), "every numeric key is listed"

    # Only keys no role reads move: the keys picked are scanned (the last step moved: W&B does not say
    # which keys did), the others not; the summary tells the run is alive.
    run.scans.clear()
    for s in range(11, 14):
        run.log(s, **noise)
    view = backend.poll(PATH, select=lambda keys: keys_to_read(lm, keys))
    assert sorted(run.scans) == [("atm/lr", 11), ("train_loss", 11), ("val_loss", 11)] and not view.moved
    assert view.last_metric_time == pytest.approx(1_700_000_013.0)

    # A key picked later is scanned from its start.
    run.scans.clear()
    view = backend.poll(PATH, select=lambda keys: {*keys_to_read(lm, keys), "samples_per_s"})
    assert run.scans == [("samples_per_s", 0)]
    assert [s for s, _ in view.history["samples_per_s"]] == [*range(10), 11, 12, 13]


def test_publish_reaches_a_remote_listener_and_its_ack_comes_back(tmp_path: Path) -> None:
    run = FakeWandbApiRun(PATH)
    api = FakeWandbApi(run)
    backend = backend_for(api, tmp_path)
    assert backend.read_log(PATH) == []
    backend.reserve_seq(PATH, 1)
    backend.publish(record(1))
    backend.publish(record(1))  # idempotent by seq: one file, replaced
    backend.write_log(PATH, [record(1)])
    assert sorted(run.stored) == ["atm/inbox/update-000001.json", "atm/interventions.jsonl", "atm/seq"]

    # The job's side: its own run directory, and the W&B server for updates from elsewhere.
    job_dir = tmp_path / "job" / "wandb" / "run-20260101_120000-r1"
    (job_dir / "files").mkdir(parents=True)
    (job_dir / "run-r1.wandb").write_bytes(FILE_HEADER)
    now = [0.0]
    channel = WandbChannel(job_dir, remote_path=PATH, api_factory=lambda: api, polling=True)
    channel.remote.clock = lambda: now[0]  # type: ignore[union-attr]
    try:
        assert [u.seq for u in channel.fetch(0)] == [1]
        assert channel.fetch(0)[0].changes["lr"].new == pytest.approx(5e-4)
        listed = run.requests["files"]
        channel.fetch(1)
        assert run.requests["files"] == listed, "the server is asked at most every remote_interval seconds"
        now[0] += 10
        assert channel.fetch(1) == [] and run.requests["files"] == listed + 1
        channel.ack(Ack(run_id=PATH, seq=1, status="applied", applied_step=25, values={"lr": 5e-4}))
    finally:
        channel.close()
    # What the job's run.save(policy="now") uploads; the daemon reads it from the file listing.
    layout = RunLayout(job_dir)
    run.save_file("atm/outbox/ack-000001.json", (layout.outbox / "ack-000001.json").read_text())
    run.save_file("atm/listener.json", ListenerInfo(run_id="r1", knobs=["lr"], values={"lr": 5e-4}, apply_mode="auto",
                                                    pid=1, started_at=0.0).model_dump_json())
    view = backend.poll(PATH)
    assert view.acks[1].applied_step == 25 and view.listener is not None and view.last_seq == 1
    assert [r.seq for r in backend.read_log(PATH)] == [1]

    fresh = backend_for(api, tmp_path)  # a restarted daemon finds everything on the run
    view = fresh.poll(PATH)
    assert list(view.updates) == [1] and list(view.acks) == [1] and view.last_seq == 1


def test_only_signed_update_files_are_the_runs_and_the_rest_is_reported(tmp_path: Path) -> None:
    from atm.signing import key_from_text, sign

    run = FakeWandbApiRun(PATH)
    api = FakeWandbApi(run)
    backend = backend_for(api, tmp_path)
    backend.publish(record(1))
    run.save_file("atm/inbox/update-000002.json", record(2).to_update().model_dump_json())           # unsigned
    other = key_from_text("a-colleagues-own-atm-key", "other")
    run.save_file("atm/inbox/update-000003.json", sign(record(3).to_update(), other).model_dump_json())
    run.save_file("atm/inbox/update-000004.json", "{broken")
    run.save_file("atm/outbox/ack-000009.json", Ack(run_id=PATH, seq=9, status="applied", applied_step=1).model_dump_json())
    view = backend.poll(PATH)
    assert list(view.updates) == [1] and view.acks == {} and view.last_seq == 4
    reported = " | ".join(str(p) for p in view.problems)
    for needle in ("update #2 is not signed", f"update #3 is signed with key id {other.key_id}",
                   "file atm/inbox/update-000004.json: not a valid update", "ack #9 is not signed"):
        assert needle in reported
    inbox = RemoteInbox(PATH, ApiHandle(lambda: api), min_interval=0)
    inbox.pacer.min_interval = 0
    assert sorted(inbox.fetch(0)) == [1, 2, 3]  # the listener checks signatures itself, and acks what it refuses
    assert [p.seq for p in inbox.problems] == [4] and "not a valid update" in inbox.problems[0].reason


def test_approvals_written_by_atm_approve_come_back_signed_and_foreign_ones_are_reported(tmp_path: Path) -> None:
    from atm.schema import Approval
    from atm.signing import key_from_text, sign

    run = FakeWandbApiRun(PATH)
    backend = backend_for(FakeWandbApi(run), tmp_path)
    backend.write_approval(PATH, Approval(seq=1, decision="approve", by="alice@box"))
    other = key_from_text("a-colleagues-own-atm-key", "other")
    run.save_file("atm/approvals/approval-000002.json",
                  sign(Approval(run_id=PATH, seq=2, decision="approve"), other).model_dump_json())
    view = backend.poll(PATH)
    assert [(a.seq, a.decision, a.run_id, a.by) for a in view.approvals] == [(1, "approve", PATH, "alice@box")]
    assert view.approvals[0].signature
    assert any(f"approval #2 is signed with key id {other.key_id}" in str(p) for p in view.problems)


def test_remote_inbox_downloads_each_update_once() -> None:
    run = FakeWandbApiRun(PATH)
    api = FakeWandbApi(run)
    run.save_file("atm/inbox/update-000001.json", record(1).to_update().model_dump_json())
    run.save_file("atm/inbox/update-000002.json", "{broken")
    now = [0.0]
    inbox = RemoteInbox(PATH, ApiHandle(lambda: api), min_interval=5, clock=lambda: now[0])
    inbox.pacer.min_interval = 0
    assert list(inbox.fetch(0)) == [1]
    assert list(inbox.fetch(0)) == [1]  # within min_interval: served from memory
    assert run.requests["files"] == 1
    now[0] += 6
    run.save_file("atm/inbox/update-000003.json", record(3).to_update().model_dump_json())
    assert list(inbox.fetch(1)) == [3]
    assert run.requests["files"] == 2
    assert [f.downloads for f in run.stored.values()] == [1, 1, 1], "each file, even a malformed one, is fetched once"


def test_rate_limits_are_retried_with_backoff_then_reported() -> None:
    slept: list[float] = []
    pacer = Pacer(min_interval=0, retries=3, sleep=slept.append)
    answers: list[Any] = [CommError("HTTP 429: rate limit exceeded"), CommError("HTTP 429: rate limit exceeded"), "ok"]

    def call() -> Any:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    assert pacer.call("history", call) == "ok"
    assert slept == [1.0, 2.0]
    with pytest.raises(BackendUnavailable, match="429"):
        pacer.call("history", lambda: (_ for _ in ()).throw(CommError("HTTP 429: slow down")))


def test_requests_for_one_run_are_spaced() -> None:
    t = [0.0]
    slept: list[float] = []

    def sleep(d: float) -> None:
        slept.append(d)
        t[0] += d

    pacer = Pacer(min_interval=0.5, clock=lambda: t[0], sleep=sleep)
    for _ in range(3):
        pacer.call("x", lambda: None)
    assert slept == [0.5, 0.5] and pacer.calls == 3


@pytest.mark.parametrize(
    ("error", "expected", "hint"),
    [
        (RunNotFoundError("Could not find run team/proj/nope"), RunNotFound, "Could not find"),
        (UsageError("No API key configured. Use `wandb login` to log in."), RunNotFound, "WANDB_API_KEY"),
        (AuthenticationError("Failed to verify credentials"), RunNotFound, "WANDB_BASE_URL"),
        (CommError("HTTP 403: permission denied"), RunNotFound, "refused access"),
        (CommError("HTTP 502: bad gateway"), BackendUnavailable, "502"),
        (ConnectionError("connection refused"), BackendUnavailable, "refused"),
        (TimeoutError("timed out"), BackendUnavailable, "timed out"),
    ],
)
def test_api_errors_map_onto_the_contract(error: Exception, expected: type, hint: str) -> None:
    got = translate("W&B run team/proj/x", error)
    assert type(got) is expected and hint in str(got)


def test_missing_run_state_and_project_listing(tmp_path: Path) -> None:
    done = FakeWandbApiRun("team/proj/r2", state="crashed")
    api = FakeWandbApi(FakeWandbApiRun(PATH), done)
    backend = backend_for(api, tmp_path)
    with pytest.raises(RunNotFound, match="Could not find run"):
        backend.poll("team/proj/nope")
    assert backend.poll("team/proj/r2").status == "KILLED"
    assert backend.running_runs("team/proj") == [PATH]
    assert backend.experiment_runs("team/proj") == [PATH, "team/proj/r2"]  # ended runs too


def test_server_trouble_is_backend_unavailable(tmp_path: Path) -> None:
    run = FakeWandbApiRun(PATH)
    backend = backend_for(FakeWandbApi(run), tmp_path)
    backend.poll(PATH)
    run.fail_next = [CommError("HTTP 500: internal error")]
    with pytest.raises(BackendUnavailable, match="500"):
        backend.poll(PATH)
    assert backend.poll(PATH).status == "RUNNING"  # and it recovers on the next poll


def test_a_channel_without_credentials_keeps_its_local_inbox(tmp_path: Path) -> None:
    job_dir = tmp_path / "wandb" / "run-20260101_120000-r1"
    (job_dir / "files").mkdir(parents=True)
    (job_dir / "run-r1.wandb").write_bytes(FILE_HEADER)
    write_atomic(RunLayout(job_dir).inbox / "update-000001.json", record(1).to_update().model_dump_json())

    def no_key() -> Any:
        raise UsageError("No API key configured. Use `wandb login` to log in.")

    channel = WandbChannel(job_dir, remote_path=PATH, api_factory=no_key, polling=True)
    try:
        assert [u.seq for u in channel.fetch(0)] == [1]
        assert channel.remote is None, "missing credentials switch the remote side off instead of retrying"
    finally:
        channel.close()


class FakeLiveRun:
    """The attributes of a live ``wandb.run`` that WandbChannel.from_run reads (fake)."""

    def __init__(self, run_dir: Path, mode: str):
        self.id = "r1"
        self.entity, self.project = "team", "proj"
        self.offline = mode == "offline"
        self.dir = str(run_dir / "files")
        self.settings = type("S", (), {"mode": mode, "sync_dir": str(run_dir)})()
        self.tags: tuple[str, ...] = ()
        self.defined: list[tuple] = []

    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        self.defined.append((args, kwargs))


@pytest.mark.parametrize(("mode", "remote"), [("offline", None), ("online", PATH)])
def test_channel_from_a_live_run(tmp_path: Path, mode: str, remote: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATM_WANDB_REMOTE", raising=False)
    run_dir = tmp_path / "wandb" / "run-20260101_120000-r1"
    (run_dir / "files").mkdir(parents=True)
    channel = WandbChannel.from_run(FakeLiveRun(run_dir, mode))
    assert channel is not None
    try:
        assert channel.run_id == "r1" and channel.layout.run_dir == run_dir
        assert (channel.remote.path if channel.remote else None) == remote
    finally:
        channel.close()
    assert WandbChannel.from_run(FakeLiveRun(run_dir, "disabled")) is None
    monkeypatch.setenv("ATM_WANDB_REMOTE", "0")
    off = WandbChannel.from_run(FakeLiveRun(run_dir, "online"))
    assert off is not None and off.remote is None
    off.close()


NO_NETWORK_POLL = """
import sys, time
from atm.adapters.wandb_backend import WandbBackend
from atm.adapters.base import BackendError
t = time.time()
try:
    WandbBackend(api_timeout=3).poll("team/proj/r1")
except BackendError as exc:
    print(type(exc).__name__, round(time.time() - t, 1), exc)
    sys.exit(3)
"""


def run_isolated(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """The real wandb.Api in a clean process: no key, no netrc, no W&B settings from this machine."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    clean.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "cfg"), WANDB_SILENT="true", **env)
    return subprocess.run([sys.executable, "-c", NO_NETWORK_POLL], capture_output=True, text=True, timeout=90, env=clean)


@pytest.mark.timeout(120)
def test_no_api_key_fails_at_once_with_what_to_do(tmp_path: Path) -> None:
    import http.server
    import threading

    # A server that answers HTTP (404 to everything), so that the missing key is the only problem.
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = run_isolated(tmp_path, WANDB_BASE_URL=f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert out.returncode == 3, out.stdout + out.stderr
    assert out.stdout.startswith("RunNotFound") and "WANDB_API_KEY" in out.stdout


@pytest.mark.timeout(120)
def test_no_server_and_no_api_key_says_the_server_cannot_be_reached(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_isolated(tmp_path, WANDB_BASE_URL=f"http://127.0.0.1:{port}")
    assert out.returncode == 3, out.stdout + out.stderr
    assert out.stdout.startswith("RunNotFound") and "could not reach the W&B server" in out.stdout
    assert "--wandb-dir" in out.stdout  # the way out for an offline run


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("listening", [False, True], ids=["nothing-listening", "accepts-never-answers"])
def test_a_server_that_does_not_answer_fails_within_the_timeout(tmp_path: Path, listening: bool) -> None:
    import socket

    server = socket.socket()  # a loopback port: refused, or accepted and then never answered
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if listening:
        server.listen(8)
    else:
        server.close()
    started = time.monotonic()
    try:
        out = run_isolated(tmp_path, WANDB_API_KEY="local-" + "0" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}")
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit: wandb's exit hook is waiting for a service still retrying a dead server")
    finally:
        server.close()
    assert out.returncode == 3, out.stdout + out.stderr
    kind, seconds = out.stdout.split()[:2]
    assert kind == "RunNotFound" and "could not reach" in out.stdout and "WANDB_BASE_URL" in out.stdout
    assert float(seconds) < 15, "api_timeout=3 must bound the check (wandb's default waits ~20 s)"
    assert time.monotonic() - started < 60, "the process must also exit, not wait on wandb-core's retries"
