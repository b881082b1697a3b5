"""`ntp-rl export <run or checkpoint> [export.out_dir=DIR]`: a checkpoint as a Hugging Face model directory.

The directory holds what `AutoModelForCausalLM.from_pretrained(DIR)` needs and nothing of the
training state (optimizer, RNG, trainer state, FSDP shards). From a sharded (FSDP2) checkpoint
the weights are rebuilt from the shards, the state resume continues from, a decoder layer at a
time on this one process (ntp_rl/export.py), so the export of a model that fits no single
machine's memory needs one layer's worth; from any other checkpoint its Hugging Face files are
copied as they are. Written into a hidden directory and renamed into place when whole.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ntp_rl.checkpoint import SHARDED_STATE, TRAINER_STATE, is_complete, latest_checkpoint
from ntp_rl.errors import DataError, UserError, first_line

USAGE = ("usage: ntp-rl export <run dir or checkpoint dir> [export.out_dir=DIR]\n"
         "  writes the latest checkpoint's Hugging Face export (weights, config, tokenizer) into DIR\n"
         "  (default: <run dir>/export/<step_N>); from FSDP shards it is rebuilt a layer at a time")
KEYS = ("export.run", "export.out_dir")
# Files of a checkpoint that are training state, not the model.
TRAINING_FILES = {TRAINER_STATE, "trainer_state.json", "optimizer.pt", "optimizer.bin"}


def main(argv: Sequence[str]) -> Optional[dict]:
    if {"-h", "--help"} & set(argv):
        print(USAGE)
        raise SystemExit(0)  # as compare's --help does
    given = _parse(argv)
    if "export.run" not in given:
        raise UserError(f"export.run: is required: {USAGE.splitlines()[0].removeprefix('usage: ')}")
    checkpoint = find_checkpoint(given["export.run"])
    out_dir = Path(given.get("export.out_dir") or default_out_dir(checkpoint)).expanduser()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"export.out_dir={out_dir}: already exists and is not an empty directory; name a new one")
    return run(checkpoint, out_dir)


def _parse(argv: Sequence[str]) -> dict[str, str]:
    given: dict[str, str] = {}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq:
            key, value = "export.run", arg
        if key not in KEYS:
            raise UserError(f"{key}: unknown key for export; keys: {', '.join(KEYS)}")
        if key in given:
            raise UserError(f"{key}: given twice ({given[key]} and {value})")
        given[key] = value
    return given


def find_checkpoint(run: str) -> Path:
    """A checkpoint directory, or a run directory (or its checkpoints/) -> its latest complete checkpoint."""
    path = Path(run).expanduser()
    if not path.is_dir():
        raise DataError(f"export.run={run}: no such directory")
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise DataError(f"export.run={run}: no checkpoint there (neither a run directory with complete checkpoints "
                    "nor a checkpoint directory)")


def default_out_dir(checkpoint: Path) -> Path:
    run_dir = checkpoint.parents[1] if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    return run_dir / "export" / checkpoint.name


def run(checkpoint: Path, out_dir: Path) -> dict:
    from torch.distributed.checkpoint.api import CheckpointException

    from ntp_rl.export import meta_model, read_sharded_state, write_from_reader
    from ntp_rl.io import build_directory_atomically
    from ntp_rl.rundir import shown_path

    sharded = (checkpoint / SHARDED_STATE).is_dir()
    reports = []

    def write(tmp: Path) -> None:
        for path in _model_files(checkpoint):
            if not (sharded and _is_weights(path)):
                shutil.copy2(path, tmp / path.name)
        if sharded:
            lm = meta_model(checkpoint)
            reports.append(write_from_reader(tmp, lm, read_sharded_state(checkpoint / SHARDED_STATE, lm)))

    if out_dir.is_dir():  # empty, as main checked: the whole export is renamed into its place
        out_dir.rmdir()
    try:
        build_directory_atomically(out_dir, write, what=f"the export of {checkpoint}")
    except DataError as exc:  # the shards do not hold the model config.json describes
        raise DataError(f"export.run={checkpoint}: {exc}") from exc
    # CheckpointException (DCP's unreadable shards) is a BaseException of its own.
    except (OSError, RuntimeError, ValueError, KeyError, CheckpointException) as exc:
        cause = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) else exc
        raise DataError(f"export.run={checkpoint}: cannot read the checkpoint ({first_line(cause)})") from exc
    report = reports[0] if reports else None
    source = "rebuilt from the FSDP shards" if sharded else "copied"
    print(f"ntp-rl export: {shown_path(checkpoint)} -> {shown_path(out_dir)} ({source})", flush=True)
    if report is not None:
        print(f"  {report.files} files, {_size(report.total_bytes)} of weights; at most {_size(report.peak_held_bytes)} "
              f"held at once (one layer group); {report.seconds:.2f} s", flush=True)
    print(f"  load with: AutoModelForCausalLM.from_pretrained({str(out_dir)!r}"
          f"{', trust_remote_code=True' if any(out_dir.glob('*.py')) else ''})", flush=True)
    return {"checkpoint": str(checkpoint), "out_dir": str(out_dir), "sharded": sharded,
            "report": None if report is None else vars(report)}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _is_weights(path: Path) -> bool:
    from ntp_rl.export import INDEX_FILE

    return path.suffix == ".safetensors" or path.name == INDEX_FILE


def _model_files(checkpoint: Path) -> Iterable[Path]:
    """The checkpoint's files that belong to the Hugging Face model: all but the training state."""
    for path in sorted(checkpoint.iterdir()):
        if path.is_file() and path.name not in TRAINING_FILES and not path.name.startswith(("rng_state_", "optimizer_")):
            yield path
