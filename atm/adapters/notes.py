"""Notifications where users look: the note at the top of an MLflow run (the daemon writes it) and a
W&B alert (only the job's own process can raise one, so the listener does). Pure text from atm's
records; the backends and the channel do the writing.

Only the interventions a person would want to hear about make one: a stop, a rollback, a revert of a
change measured harmful, and an update refused (by the policy's validator or by the job).
"""

from __future__ import annotations

import re

from atm.schema import Action, DecisionRecord, Status, Update, fmt

#: MLflow's run description: the UI shows it at the top of the run page.
MLFLOW_NOTE_TAG = "mlflow.note.content"
#: Where atm's part of the note starts; what the user wrote above it is kept.
NOTE_MARK = "<!-- atm: everything below is rewritten by the AI Training Manager -->"
#: W&B refuses an alert title longer than this.
ALERT_TITLE_LIMIT = 64


def notable(record: DecisionRecord) -> str:
    """What kind of intervention a person should hear about ``record`` is (``stop``, ``rollback``,
    ``revert``, ``rejected``), or "" for one that needs no notice."""
    if record.status == Status.REJECTED:
        return "rejected"
    if record.status == Status.UNDONE:
        return "undone"
    if record.status not in (Status.PENDING, Status.APPLIED):
        return ""  # not sent to the job (stale, dry run, held or expired), or it failed there (the job's log says why)
    if record.reverts is not None:
        return "revert"
    if record.action in (Action.STOP, Action.ROLLBACK):
        return record.action.value
    return ""


def run_note(record: DecisionRecord, current: str = "") -> str | None:
    """The run's note with atm's section saying ``record``, after what the user wrote (``current``, the
    note as it is); None when ``record`` is not :func:`notable`."""
    kind = notable(record)
    if not kind:
        return None
    shown = re.search(r"decision #(\d+) at step", current.split(NOTE_MARK, 1)[1]) if NOTE_MARK in current else None
    if shown is not None and int(shown.group(1)) > record.seq:
        return None  # the note says a later decision already (an older one republished for its effect's tag)
    changes = ", ".join(f"{k} {fmt(c.old)} → {fmt(c.new)}" for k, c in record.changes.items())
    what = {
        "stop": f"asked the job to **stop** ({record.label()})",
        "rollback": "asked the job to **roll back** to its best checkpoint",
        "revert": f"**reverted** decision #{record.reverts}, measured harmful",
        "rejected": "**rejected** an update",
        "undone": "made a change that **the job undid**",
    }[kind]
    why = record.reason if kind in ("rejected", "undone") else (record.rationale or record.reason)
    lines = [
        NOTE_MARK,
        f"**atm** (AI Training Manager), decision #{record.seq} at step {record.step}: {what}"
        + (f": {changes}" if changes else "") + f" — {record.status.value}.",
        "",
        f"> {why}" if why else "",
        "",
        "Every decision: `atm history --run <this run's id>`, the `atm.*` tags and the artifact `atm/interventions.jsonl`.",
    ]
    own = current.split(NOTE_MARK, 1)[0].rstrip()
    return (own + "\n\n" if own else "") + "\n".join(lines)


def update_alert(update: Update) -> tuple[str, str, str] | None:
    """The W&B alert (title, text, level) for an update the job applied: a stop or a rollback; None for
    one that needs no notice."""
    if update.action not in (Action.STOP, Action.ROLLBACK):
        return None
    what = "stop" if update.action == Action.STOP else "rollback to the best checkpoint"
    changes = ", ".join(f"{k} {fmt(c.old)} -> {fmt(c.new)}" for k, c in update.changes.items())
    # A stop's diagnosis is "converged" whatever problem it ends (overfitting back after remedies, say):
    # its rationale names that, and a label beside it read as a contradiction.
    label = "" if update.action == Action.STOP else f" ({update.diagnosis.value})"
    text = (f"atm decision #{update.seq} at step {update.step}{label}: {what}"
            + (f", with {changes}" if changes else "") + (f". {update.rationale}" if update.rationale else ""))
    return f"atm: {what} (#{update.seq})"[:ALERT_TITLE_LIMIT], text, "WARN"


def undone_alert(seq: int, note: str) -> tuple[str, str, str]:
    """The W&B alert (title, text, level) for update ``seq``, applied and then undone by the job itself."""
    return f"atm: change #{seq} undone by the job"[:ALERT_TITLE_LIMIT], note, "WARN"


def refused_alert(seq: int, reason: str) -> tuple[str, str, str]:
    """The W&B alert (title, text, level) for update ``seq``, which the job refused for ``reason``."""
    return f"atm: update #{seq} refused"[:ALERT_TITLE_LIMIT], reason, "ERROR"
