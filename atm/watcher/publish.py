"""Publish: put a settled decision on the run, where the job's listener and the tracker's UI find it."""

from __future__ import annotations

from atm.adapters.base import Backend
from atm.schema import DecisionRecord


def publish(backend: Backend, records: list[DecisionRecord], record: DecisionRecord) -> None:
    """Append ``record`` to the run's decisions and publish it with the decision log.

    The number is reserved on the run first: a daemon that dies between the update and the log
    comes back past it and never hands out the same number for another decision.
    """
    backend.reserve_seq(record.run_id, record.seq)
    records.append(record)
    backend.publish(record)
    backend.write_log(record.run_id, records)
