"""Real W&B, offline: what a lineage's runs write to W&B's own files is what metrics.jsonl holds,
under the lineage's group, each stage's job type and the settings' tags."""

import json
import struct
from pathlib import Path

from conftest import TINY
from ntp_rl.config.compose import compose
from ntp_rl.stages import run_stage
from ntp_rl.tracking import read_metrics

_BLOCK = 32 * 1024  # W&B's .wandb files are LevelDB-style logs: records in chunks, in 32 KiB blocks
_HEADER = 7  # ":W&B", a magic 0xBEE1, a version byte
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every protobuf Record of an offline run's .wandb file, in order."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, at = [], b"", _HEADER
    while at + 7 <= len(data):
        room = _BLOCK - at % _BLOCK
        if room < 7:  # a block's tail too short for a chunk header is padding
            at += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[at:at + 7])
        chunk = data[at + 7:at + 7 + length]
        at += 7 + length
        if length == 0 and kind == 0:
            continue
        pending += chunk
        if kind in (_FULL, _LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(records: list) -> dict[int, dict]:
    """step -> every value logged at that step (W&B may write one step's values in several records)."""
    rows: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.setdefault(int(row.pop("_step")), {}).update(row)
    return rows


def test_a_lineage_logs_to_wandb_offline_with_group_job_type_and_tags(tmp_path, shared_cache):
    overrides = ["loss=precision"]
    args = [*TINY, "stages=[pretrain,eval_base]", "eval.n=2", "eval.ks=[1,2]", "eval.num_problems=4",
            "sampling.max_new_tokens=8", "diagnostics.num_sequences=4", "logger.wandb.mode=offline",
            f"out_dir={tmp_path}", f"data.cache_dir={shared_cache}", *overrides]
    result = run_stage("pipeline", compose("pipeline", args), overrides=overrides)
    lineage = Path(result["lineage"])

    for stage, job_type in (("pretrain", "pretrain"), ("eval_base", "eval")):
        (run_file,) = (lineage / stage / "wandb").glob("offline-run-*/run-*.wandb")
        records = wandb_records(run_file)
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert run.run_group == lineage.name == "pipeline-loss=precision"
        assert run.job_type == job_type and "loss=precision" in run.tags
        assert run.display_name == f"pipeline-loss=precision/{stage}"
        logged = history(records)
        local = {row["step"]: row for row in read_metrics(lineage / stage)}
        assert logged and set(logged) == set(local), stage
        for step, row in local.items():
            for key, value in row.items():
                if key != "step" and isinstance(value, float):
                    assert logged[step][key] == value, (stage, step, key)
