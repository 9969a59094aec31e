"""The W&B transaction-log reader: framing, a growing file, corruption, history decoding, known versions."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wandb
from atm.adapters._wandb._txlog import (
    BLOCK_SIZE,
    CHUNK_HEADER,
    FILE_HEADER,
    FIRST,
    FULL,
    LAST,
    MIDDLE,
    VERIFIED_WANDB,
    LogFormatError,
    LogTail,
    RunLog,
    exit_code_at_end,
    history_values,
    read_run_record,
    split_chunks,
)
from wandb.proto import wandb_internal_pb2 as pb

# A real offline run: a big config record spanning blocks, nested and media values, NaN, an exit.
REFERENCE_JOB = r"""
import math, sys, wandb
run = wandb.init(mode="offline", dir=sys.argv[1], project="txlog", config={"lr": 0.01})
run.config.update({"blob": "x" * 70000})
for i in range(300):
    row = {"loss": 1.0 / (i + 1), "nested": {"a": i}, "flag": True, "note": "text"}
    if i == 5:
        row["table"] = wandb.Table(columns=["a"], data=[[1]])
    if i == 7:
        row["loss"] = math.nan
    run.log(row)
run.finish()
"""


def offline_run(job: str, root: Path) -> Path:
    """Run ``job`` (a script given its folder as argv[1]) with the real wandb, offline; its transaction log."""
    script = root / "job.py"
    script.write_text(job)
    subprocess.run([sys.executable, str(script), str(root)], check=True, timeout=120,
                   env=dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline"))
    (log,) = (root / "wandb").glob("offline-run-*/run-*.wandb")
    return log


def read_state(log: Path) -> RunLog:
    state = RunLog()
    state.apply(LogTail(log).read())
    return state


@pytest.fixture(scope="module")
def reference_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return offline_run(REFERENCE_JOB, tmp_path_factory.mktemp("txlog"))


def frame(payloads: list[bytes]) -> bytes:
    """A LevelDB-framed W&B log of ``payloads``, written the way wandb-core writes it (test fixture)."""
    out = bytearray(FILE_HEADER)
    for payload in payloads:
        rest, first = payload, True
        while True:
            left = BLOCK_SIZE - len(out) % BLOCK_SIZE
            if left < CHUNK_HEADER:
                out += b"\0" * left
                continue
            part, rest = rest[: left - CHUNK_HEADER], rest[left - CHUNK_HEADER :]
            last = not rest
            kind = FULL if first and last else FIRST if first else LAST if last else MIDDLE
            out += struct.pack("<IHB", zlib.crc32(bytes([kind]) + part) & 0xFFFFFFFF, len(part), kind) + part
            first = False
            if last:
                break
    return bytes(out)


def grow_and_tail(data: bytes, cuts: list[int], path: Path) -> tuple[list[bytes], LogTail, list[int]]:
    """Write ``data`` to ``path`` in pieces ending at ``cuts``, reading with one LogTail after each."""
    tail = LogTail(path)
    got: list[bytes] = []
    offsets = []
    path.write_bytes(b"")
    with open(path, "ab") as fh:
        prev = 0
        for cut in [*sorted(cuts), len(data)]:
            fh.write(data[prev:cut])
            fh.flush()
            prev = max(prev, cut)
            got += tail.read_raw()
            offsets.append(tail.offset)
    return got, tail, offsets


PAYLOADS = [b"a" * 10, b"b" * 40000, b"c" * 5, b"d" * (BLOCK_SIZE - 2 * CHUNK_HEADER - 9), b"e" * 100000, b"f"]


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(frame(PAYLOADS))), max_size=12))
def test_every_record_once_in_order_however_the_file_grows(cuts: list[int], tmp_path_factory: pytest.TempPathFactory) -> None:
    data = frame(PAYLOADS)
    got, tail, offsets = grow_and_tail(data, cuts, tmp_path_factory.mktemp("grow") / "run-x.wandb")
    assert got == PAYLOADS
    assert offsets == sorted(offsets) and offsets[-1] == len(data)
    assert tail.records_read == len(PAYLOADS)


def test_partial_tail_is_left_for_the_next_read() -> None:
    data = frame([b"x" * 100, b"y" * 50])
    cut = len(data) - 10
    records, consumed, corrupt = split_chunks(data[len(FILE_HEADER):cut], len(FILE_HEADER))
    assert records == [b"x" * 100] and corrupt == 0
    assert consumed == CHUNK_HEADER + 100  # stops just past the complete record


def test_real_log_read_while_growing_matches_one_read(reference_log: Path, tmp_path: Path) -> None:
    data = reference_log.read_bytes()
    whole = LogTail(reference_log).read_raw()
    assert len(data) > 2 * BLOCK_SIZE  # the 70 kB config record spans blocks
    rng = random.Random(7)
    cuts = sorted(rng.randrange(len(data)) for _ in range(40))
    got, tail, offsets = grow_and_tail(data, cuts, tmp_path / "run-copy.wandb")
    assert got == whole
    assert offsets == sorted(offsets)
    # Only incomplete tails are read twice, never the file from the start.
    assert tail.bytes_read < len(data) + len(cuts) * (70000 + BLOCK_SIZE)


def test_a_corrupt_block_is_skipped_and_reading_goes_on(tmp_path: Path) -> None:
    payloads = [b"a" * 20000, b"b" * 20000, b"c" * 30000, b"d" * 10]
    data = bytearray(frame(payloads))
    data[len(FILE_HEADER) + CHUNK_HEADER + 5] ^= 0xFF  # inside record a, block 0
    path = tmp_path / "run-bad.wandb"
    path.write_bytes(bytes(data))
    tail = LogTail(path)
    got = tail.read_raw()
    assert tail.corrupt_chunks == 1
    # Block 0 (a, and the start of b) is dropped; b's tail in block 1 has no start and is dropped too.
    assert got == [b"c" * 30000, b"d" * 10]


def test_a_checksum_mismatch_at_the_tail_waits_instead_of_skipping() -> None:
    data = bytearray(frame([b"a" * 10, b"b" * 10]))
    data[-1] ^= 0xFF  # the last chunk, possibly still being written
    records, consumed, corrupt = split_chunks(bytes(data[len(FILE_HEADER):]), len(FILE_HEADER))
    assert records == [b"a" * 10] and corrupt == 0 and consumed == CHUNK_HEADER + 10


def test_unknown_format_fails_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "run-new.wandb"
    path.write_bytes(FILE_HEADER[:6] + bytes([1]) + frame([b"x"])[len(FILE_HEADER):])
    with pytest.raises(LogFormatError, match=r"format version 1.*upgrade atm.*entity/project/run_id"):
        LogTail(path).read_raw()
    other = tmp_path / "run-other.wandb"
    other.write_bytes(b"PK\x03\x04 not a log")
    with pytest.raises(LogFormatError, match="starting"):
        LogTail(other).read_raw()


def test_reader_pins_the_wandb_versions_it_was_checked_against(reference_log: Path) -> None:
    # Fails on a wandb upgrade on purpose: run this file against the new release, then extend VERIFIED_WANDB.
    assert wandb.__version__.startswith(VERIFIED_WANDB), (
        f"wandb {wandb.__version__} is installed; the transaction-log reader was checked against {VERIFIED_WANDB}"
    )
    state = RunLog()
    state.apply(LogTail(reference_log).read())
    assert state.producer.startswith(VERIFIED_WANDB)


def test_real_log_decodes_to_run_state(reference_log: Path) -> None:
    state = RunLog()
    state.apply(LogTail(reference_log).read())
    assert state.project == "txlog" and state.exit_code == 0
    assert state.config["lr"] == 0.01 and len(state.config["blob"]) == 70000
    loss = state.history["loss"]
    assert [s for s, _ in loss] == list(range(300))
    assert math.isnan(loss[7][1]) and loss[8][1] == pytest.approx(1 / 9)
    assert [v for _, v in state.history["nested.a"]][:3] == [0.0, 1.0, 2.0]
    assert not any(k.startswith("table") for k in state.history), "media must not become metrics"
    assert "flag" not in state.history and "note" not in state.history
    assert state.last_time > 0
    assert read_run_record(reference_log).project == "txlog"  # type: ignore[union-attr]
    assert exit_code_at_end(reference_log) == 0


# Lightning's WandbLogger and the HF Trainer declare their global step as the run's x axis, log
# training and validation in separate rows, and let step_sync fill the step into each row.
DECLARED_STEP_JOB = r"""
import sys, wandb
run = wandb.init(mode="offline", dir=sys.argv[1], project="txlog")
run.define_metric("trainer/global_step")
run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
for i in range(6):
    run.log({"train_loss": 1.0 / (i + 1), "trainer/global_step": 10 * i})
    if i % 2:
        run.log({"val_loss": 2.0 / (i + 1)})
