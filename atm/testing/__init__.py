"""Builders for unit tests of atm's pure logic: metric curves, named scenarios, decision records,
and ``FakeChannel``, an in-memory stand-in for the tracker a listener talks to.

Nothing here talks to a tracker or a model; everything is deterministic (seeded noise only).
"""

from atm.testing._channel import FakeChannel, wait_for
from atm.testing._curves import concat, decay, flat, make_history, ramp, series, valley
from atm.testing._records import assert_bounded, make_context, make_record
from atm.testing._scenarios import SCENARIOS, Scenario, scenario

__all__ = [
    "SCENARIOS",
    "FakeChannel",
    "Scenario",
    "assert_bounded",
    "concat",
    "decay",
    "flat",
    "make_context",
    "make_history",
    "make_record",
    "ramp",
    "scenario",
    "series",
    "valley",
    "wait_for",
]
