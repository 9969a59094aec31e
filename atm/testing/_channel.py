"""A named fake of the listener's tracker channel, for unit tests of the listener's own logic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from atm.schema import Ack, Action, Change, Diagnosis, ListenerInfo, Update

__all__ = ["FakeChannel", "wait_for"]


class FakeChannel:
    """An in-memory stand-in for a tracker run: updates in, acks/metrics/info out."""

    def __init__(self, run_id: str = "run-1", fail: bool = False):
        self.run_id = run_id
        self.updates: dict[int, Update] = {}
        self.acks: dict[int, Ack] = {}
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.infos: list[ListenerInfo] = []
        self.fail = fail
        self.lock = threading.Lock()

    def publish(self, seq: int, step: int = 10, action: Action | None = None, **changes: tuple[float, float]) -> None:
        with self.lock:
            self.updates[seq] = Update(
                run_id=self.run_id, seq=seq, step=step, diagnosis=Diagnosis.OVERFITTING, source="rules",
                changes={k: Change(old=o, new=n) for k, (o, n) in changes.items()}, action=action,
            )

    def _check(self) -> None:
        if self.fail:
            raise ConnectionError("tracker down (fake)")

    def announce(self, info: ListenerInfo) -> None:
        self._check()
        self.infos.append(info)

    def fetch(self, after_seq: int) -> list[Update]:
        self._check()
        with self.lock:
            return [self.updates[s] for s in sorted(self.updates) if s > after_seq]

    def acked(self) -> dict[int, Ack]:
        self._check()
        return dict(self.acks)

    def ack(self, ack: Ack) -> None:
        self._check()
        self.acks[ack.seq] = ack

    def log_values(self, values: dict[str, float], step: int | None) -> None:
        self._check()
        self.metrics.append((dict(values), step))

    def close(self) -> None:
        pass


def wait_for(cond: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait until ``cond()`` is truthy (checked every 10 ms); AssertionError after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")
