"""Report: what the daemon shows of a run (its status line) and of its decisions (``atm history``)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from atm.adapters.base import RunView
from atm.policies import COUNTED, COUNTED_DRY
from atm.schema import DecisionRecord, Status, fmt
from atm.watcher.poll import run_step


@dataclass
class RunStatus:
    """What the status table shows for one run."""

    run_id: str
    name: str = ""
    step: int = 0
    state: str = "starting"
    diagnosis: str = ""
    applied: int = 0
    decisions: int = 0
    pending: str = ""
    last: str = ""
    listener: bool = False
    error: str = ""
    #: Messages on the run that were not taken (forged, foreign-key or malformed tags, stray acks), each counted once.
    problems: int = 0
    #: Why the watcher stopped managing the run for a reason it cannot get past ("" while it manages it):
    #: atm-watch exits non-zero and says this.
    gave_up: str = ""
    #: What the user should fix for the run to be judged at all (roles no logged metric maps), "" when nothing.
    note: str = ""


def status_fields(
    records: Sequence[DecisionRecord], view: RunView, *, deciding: str | None, dry_run: bool, state: str | None = None,
    waiting: str = "",
) -> dict[str, Any]:
    """The status line's fields for a run read just now. ``deciding`` is the pending text of a
    decision in flight (None when there is none); ``waiting``, why nothing may be changed now."""
    # The same decisions the validator counts against this daemon's budgets: a live daemon after a
    # dry run does not show the dry run's decisions as its own.
    counted = [r for r in records if r.status in (COUNTED_DRY if dry_run else COUNTED)]
    pending = next((r for r in records if r.status == Status.PENDING), None)
    held = next((r for r in records if r.status == Status.AWAITING_APPROVAL), None)
    return dict(
        name=view.name,
        step=run_step(view),
        state=state or ("deciding" if deciding is not None else ("no listener" if view.listener is None else "watching")),
        applied=sum(r.status == Status.APPLIED for r in records),
        decisions=len(counted),
        pending=(f"#{pending.seq} waiting for the job" if pending else
                 f"#{held.seq} awaiting approval" if held else (deciding or waiting[:160])),
        last=records[-1].summary() if records else "",
        listener=view.listener is not None,
        error="",
    )


def history_rows(records: Sequence[DecisionRecord]) -> list[dict[str, object]]:
    """The ``atm history --json`` items."""
    return [
        {
            "seq": r.seq,
            "step": r.step,
            "applied_step": r.applied_step,
            "effective_step": r.effective_step,
            "applied_values": r.applied_values,
            "status": r.status.value,
            "changes": {k: {"old": c.old, "new": c.new} for k, c in r.changes.items()},
            "action": r.action.value if r.action else None,
            "diagnosis": r.diagnosis.value,
            "label": r.label(),
            "rationale": r.rationale,
            "source": r.source,
            "reason": r.reason,
            "decided_at": r.decided_at,
            "applied_at": r.applied_at,
            "effect": r.effect.label.value if r.effect else None,
            "effect_detail": r.effect.model_dump(mode="json") if r.effect else None,
            "reverts": r.reverts,
            "approval": r.approval,
        }
        for r in records
    ]


def print_history(run_id: str, records: Sequence[DecisionRecord]) -> None:
    """The ``atm history`` table."""
    rows = history_rows(records)
    if not rows:
        print(f"no interventions on run {run_id}")
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"atm interventions — run {run_id}")
    # "decided at": the step of the evaluation the decision answers; "applied at": where the change shows on
    # the same axis (the first point the job logged after applying it). Their distance is the apply delay.
    for col in ("seq", "decided at", "applied at", "status", "diagnosis", "changes", "effect", "source",
                "rationale / reason"):
        t.add_column(col, overflow="fold")
    for r in rows:
        changes = ", ".join(change_cell(k, v, r["applied_values"]) for k, v in r["changes"].items())  # type: ignore[union-attr, arg-type]
        if r["action"]:
            changes = (changes + ", " if changes else "") + str(r["action"])
        why = str(r["rationale"]) if r["status"] in ("applied", "pending", "dry-run") else str(r["reason"])
        if r["reverts"] is not None:
            why = f"reverts #{r['reverts']}: {why}"
        if r["approval"]:
            why = f"{r['approval']}; {why}"
        t.add_row(str(r["seq"]), str(r["step"]), applied_cell(r), str(r["status"]), str(r["label"]),
                  changes or "—", effect_cell(r), str(r["source"]), clip(why))
    Console(width=None if sys.stdout.isatty() else 160).print(t)


#: The longest rationale a table cell shows; ``--json`` has every record whole.
CELL_CHARS = 400


def clip(text: str, limit: int = CELL_CHARS) -> str:
    """``text``, or its first words up to ``limit`` characters and a pointer to the whole (cut mid-word
    and without a mark, a reason read as if it ended there). Pure."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " … (whole: atm history --json)"


def change_cell(name: str, change: dict[str, float], in_force: dict[str, float]) -> str:
    """``lr 1e-3→5e-4``, and what the job reported in force after applying it when that differs, or that
    the job applied the update without this change (a knob it does not have: the ack names it)."""
    cell = f"{name} {fmt(change['old'])}→{fmt(change['new'])}"
    if in_force and name not in in_force:
        return cell + " (not applied)"
    now = in_force.get(name)
    if now is not None and not math.isclose(now, change["new"], rel_tol=0.01):
        cell += f" (in force: {fmt(now)})"
    return cell


def effect_cell(row: dict[str, object]) -> str:
    """``helped (1.41 vs 1.60 projected)``; ``…`` while an applied change is still being measured."""
    detail = row.get("effect_detail")
    if not isinstance(detail, dict):
        return "…" if row["status"] == "applied" else ""
    if detail["label"] == "unknown":
        return f"unknown ({detail['note']})" if detail.get("note") else "unknown"
    return f"{detail['label']} ({fmt(detail['measured'])} vs {fmt(detail['projected'])} projected)"


def applied_cell(row: dict[str, object]) -> str:
    """Where the change took effect on the run's step axis; the job's own count until that is known."""
    if row["effective_step"] is not None:
        return str(row["effective_step"])
    return "" if row["applied_step"] is None else f"(job step {row['applied_step']})"
