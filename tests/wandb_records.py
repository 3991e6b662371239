"""Read an offline W&B run file (`run-<id>.wandb`) with wandb's own protobuf `Record` type.

wandb ≥ 0.19 no longer ships a Python reader for this file, so this is the few lines of its
documented framing: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log blocks
of 32 KiB holding chunks (crc32c, length, type: full/first/middle/last) of serialised Records.
"""

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path, timeout_s: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """All records, once the file is complete: wandb's service may still be writing the tail
    for a moment after `run.finish()` returns, so wait for the exit record."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = _parse(Path(path).read_bytes())
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _parse(data: bytes) -> list[wandb_internal_pb2.Record]:
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B run file"
    records, pending, pos = [], b"", 7
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:
            break  # zero padding: end of the written data
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        if len(chunk) < length:
            break  # a chunk still being written
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def history(path: Path) -> list[dict]:
    """The logged history rows, each as {key: value} including `_step`."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def run_info(path: Path) -> dict:
    """The run record's id and its config ({key: value})."""
    for record in read_records(path):
        if record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            return {"id": record.run.run_id, "config": config, "resumed": record.run.resumed}
    raise AssertionError(f"no run record in {path}")
