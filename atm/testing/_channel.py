"""A named fake of the listener's tracker channel, for unit tests of the listener's own logic."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from atm.adapters.base import MessageProblem
from atm.schema import Ack, Action, Change, Diagnosis, ListenerInfo, Update
from atm.signing import KeySource, SigningKey, sign

__all__ = ["FakeChannel", "wait_for"]


class FakeChannel:
    """An in-memory stand-in for a tracker run: updates in, acks/metrics/info out.

    :meth:`publish` signs as a watcher does, and :meth:`ack` as a channel does, with ``key`` (by
    default resolved from the environment: set ``ATM_KEY`` in tests). :meth:`put` places any
    message, signed or not, as another client of the tracker could.
    """

    def __init__(self, run_id: str = "run-1", fail: bool = False, key: SigningKey | None = None):
        self.run_id = run_id
        self.updates: dict[int, Update] = {}
        self.acks: dict[int, Ack] = {}
        self.metrics: list[tuple[dict[str, float], int | None]] = []
        self.infos: list[ListenerInfo] = []
        #: Malformed messages, as a real channel reports them.
        self.problems: list[MessageProblem] = []
        self.fail = fail
        self.lock = threading.Lock()
        self.keys = KeySource(key)

    def publish(self, seq: int, step: int = 10, action: Action | None = None, **changes: tuple[float, float]) -> None:
        """A signed update from the watcher: ``publish(3, lr=(1e-3, 5e-4))``."""
        self.put(sign(self.update(seq, step, action, **changes), self.keys.get()))

    def update(self, seq: int, step: int = 10, action: Action | None = None, **changes: tuple[float, float]) -> Update:
        """An unsigned update for this run (sign it, alter it, or :meth:`put` it as it is)."""
        return Update(
            run_id=self.run_id, seq=seq, step=step, diagnosis=Diagnosis.OVERFITTING, source="rules",
            changes={k: Change(old=o, new=n) for k, (o, n) in changes.items()}, action=action,
        )

    def put(self, update: Update) -> None:
        """Place ``update`` on the run as it is."""
        with self.lock:
            self.updates[update.seq] = update

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
        key = self.keys.get_or_none()
        self.acks[ack.seq] = sign(ack, key) if key is not None else ack

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
