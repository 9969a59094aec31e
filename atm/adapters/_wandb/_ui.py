"""What atm shows in the W&B UI, written by the listener through the job's own ``wandb.run``.

Only the live process may write the run's history, tags and files: values edited from outside
are overwritten by it (wandb issue 4377). So the listener, inside the job, writes:

- charts ``atm/<param>`` of every value in force, against ``atm/step`` (the job's step when the
  value took effect; declared with ``define_metric`` as their x axis);
- a ``wandb.Table`` ``atm/interventions``: seq, decided-at step, applied step, changes
  (old -> new), action, diagnosis, rationale, source, the policy's verdict, status;
- tags naming the latest interventions (``atm#3 lr 0.003->0.001``; W&B caps tags at 64 characters);
- the daemon's decision log ``files/atm/interventions.jsonl`` registered with ``run.save`` so it
  is uploaded with the run.

W&B's ``_step`` only moves forward, and ``run.log`` without ``commit=False`` would add a step of
its own, shifting the job's own step sequence by one each time an update lands. So every write
here uses ``commit=False``: the values join the row the job is building and are committed by the
job's next ``run.log`` (or by ``run.finish()``). ``run.log`` may be called from the listener's
thread: wandb hands each call to its own asyncio thread, and atm never advances the step.

Everything here is best effort: the ack file is what the daemon relies on, and a failing chart
(the run already finished, a wandb error) is logged once and never blocks an ack.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from atm.adapters._wandb._txlog import ATM_STEP_KEY as STEP_KEY
from atm.schema import Ack, DecisionRecord, Update, fmt

log = logging.getLogger("atm.wandb")

TAG_LIMIT = 64
TAG_PREFIX = "atm#"
#: How many "atm#..." tags to keep on the run (older ones are removed; the table keeps them all).
TAGS_KEPT = 3
TABLE_KEY = "atm/interventions"
#: The alerts the listener raised, one JSON object a line, under the run's files folder.
ALERTS_FILE = "atm/alerts.jsonl"
TABLE_COLUMNS = [
    "seq", "decided_step", "applied_step", "changes", "action", "diagnosis", "rationale", "source", "verdict", "status",
]


def intervention_tag(update: Update) -> str:
    """A short tag naming one intervention, at most 64 characters. Pure."""
    parts = [f"{k} {fmt(c.old)}->{fmt(c.new)}" for k, c in update.changes.items()]
    if update.action is not None:
        parts.append(update.action.value)
    tag = f"{TAG_PREFIX}{update.seq} " + ", ".join(parts or [update.diagnosis.value])
    return tag if len(tag) <= TAG_LIMIT else tag[: TAG_LIMIT - 1] + "…"


def merge_tags(current: tuple[str, ...] | list[str], new_tag: str, kept: int = TAGS_KEPT) -> tuple[str, ...]:
    """The user's tags untouched, then the newest ``kept`` atm tags. Pure."""
    user = [t for t in current if not t.startswith(TAG_PREFIX)]
    ours = [t for t in current if t.startswith(TAG_PREFIX) and t != new_tag] + [new_tag]
    return tuple(user + ours[-kept:])


def table_row(update: Update, ack: Ack, record: DecisionRecord | None) -> list[Any]:
    """One row of the interventions table. Pure."""
    changes = ", ".join(f"{k} {fmt(c.old)} -> {fmt(c.new)}" for k, c in update.changes.items())
    return [
        update.seq,
        update.step,
        ack.applied_step,
        changes,
        update.action.value if update.action else "",
        update.diagnosis.value,
        (record.rationale if record else update.rationale),
        update.source,
        record.reason if record else "",
        ack.status + (f": {ack.error}" if ack.error else ""),
    ]


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(line + "\n")


class RunUI:
    """Writes atm's charts, table, tags and files through a live ``wandb`` run object."""

    def __init__(self, run: Any, files_dir: Path, online: bool):
        self.run = run
        self.files_dir = files_dir
        self.online = online
        self.rows: list[list[Any]] = []
        self._saved: set[Path] = set()
        self._failed: set[str] = set()
        self._guard("define metrics", self._define_metrics)

    def _define_metrics(self) -> None:
        self.run.define_metric(STEP_KEY, hidden=True)
        self.run.define_metric("atm/*", step_metric=STEP_KEY)

    def log_values(self, values: Mapping[str, float], step: int | None) -> None:
        data: dict[str, Any] = {f"atm/{k}": float(v) for k, v in values.items() if math.isfinite(v)}
        if not data:
            return
        if step is not None:
            data[STEP_KEY] = int(step)
        self._guard("log atm/* values", lambda: self.run.log(data, commit=False))

    def record(self, update: Update, ack: Ack, record: DecisionRecord | None) -> None:
        """Show one acknowledged update: a table row and a tag."""
        import wandb

        self.rows = [r for r in self.rows if r[0] != update.seq] + [table_row(update, ack, record)]
        rows = [list(r) for r in self.rows]
        self._guard("log the interventions table",
                    lambda: self.run.log({TABLE_KEY: wandb.Table(columns=TABLE_COLUMNS, data=rows)}, commit=False))
        if ack.status == "applied":
            tag = intervention_tag(update)
            self._guard("set run tags", lambda: setattr(self.run, "tags", merge_tags(tuple(self.run.tags or ()), tag)))

    def alert(self, title: str, text: str, level: str) -> None:
        """Raise a W&B alert (the run's alerts, and e-mail or Slack as the user's W&B settings say) and
        keep it in ``files/atm/alerts.jsonl``: an offline run's alert waits in its transaction log until
        ``wandb sync``, and the file is readable before that."""
        import json
        import time

        self._guard("raise an alert", lambda: self.run.alert(title=title, text=text, level=level))
        path = self.files_dir / ALERTS_FILE
        entry = {"title": title, "text": text, "level": level, "time": time.time()}
        self._guard("record the alert", lambda: _append_line(path, json.dumps(entry)))
        self.save(path, "end")

    def save(self, path: Path, policy: str) -> None:
        """Register a file under the run's files dir for upload (``end`` once; ``now`` every time)."""
        if not path.exists() or (policy == "end" and path in self._saved):
            return
        self._saved.add(path)
        self._guard(f"save {path.name}",
                    lambda: self.run.save(str(path), base_path=str(self.files_dir), policy=policy, glob=False))

    def _guard(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            if what in self._failed:
                log.debug("atm: could not %s on the W&B run: %r", what, exc)
            else:
                self._failed.add(what)
                log.warning("atm: could not %s on the W&B run (%r); the update itself is unaffected", what, exc)