run.finish()
"""


def test_a_declared_step_metric_is_the_x_axis(tmp_path: Path) -> None:
    state = read_state(offline_run(DECLARED_STEP_JOB, tmp_path))
    assert state.step_metric == "trainer/global_step"
    # W&B's row counter would give 0, 1, 3, 4, 6, 7 and 2, 5, 8: two axes for one run.
    assert [s for s, _ in state.history["train_loss"]] == [0, 10, 20, 30, 40, 50]
    assert [s for s, _ in state.history["val_loss"]] == [10, 30, 50]
    assert state.last_step == 50


# The listener writes with commit=False, into the job's open row: W&B stamps that row when it closes,
# after the change, which would place the change one evaluation early.
TOUCHED_ROW_JOB = r"""
import sys, wandb
run = wandb.init(mode="offline", dir=sys.argv[1], project="txlog")
for i in range(4):
    run.log({"val_loss": 1.0 / (i + 1)}, step=10 * i)
    if i == 1:
        run.log({"atm/lr": 0.5, "atm/step": 15}, commit=False)
run.finish()
"""


def test_rows_the_listener_wrote_into_do_not_time_the_job(tmp_path: Path) -> None:
    state = read_state(offline_run(TOUCHED_ROW_JOB, tmp_path))
    assert [s for s, _ in state.history["val_loss"]] == [0, 10, 20, 30]
    assert state.history["atm/lr"] == [(15, 0.5)]
    assert [s for _, s in state.timeline.points] == [0, 20, 30]  # row 10 holds the listener's write


def test_history_values_reads_json_and_typed_items() -> None:
    hist = pb.HistoryRecord()
    hist.item.add(nested_key=["loss"], value_json="0.5")
    hist.item.add(key="acc", number=0.75)
    hist.item.add(key="epoch", integer=3)
    hist.item.add(key="blob", json=json.dumps([1, 2]))
    hist.item.add(key="done", boolean=True)
    hist.item.add(nested_key=["img", "_type"], value_json='"image-file"')
    hist.item.add(nested_key=["img", "width"], value_json="64")
    hist.item.add(key="bad", value_json="Infinity")
    hist.step.num = 9
    assert history_values(hist) == {"loss": 0.5, "acc": 0.75, "epoch": 3.0, "bad": math.inf}


def test_atm_values_are_keyed_by_the_jobs_step() -> None:
    rec = pb.Record()
    rec.history.step.num = 40  # W&B's row counter
    rec.history.item.add(key="loss", value_json="0.1")
    rec.history.item.add(key="atm/lr", value_json="0.003")
    rec.history.item.add(key="atm/step", value_json="9")
    state = RunLog()
    state.apply([rec])
    assert state.history["loss"] == [(40, 0.1)]
    assert state.history["atm/lr"] == [(9, 0.003)]
    assert "atm/step" not in state.history
