"""Writing files so that a reader never sees half of one: write beside it, then rename into place.

A kill at any moment leaves either the old file (or none) or the whole new one, so a run's
records never look complete when they are not.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ntp_rl.errors import StorageError

# How the writers that do not raise OSError say the disk is full: safetensors (Rust's io error 28, 122 for a
# quota), and torch.save's zip writer, which only finds the file shorter than what it wrote.
_OUT_OF_SPACE = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return any(s in text for s in _OUT_OF_SPACE) or ("inline_container" in text and "unexpected pos" in text)


@contextmanager
def writing(path: Path, what: str, then: str = "free some space, then run the same command again (with "
            "resume=auto for a run that has checkpoints)") -> Iterator[None]:
    """A full disk while writing `what` to `path` becomes one line naming both (StorageError); other errors pass."""
    try:
        yield
    except Exception as exc:
        if not out_of_space(exc):
            raise
        raise StorageError(f"no space left on the device while writing {what} to {path}; {then}") from exc


def write_atomic(path: Path, text: str) -> None:
    """The one place files are written whole: a hidden sibling, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path, path.name):
            tmp.write_text(text)
    except StorageError:
        tmp.unlink(missing_ok=True)  # its bytes are what the run's failure record needs
        raise
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_csv_atomic(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def build_directory_atomically(target: Path, write: Callable[[Path], None], what: str = "a directory") -> None:
    """Build a directory beside `target` with `write(tmp)` and rename it into place.

    Readers see either nothing or a complete directory. When two processes race, the
    first rename wins and the loser throws its copy away. A full disk is said in one line.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        with writing(target, what):
            write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; what is built here is meant to be shared
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
