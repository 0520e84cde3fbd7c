"""Read back what an offline W&B run wrote: history rows from ``run-<id>.wandb`` and the media files.

The file is LevelDB log framing: a 7-byte header (``:W&B``, uint16 0xBEE1, uint8 version), then 32 KiB blocks
(counted from the start of the file) of chunks ``<crc32 uint32><length uint16><type uint8><payload>`` with
type 1 = full, 2 = first, 3 = middle, 4 = last and crc32 over the type byte and the payload; a record's
payload is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path, timeout: float = 20.0) -> list[wandb_internal_pb2.Record]:
    """The file's records once it is whole: W&B's service process may still be writing it when ``wandb.finish()``
    has returned (seen as a chunk failing its checksum, or as missing rows), so read until the run's ``exit``
    record, its last, is in."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            out = _parse(Path(path).read_bytes())
            problem = "" if any(r.WhichOneof("record_type") == "exit" for r in out) else "no exit record"
        except AssertionError as error:
            problem = str(error)
        if not problem:
            return out
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: not a complete W&B run log after {timeout} s: {problem}")
        time.sleep(0.1)


def _parse(data: bytes) -> list[wandb_internal_pb2.Record]:
    assert len(data) >= HEADER.size, "no header yet"  # W&B 0.19 creates the file before its service writes to it
    magic, bee, _ = HEADER.unpack_from(data)
    assert magic == b":W&B" and bee == 0xBEE1, "not a W&B transaction log"
    position, pending, out = HEADER.size, b"", []
    while position + CHUNK.size <= len(data):
        room = BLOCK - position % BLOCK
        if room < CHUNK.size:  # block trailer: zero padding
            position += room
            continue
        crc, length, kind = CHUNK.unpack_from(data, position)
        payload = data[position + CHUNK.size : position + CHUNK.size + length]
        position += CHUNK.size + length
        if kind == 0 and length == 0:  # padding up to the end of the block
            position += BLOCK - position % BLOCK if position % BLOCK else 0
            continue
        assert zlib.crc32(bytes([kind]) + payload) == crc, f"corrupt chunk at byte {position}"
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        out.append(record)
        pending = b""
    return out


def history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's history rows, ``{key: value}`` with nested keys joined by ``/`` (W&B 0.31 writes a media object
    as one item per field, under ``nested_key``; W&B 0.17 as one item holding a JSON object: both read alike)."""
    run_dir = Path(run_dir)
    (log,) = run_dir.glob("run-*.wandb")
    rows = []
    for record in records(log):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            key = "/".join(item.nested_key) if item.nested_key else item.key
            _flatten(row, key, json.loads(item.value_json))
        rows.append(row)
    return rows


def _flatten(row: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for field, inner in value.items():
            _flatten(row, f"{key}/{field}", inner)
    else:
        row[key] = value


def run_dirs(wandb_dir: str | Path) -> list[Path]:
    """Offline run folders under a ``WANDB_DIR``."""
    return sorted(Path(wandb_dir).glob("**/offline-run-*"))


def media_paths(rows: list[dict[str, Any]]) -> list[str]:
    """The media files (relative to the run's ``files`` folder) that :func:`history` rows refer to."""
    found: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key.endswith("/filenames"):
                found += value
            elif key.endswith("/path") and isinstance(value, str):
                found.append(value)
    return found
