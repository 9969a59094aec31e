"""Reading a W&B transaction log (``run-<id>.wandb``) while the job is still writing it.

The format, as wandb-core 0.31 writes it (``core/pkg/leveldb`` in the wandb repository; the old
Python ``wandb.sdk.internal.datastore`` is gone): a 7-byte file header (``:W&B``, magic 0xBEE1
little-endian, format version 0), then LevelDB-log framing in 32 KiB blocks. Each chunk has a
7-byte header (CRC-32 of the type byte + payload, little-endian uint32; payload length, uint16;
type: 1 full, 2 first, 3 middle, 4 last) and a record may span blocks as first/middle.../last
chunks. A block tail shorter than a chunk header is zero padding. Each complete record is one
``wandb.proto.wandb_internal_pb2.Record``.

The writer buffers: it writes when a 32 KiB block fills or ``x_transaction_log_flush_interval``
seconds pass (15 s by default in 0.31; ``WANDB_X_TRANSACTION_LOG_FLUSH_INTERVAL=1`` in the job's
environment brings it near 1 s), so the file routinely ends inside a record. :class:`LogTail` keeps the byte offset just past the last
complete record and resumes there: nothing is read twice except an incomplete tail.

wandb ships no command that dumps these records (0.31 removed ``wandb sync --view``; ``wandb beta
leet`` is an interactive viewer), so a log this reader cannot parse fails with
:class:`LogFormatError`, saying what was found and what to do.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

from atm.adapters.base import PointSeries, Timeline

log = logging.getLogger("atm.wandb")

FILE_HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + bytes([0])
BLOCK_SIZE = 32768
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4

#: The x axis of atm's own ``atm/<param>`` charts: the job's step when a value took effect.
ATM_STEP_KEY = "atm/step"

#: wandb releases whose transaction logs this reader was checked against, by version prefix.
#: A test pins the installed wandb to this list: extend it only after the tests pass on a new release.
VERIFIED_WANDB = ("0.31.",)


class LogFormatError(RuntimeError):
    """The file is not a transaction log in a format this reader knows."""


def check_file_header(head: bytes, path: Path | str) -> None:
    """Raise :class:`LogFormatError` unless ``head`` (the first 7 bytes) is a known log header."""
    if head == FILE_HEADER:
        return
    if head[:4] == FILE_HEADER[:4]:
        found = f"W&B transaction log format version {head[6] if len(head) > 6 else '?'}"
    else:
        found = f"a file starting {head[:7]!r}"
    raise LogFormatError(
        f"{path}: found {found}; atm reads format version 0 (written by wandb {', '.join(v + 'x' for v in VERIFIED_WANDB)} "
        "and earlier wandb-core releases). This wandb release ships no command that dumps the records, so "
        "upgrade atm (pip install -U 'atm[wandb]'), or watch the run through the W&B server with "
        "--run entity/project/run_id."
    )


def split_chunks(data: bytes, start: int) -> tuple[list[bytes], int, int]:
    """Complete records in ``data``, which holds the log from byte offset ``start`` on.

    ``start`` must be a record boundary (or the end of the file header). Pure.

    Returns:
        (record payloads, bytes consumed up to the end of the last complete record, chunks
        skipped because their checksum did not match).
    """
    records: list[bytes] = []
    parts: list[bytes] = []
    corrupt = 0
    pos = 0  # index into data; the file offset is start + pos
    consumed = 0
    end = len(data)
    while True:
        left_in_block = BLOCK_SIZE - (start + pos) % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:
            if pos + left_in_block > end:
                break
            pos += left_in_block  # zero padding at the block's end
            if not parts:
                consumed = pos
            continue
        if pos + CHUNK_HEADER > end:
            break
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0 and crc == 0:
            break  # zeros past the written part (a preallocated or not yet written region)
        bad = CHUNK_HEADER + length > left_in_block or kind > LAST  # a writer never produces these
        if not bad:
            if pos + CHUNK_HEADER + length > end:
                break  # the writer has not flushed the rest of this chunk yet
            payload = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
            bad = zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc
        if bad:
            if pos + left_in_block >= end:
                break  # maybe a write still in flight; decide once the block is complete
            # Corruption inside the file: LevelDB's rule is to drop the rest of the block.
            corrupt += 1
            parts = []
            pos += left_in_block
            consumed = pos
            continue
        pos += CHUNK_HEADER + length
        if kind == FULL:
            parts = []
            records.append(payload)
            consumed = pos
        elif kind == FIRST:
            parts = [payload]
        elif kind == MIDDLE and parts:
            parts.append(payload)
        elif kind == LAST and parts:
            parts.append(payload)
            records.append(b"".join(parts))
            parts = []
            consumed = pos
        else:
            # A middle/last chunk without its first (we started after a corrupt block): drop it.
            parts = []
            consumed = pos
    return records, consumed, corrupt


class LogTail:
    """Follows one growing transaction log: each :meth:`read` returns the records added since the last.

    Keeps a byte offset (never re-reads from the start). Not thread-safe; one per reader.
    """

    def __init__(self, path: Path | str):
        self.path = Path(path)
        #: File offset just past the last complete record read.
        self.offset = 0
        #: Complete records returned so far, and bytes read from disk (to show reads are incremental).
        self.records_read = 0
        self.bytes_read = 0
        self.corrupt_chunks = 0

    def read_raw(self) -> list[bytes]:
        """Payloads of the records completed since the last call. Raises :class:`LogFormatError`."""
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < self.offset:
                raise LogFormatError(f"{self.path} shrank from {self.offset} to {size} bytes; it was replaced")
            if self.offset == 0:
                if size < len(FILE_HEADER):
                    return []
                check_file_header(fh.read(len(FILE_HEADER)), self.path)
                self.offset = len(FILE_HEADER)
            if size == self.offset:
                return []
            fh.seek(self.offset)
            data = fh.read(size - self.offset)
        self.bytes_read += len(data)
        records, consumed, corrupt = split_chunks(data, self.offset)
        if corrupt:
            self.corrupt_chunks += corrupt
            log.warning("%s: skipped %d corrupt chunk(s)", self.path, corrupt)
        self.offset += consumed
        self.records_read += len(records)
        return records

    def read(self) -> list[pb.Record]:
        """The records completed since the last call, decoded."""
        out = []
        for payload in self.read_raw():
            rec = pb.Record()
            try:
                rec.ParseFromString(payload)
            except Exception as exc:  # protobuf's DecodeError; the framing checksum passed, so this is rare
                log.warning("%s: skipped a record that does not decode (%s)", self.path, exc)
                continue
            out.append(rec)
        return out


# --------------------------------------------------------------------------- records -> run state


@dataclass
class RunLog:
    """What a transaction log says about its run, accumulated record by record."""

    run_id: str = ""
    project: str = ""
    entity: str = ""
    display_name: str = ""
    tags: tuple[str, ...] = ()
    config: dict[str, Any] = field(default_factory=dict)
    #: Metric key -> (step, value) points in log order. Media and non-numeric values are left out.
    history: dict[str, PointSeries] = field(default_factory=dict)
    last_step: int = -1
    #: Wall time (seconds) of the newest history row; 0 when none.
    last_time: float = 0.0
    #: When the job logged its newest rows (see :class:`atm.adapters.base.Timeline`).
    timeline: Timeline = field(default_factory=Timeline)
    exit_code: int | None = None
    producer: str = ""
    #: The run-wide x axis the job declared with ``define_metric("*", step_metric=KEY)``, as
    #: Lightning's WandbLogger (``trainer/global_step``) and the HF Trainer (``train/global_step``) do.
    step_metric: str = ""

    def apply(self, records: Iterable[pb.Record]) -> int:
        """Fold records into the state. Returns how many history points were added."""
        added = 0
        for rec in records:
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                added += self._history(rec.history)
            elif kind == "run":
                self._run(rec.run)
            elif kind == "config":
                _config_items(self.config, rec.config.update, rec.config.remove)
            elif kind == "metric":
                self._metric(rec.metric)
            elif kind == "exit":
                self.exit_code = int(rec.exit.exit_code)
            elif kind == "header":
                self._header(rec.header.version_info.producer)
        return added

    def _header(self, producer: str) -> None:
        self.producer = producer
        if producer and not producer.startswith(VERIFIED_WANDB):
            log.warning(
                "this run was written by wandb %s; atm's reader was checked against %s. Reading it anyway "
                "(the framing is checksummed and records are protobuf), but report any oddity.",
                producer.split("+")[0], ", ".join(v + "x" for v in VERIFIED_WANDB),
            )

    def _run(self, run: pb.RunRecord) -> None:
        self.run_id = run.run_id or self.run_id
        self.project = run.project or self.project
        self.entity = run.entity or self.entity
        self.display_name = run.display_name or self.display_name
        self.tags = tuple(run.tags)
        _config_items(self.config, run.config.update, run.config.remove)

    def _metric(self, metric: pb.MetricRecord) -> None:
        if metric.glob_name == "*" and metric.step_metric:
            self.step_metric = metric.step_metric

    def _history(self, hist: pb.HistoryRecord) -> int:
        values = history_values(hist)
        step = values.pop("_step", None)
        if hist.HasField("step"):
            step = float(hist.step.num)
        # The job's own step, where it declared one, is the x axis of its W&B charts and the step its
        # listener reports updates at: W&B's row counter would put decisions and acks on two axes.
        # (step_sync fills it into every row; a row without it keeps the counter.)
        declared = values.get(self.step_metric) if self.step_metric else None
        if declared is not None and math.isfinite(declared):
            step = declared
        if step is None or not math.isfinite(step):
            return 0
        ts = values.pop("_timestamp", None)
        if ts is not None and math.isfinite(ts):
            self.last_time = max(self.last_time, ts)
        istep = int(step)
        self.last_step = max(self.last_step, istep)
        # atm's own values are charted against the job's step (atm/step), not W&B's row counter.
        atm_step = values.pop(ATM_STEP_KEY, None)
        atm_istep = int(atm_step) if atm_step is not None and math.isfinite(atm_step) else istep
        added = 0
        for key, value in values.items():
            if key.startswith("_"):
                continue  # _runtime and W&B's own bookkeeping
            self.history.setdefault(key, PointSeries()).append((atm_istep if key.startswith("atm/") else istep, value))
            added += 1
        if ts is not None and math.isfinite(ts) and self._times_the_job(hist, values, istep, atm_step):
            self.timeline.add([(ts, istep)])
        return added

    def _times_the_job(self, hist: pb.HistoryRecord, values: dict[str, float], istep: int, atm_step: float | None) -> bool:
        """Whether a row's stamp is when the job logged its metrics at the row's step."""
        # A row of atm/* values alone is the listener's: its stamp says when a change was applied, not
        # when the job logged anything. (step_sync fills the declared step into such a row too.)
        if not any(not k.startswith(("_", "atm/")) and k != self.step_metric for k in values):
            return False
        listener_wrote = any((item.nested_key[0] if item.nested_key else item.key).startswith("atm/") for item in hist.item)
        if not listener_wrote:
            return True
        # W&B stamps a row with its last write. The listener writes with commit=False, into the job's
        # open row: where the job had already logged that row's metrics (step= given, the row open
        # until the next step), the stamp is the listener's, after the change, and counting the row
        # would place the change one evaluation early. But a row whose step is past the step the
        # listener wrote at (atm/step) was logged by a job that had not reached that step when the
        # listener wrote: its metrics came last and the stamp is theirs (the HF Trainer's rows, logged
        # without step=). Left out, the change would be placed one evaluation late.
        return atm_step is not None and math.isfinite(atm_step) and istep > atm_step


def history_values(hist: pb.HistoryRecord) -> dict[str, float]:
    """Numeric values of one history row, by flat key (nested keys joined with ``.``). Pure.

    Media (tables, images ...) arrive as nested items with a ``_type`` member and are left out, as
    are strings, booleans and nulls. NaN and infinities are kept: they are what divergence looks like.
    """
    items = []
    media: set[str] = set()
    for item in hist.item:
        path = tuple(item.nested_key) if item.nested_key else (item.key,)
        if len(path) > 1 and path[-1] == "_type":
            media.add(".".join(path[:-1]))
        items.append((".".join(path), item))
    out: dict[str, float] = {}
    for key, item in items:
        if any(key == m or key.startswith(m + ".") for m in media):
            continue
        value = _item_number(item)
        if value is not None:
            out[key] = value
    return out


def _item_number(item: pb.HistoryItem) -> float | None:
    if item.value_json:
        try:
            value = json.loads(item.value_json)
        except ValueError:
            return None
    else:
        kind = item.WhichOneof("value")
        if kind in ("number", "integer"):
            return float(getattr(item, kind))
        if kind != "json":
            return None
        try:
            value = json.loads(item.json)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _config_items(config: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any]) -> None:
    for item in updates:
        key = ".".join(item.nested_key) if item.nested_key else item.key
        if key == "_wandb":
            continue
        try:
            config[key] = json.loads(item.value_json)
        except ValueError:
            config[key] = item.value_json
    for item in removes:
        config.pop(".".join(item.nested_key) if item.nested_key else item.key, None)


def exit_code_at_end(path: Path | str) -> int | None:
    """The exit code if the log ends with the run's exit, reading only its last two blocks.

    Chunks start afresh at every block boundary, so parsing can begin at one; a record continued
    from an earlier block is dropped, which is harmless here: wandb writes the exit record last.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        start = max(len(FILE_HEADER), (size // BLOCK_SIZE - 1) * BLOCK_SIZE)
        fh.seek(start)
        data = fh.read(size - start)
    payloads, _, _ = split_chunks(data, start)
    for payload in reversed(payloads):
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:
            continue
        if rec.WhichOneof("record_type") == "exit":
            return int(rec.exit.exit_code)
    return None


def read_run_record(path: Path | str, max_bytes: int = 1 << 20) -> pb.RunRecord | None:
    """The first ``run`` record of a log (project, id, name), reading at most ``max_bytes``."""
    tail = LogTail(path)
    with open(tail.path, "rb") as fh:
        head = fh.read(max_bytes)
    if len(head) < len(FILE_HEADER):
        return None
    check_file_header(head[: len(FILE_HEADER)], tail.path)
    payloads, _, _ = split_chunks(head[len(FILE_HEADER) :], len(FILE_HEADER))
    for payload in payloads:
        rec = pb.Record()
        try:
            rec.ParseFromString(payload)
        except Exception:
            continue
        if rec.WhichOneof("record_type") == "run":
            return rec.run
    return None
