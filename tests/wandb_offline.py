"""Read what W&B wrote in offline mode: the records of a run-<id>.wandb file.

wandb >= 0.2x writes them from its Go core and ships no Python reader, so this reads the
format directly: a 7-byte file header (":W&B", magic, version), then LevelDB-log records
in 32 KiB blocks (7-byte header: crc32, length, type; FULL = 1, FIRST = 2, MIDDLE = 3,
LAST = 4), each payload a wandb_internal_pb2.Record.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32768
RECORD_HEADER = 7


def run_files(root: Path) -> list[Path]:
    return sorted(Path(root).glob("wandb/offline-run-*/run-*.wandb"))


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    position, pending = 7, b""
    while position + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < RECORD_HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + RECORD_HEADER])
        pending += data[position + RECORD_HEADER:position + RECORD_HEADER + length]
        position += RECORD_HEADER + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def read_run(path: Path) -> dict[str, Any]:
    """The run's job_type, group, project and name, and its logged history as {key: {field: value}}."""
    run: dict[str, Any] = {"history": {}}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"job_type": record.run.job_type, "group": record.run.run_group, "project": record.run.project,
                    "name": record.run.display_name, "tags": list(record.run.tags)}
        elif kind == "history":
            for item in record.history.item:
                keys = list(item.nested_key) or [item.key]
                run["history"].setdefault(keys[0], {})["/".join(keys[1:]) or "value"] = json.loads(item.value_json)
    return run


def history_by_step(path: Path) -> dict[int, dict[str, Any]]:
    """step -> every value logged at that step, by its full key (W&B may split one step over several records)."""
    rows: dict[int, dict[str, Any]] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(int(row.pop("_step")), {}).update(row)
    return rows
