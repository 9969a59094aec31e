"""MLflow: a poll given ``select`` reads only the keys it picks (and atm/*), on a real sqlite store.

The step-window reads are counted by a spy on ``MlflowBackend._window_rows`` (the real read runs)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from atm.adapters.mlflow_backend import MlflowBackend, MlflowChannel
from atm.policies import load_policy
from atm.watcher.poll import keys_to_read

MAPPED = ("train_loss", "val_loss", "grad_norm")
UNMAPPED = ("samples_per_s", "epoch", "throughput/tokens_per_s", "memory/allocated_gb", *(f"grad_norm/layer_{i}" for i in range(16)))
#: The job's first point (ms), after the listener's atm/lr point (logged at the time it runs).
T0 = int(time.time() * 1000) + 60_000


def _log(client: MlflowClient, rid: str, keys: Sequence[str], steps: range) -> None:
    for step in steps:
        client.log_batch(rid, metrics=[Metric(k, 1.0 / (step + 1) + i, T0 + step * 1000, step) for i, k in enumerate(keys)])


@pytest.fixture
def window_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, int]]:
    """(key, first step, last step) of every step-window read, in order."""
    reads: list[tuple[str, int, int]] = []
    real = MlflowBackend._window_rows

    def spy(self: MlflowBackend, run_id: str, key: str, start: int, end: int) -> list[tuple[int, float, int]] | None:
        reads.append((key, start, end))
        return real(self, run_id, key, start, end)

    monkeypatch.setattr(MlflowBackend, "_window_rows", spy)
    return reads


def test_only_the_keys_picked_are_read_and_every_key_is_listed(mlflow_uri: str,
                                                               window_reads: list[tuple[str, int, int]]) -> None:
    assert len(UNMAPPED) == 20
    client = MlflowClient(mlflow_uri)
    rid = client.create_run(client.create_experiment("select")).info.run_id
    _log(client, rid, (*MAPPED, *UNMAPPED), range(30))
    MlflowChannel(rid, mlflow_uri).log_values({"lr": 1e-3}, step=12)
    lm = load_policy("lm")
    asked: list[list[str]] = []

    def select(keys: Sequence[str]) -> frozenset[str]:
        asked.append(sorted(keys))
        return keys_to_read(lm, keys)

    backend = MlflowBackend(mlflow_uri)
    view = backend.poll(rid, select=select)
    every = sorted([*MAPPED, *UNMAPPED, "atm/lr"])
    assert asked == [every], "select is given every key the run has"
    assert sorted(view.keys) == every
    assert sorted(view.history) == sorted([*MAPPED, "atm/lr"]), "atm/* is read whether picked or not"
    assert [s for s, _ in view.history["train_loss"]] == list(range(30))
    assert sorted({k for k, _, _ in window_reads}) == sorted([*MAPPED, "atm/lr"])
    assert view.last_metric_time == pytest.approx((T0 + 29_000) / 1000)

    # New points of every key: only the picked ones are read, each from where it stopped.
    window_reads.clear()
    _log(client, rid, (*MAPPED, *UNMAPPED), range(30, 40))
    view = backend.poll(rid, select=select)
    assert sorted(window_reads) == [(k, 30, 39) for k in sorted(MAPPED)]
    assert [s for s, _ in view.history["val_loss"]] == list(range(40))

    # Only keys no role reads move: nothing is read, and the run is still seen alive.
    window_reads.clear()
    _log(client, rid, UNMAPPED, range(40, 45))
    view = backend.poll(rid, select=select)
    assert window_reads == [] and not view.moved
    assert view.last_metric_time == pytest.approx((T0 + 44_000) / 1000)

    # A key picked later (the run's keys changed what the policy reads) is read from its first point.
    view = backend.poll(rid, select=lambda keys: {*select(keys), "samples_per_s"})
    assert window_reads == [("samples_per_s", 0, 44)]
    assert [s for s, _ in view.history["samples_per_s"]] == list(range(45))
    stored = client.get_metric_history(rid, "samples_per_s")
    assert view.history["samples_per_s"] == sorted((m.step, pytest.approx(m.value)) for m in stored)

    # No select: every key, as `atm explain` and `atm history` read a run.
    whole = MlflowBackend(mlflow_uri).poll(rid)
    assert sorted(whole.history) == every == sorted(whole.keys)
