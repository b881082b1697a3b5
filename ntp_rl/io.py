"""Writing files so that a reader never sees half of one: write beside it, then rename into place.

A kill at any moment leaves either the old file (or none) or the whole new one, so a run's
records never look complete when they are not.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence


def write_atomic(path: Path, text: str) -> None:
    """The one place files are written whole: a hidden sibling, then os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any) -> None:
    write_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def write_csv_atomic(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(columns)
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


def build_directory_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Build a directory beside `target` with `write(tmp)` and rename it into place.

    Readers see either nothing or a complete directory. When two processes race, the
    first rename wins and the loser throws its copy away.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; what is built here is meant to be shared
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
