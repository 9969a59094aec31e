"""The poll schedule: runs spread over the interval, one worker per run, pokes and back-off (a fake clock)."""

from __future__ import annotations

import uuid

import pytest

from atm.watcher.schedule import PollSchedule, phase


def test_runs_started_together_are_spread_over_the_interval() -> None:
    sched = PollSchedule(interval=5.0)
    ids = [uuid.UUID(int=i * 104729 + 7).hex for i in range(200)]
    for rid in ids:
        sched.add(rid, now=100.0)
    dues = sorted(100.0 + phase(r) * 5.0 for r in ids)
    assert all(100.0 <= d < 105.0 for d in dues)
    per_second = [sum(100.0 + s <= d < 101.0 + s for d in dues) for s in range(5)]
    assert min(per_second) >= 20  # 40 a second on average: no burst, no empty second
    # Taken in due order, each when its time comes.
    assert sched.take(now=100.0 + min(phase(r) for r in ids) * 5.0 - 1e-9) is None
    taken = []
    while (rid := sched.take(now=105.0)) is not None:
        taken.append(rid)
    assert sorted(taken, key=phase) == taken and len(taken) == 200


def test_a_busy_run_is_not_handed_to_a_second_worker() -> None:
    sched = PollSchedule(interval=1.0)
    sched.add("a", now=0.0)
    assert sched.take(now=1.0) == "a"
    assert sched.take(now=50.0) is None  # still busy, however late it is
    assert "a" in sched.busy and "a" in sched
    sched.give_back("a", now=1.2)
    assert sched.take(now=1.2) is None and sched.take(now=10.0) == "a"


def test_regular_slots_keep_their_phase_and_a_late_run_is_due_at_once() -> None:
    sched = PollSchedule(interval=10.0)
    sched.add("r", now=0.0)
    first = phase("r") * 10.0
    assert sched.take(now=first) == "r"
    sched.give_back("r", now=first + 0.3)  # the poll took 0.3 s: the next slot is not pushed back by it
    assert sched.wait_time(now=first + 0.3) == pytest.approx(9.7)
    assert sched.take(now=first + 25.0) == "r"  # behind (no worker was free): polled now ...
    sched.give_back("r", now=first + 25.0)
    assert sched.wait_time(now=first + 25.0) == 0.0  # ... and its next slot (first + 20) has passed too


def test_a_poke_polls_early_without_moving_the_slots() -> None:
    sched = PollSchedule(interval=10.0)
    sched.add("r", now=0.0)
    slot = phase("r") * 10.0
    sched.poke("r", now=slot - 0.5 if slot > 0.5 else 0.0)
    assert sched.wait_time(now=slot - 0.5 if slot > 0.5 else 0.0) == 0.0
    assert sched.take(now=max(slot - 0.5, 0.0)) == "r"
    sched.poke("r", now=slot)  # poked while busy: due again as soon as it is given back
    sched.give_back("r", now=slot)
    assert sched.take(now=slot) == "r"
    sched.give_back("r", now=slot + 0.1)
    assert sched.wait_time(now=slot + 0.1) == pytest.approx(9.9)


def test_a_poke_forgotten_while_busy_leaves_the_regular_slot() -> None:
    sched = PollSchedule(interval=10.0)
    sched.add("r", now=0.0)
    slot = phase("r") * 10.0
    assert sched.take(now=slot) == "r"
    sched.poke("r", now=slot)  # a fast proposal answered during the poll, which settled it itself
    sched.unpoke("r")
    sched.give_back("r", now=slot + 0.1)
    assert sched.take(now=slot + 0.1) is None
    assert sched.wait_time(now=slot + 0.1) == pytest.approx(9.9)


def test_back_off_and_done() -> None:
    sched = PollSchedule(interval=1.0)
    sched.add("r", now=0.0)
    assert sched.take(now=1.0) == "r"
    sched.give_back("r", now=1.0, retry_in=8.0)
    assert sched.take(now=8.9) is None and sched.take(now=9.0) == "r"
    sched.give_back("r", now=9.0, done=True)
    assert "r" not in sched and len(sched) == 0 and sched.wait_time(now=9.0) is None
    assert sched.add("r", now=9.0)  # a run that ended can be watched again (picked up anew)
    assert not sched.add("r", now=9.0)


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval must be positive, got 0"):
        PollSchedule(0)
