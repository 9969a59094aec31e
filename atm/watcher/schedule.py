"""When each run is polled next: a heap of due times, the runs spread over the interval.

Each run keeps a fixed phase in the poll interval (a stable hash of its id), so 200 runs picked up
together are polled at 200 different moments, not in one burst every interval. A run taken by a
worker is out of the heap until that worker gives it back: no run is polled by two workers at once.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools


def phase(run_id: str) -> float:
    """The run's place in the interval, in [0, 1): the same in every process and after a restart."""
    return int.from_bytes(hashlib.blake2b(run_id.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


class PollSchedule:
    """Due times of the runs being watched. Not thread-safe: the daemon holds one lock around every call.

    A run is *due* (in the heap, at its next slot), *busy* (taken by a worker) or not watched. The
    regular slots are ``interval`` apart; :meth:`poke` asks for an extra poll as soon as possible
    (a proposal answered) without moving the regular slots.
    """

    def __init__(self, interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.interval = interval
        #: run -> its next regular slot.
        self._slot: dict[str, float] = {}
        #: run -> when it is due now (its slot, or earlier after a poke); only for runs not busy.
        self._due: dict[str, float] = {}
        #: run -> when a worker took it.
        self.busy: dict[str, float] = {}
        #: runs poked while busy: polled again as soon as they are given back.
        self._poked: set[str] = set()
        # (due, tie-breaker, run); entries whose due no longer matches _due are stale and skipped.
        self._heap: list[tuple[float, int, str]] = []
        self._order = itertools.count()

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    def add(self, run_id: str, now: float) -> bool:
        """Start polling a run, first at its phase within the next interval; False if it is watched already."""
        if run_id in self._slot:
            return False
        self._slot[run_id] = now + phase(run_id) * self.interval
        self._push(run_id, self._slot[run_id])
        return True

    def take(self, now: float) -> str | None:
        """The run due longest ago (and not busy), now marked busy; None when no run is due yet."""
        while self._heap:
            due, _, run_id = self._heap[0]
            if self._due.get(run_id) != due:
                heapq.heappop(self._heap)  # stale: re-pushed since, taken, or dropped
                continue
            if due > now:
                return None
            heapq.heappop(self._heap)
            del self._due[run_id]
            self.busy[run_id] = now
            return run_id
        return None

    def give_back(self, run_id: str, now: float, *, retry_in: float | None = None, done: bool = False) -> None:
        """A worker finished polling ``run_id``.

        ``done``: stop polling it. ``retry_in``: the poll failed; try again after that many seconds
        (the back-off). Otherwise the run is due at its next regular slot, at once when it is behind
        (its slot passed while it waited for a worker or was polled).
        """
        self.busy.pop(run_id, None)
        poked = run_id in self._poked
        self._poked.discard(run_id)
        if done:
            self._slot.pop(run_id, None)
            return
        if run_id not in self._slot:
            return  # dropped meanwhile
        if retry_in is not None:
            self._slot[run_id] = now + retry_in
        elif self._slot[run_id] <= now:
            self._slot[run_id] = max(self._slot[run_id] + self.interval, now)
        self._push(run_id, now if poked else self._slot[run_id])

    def poke(self, run_id: str, now: float) -> None:
        """Poll the run as soon as a worker is free (after its current poll if it is busy)."""
        if run_id in self.busy:
            self._poked.add(run_id)
        elif run_id in self._due and self._due[run_id] > now:
            self._push(run_id, now)

    def unpoke(self, run_id: str) -> None:
        """Forget a poke made while the run was busy: the poll under way already did what it asked for."""
        self._poked.discard(run_id)

    def wait_time(self, now: float) -> float | None:
        """Seconds until the next run is due (0 when one is due now); None when no run waits in the heap."""
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return max(0.0, self._heap[0][0] - now) if self._heap else None

    def _push(self, run_id: str, due: float) -> None:
        self._due[run_id] = due
        heapq.heappush(self._heap, (due, next(self._order), run_id))


__all__ = ["PollSchedule", "phase"]
