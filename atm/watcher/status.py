"""What the daemon shows while it runs: a live table on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from atm.adapters.base import WANDB_RUN_DIR_RE
from atm.watcher.report import RunStatus

if TYPE_CHECKING:
    from rich.table import Table

log = logging.getLogger("atm.watch")

_SHOWN = ("state", "step", "diagnosis", "decisions", "applied", "pending", "last", "problems", "note")


def log_changes() -> Callable[[RunStatus], None]:
    """An ``on_change`` callback that logs one line (INFO, logger ``atm.watch``) whenever a run's visible
    status changes: ``run <id>: <status_text>``, the shape of every other line the daemon logs about a run."""
    last: dict[str, tuple[Any, ...]] = {}
    lock = threading.Lock()

    def on_change(s: RunStatus) -> None:
        # The step alone moves at every poll; log when something else changed. "deciding on step N"
        # lasts milliseconds with the rules (the live table shows it; a log needs only the outcome).
        pending = "" if s.pending.startswith("deciding") else s.pending
        key = tuple(pending if f == "pending" else getattr(s, f) for f in _SHOWN if f != "step")
        with lock:
            if last.get(s.run_id) == key:
                return
            last[s.run_id] = key
        log.info("run %s: %s", s.run_id, status_text(s))

    return on_change


def status_text(s: RunStatus) -> str:
    """A run's status in words, the message of its log line. Pure.

    ``brawny-crab-588, step 200, watching, overfitting, interventions 0 applied / 1, pending #1 awaiting
    approval, last #1 @200 ...``; a run not started yet (``--wait``) reads as progress, not as a failure.
    """
    name = f"{s.name}, " if s.name and s.name != short_id(s.run_id) else ""
    if s.state == "waiting":
        return f"{name}waiting, {s.pending}"
    pending = "" if s.pending.startswith("deciding") else s.pending
    return (
        f"{name}step {s.step}, {s.state}"
        + (f", {s.diagnosis}" if s.diagnosis else "")
        + f", interventions {s.applied} applied / {s.decisions}"
        + (f", pending {pending}" if pending else "")
        + (f", last {s.last}" if s.last else "")
        + (f", {s.problems} message{'s' if s.problems != 1 else ''} not taken" if s.problems else "")
        + (f", {s.note}" if s.note else "")
        + (f", error {s.error[:120]}{'…' if len(s.error) > 120 else ''}" if s.error else "")
    )


def short_id(run_id: str) -> str:
    """A run as the user will recognise it: an MLflow id's first 12 characters; for a W&B run folder
    or path (``wandb/offline-run-20260101_120000-abc123``, ``entity/project/abc123``), its id."""
    tail = run_id.rstrip("/").rsplit("/", 1)[-1]
    m = WANDB_RUN_DIR_RE.match(tail)
    if m:
        return m.group(2)
    return tail if tail != run_id else run_id[:12]


#: The live table's columns: (header, width, share of the width left). A column with no share is as wide
#: as its longest value can be (steps up to 9 digits; "99 applied / 99"); the others are at least that
#: wide and share the rest of the console in fixed proportions. No width depends on what the cells hold
#: now, so every frame's columns start where the last frame's did (measured from their content, they
#: moved whenever a diagnosis or a decision changed), on a console too narrow for them as well.
COLUMNS: tuple[tuple[str, int, int], ...] = (
    ("run", 12, 0),  # short_id: an MLflow id's first 12 characters, a W&B id (8)
    ("name", 6, 2),
    ("step", 9, 0),
    ("state", 11, 2),  # "no listener", "unreachable"
    ("diagnosis", 9, 2),
    ("interventions", 15, 0),
    ("pending", 8, 3),
    ("last decision", 12, 4),
    ("not taken", 9, 0),
)


def status_table(statuses: Iterable[RunStatus]) -> Table:
    """One frame of the live table: a rich ``Table`` of the runs' statuses, as wide as the console. Pure."""
    from rich.table import Table

    t = Table(title="atm-watch", expand=True)
    for header, width, ratio in COLUMNS:
        # A width with a ratio is the column's least width (rich's rule for flexible columns).
        t.add_column(header, overflow="fold", width=width, ratio=ratio or None,
                     justify="right" if header in ("step", "not taken") else "left")
    for s in statuses:
        t.add_row(short_id(s.run_id), s.name, str(s.step), s.state + (f" ({s.error[:40]})" if s.error else ""),
                  s.diagnosis + (f" ({s.note})" if s.note else ""), f"{s.applied} applied / {s.decisions}", s.pending,
                  s.last, str(s.problems) if s.problems else "")
    return t


def live_table(daemon: Any) -> Callable[[], None]:
    """Start a rich Live table refreshed twice a second; returns a function that stops it."""
    from rich.live import Live

    def render() -> Table:
        return status_table(list(daemon.status.values()))

    live = Live(render(), refresh_per_second=2, transient=False)
    live.start()
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(0.5):
            live.update(render())

    th = threading.Thread(target=loop, daemon=True, name="atm-table")
    th.start()

    def close() -> None:
        stop.set()
        th.join(2)
        live.update(render())
        live.stop()

    return close
