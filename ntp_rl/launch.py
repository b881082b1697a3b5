"""Sweeps as separate processes: one launch per sweep point, optionally several at once.

Hydra's `-m` runs every point inside one Python process, which cannot work under
`accelerate launch` (Accelerate's state is one per process, and each point must be
launched on all GPUs). Here each point is its own command, e.g.

    accelerate launch --num_processes 8 -m ntp_rl pipeline loss=precision seed=1

run one after another (or `jobs` at a time on a CPU machine, with the cores split between
them), and the sweep waits for all of them. The points are expanded with Hydra's own
sweep grammar, so `loss=ce,precision seed=0,1` means the same four jobs as with `-m`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ntp_rl.errors import UserError, first_line


def sweep_points(overrides: Sequence[str]) -> list[list[str]]:
    """`["loss=ce,precision", "seed=0,1"]` -> the four override lists of the cross product."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as exc:  # Hydra's grammar errors
        raise UserError(first_line(exc)) from None
    return [list(point) for point in BasicSweeper.split_arguments(parsed, None)[0]]


@dataclass
class PointResult:
    overrides: list[str]
    returncode: int
    seconds: float
    log: Path


def launch_points(stage: str, points: Sequence[Sequence[str]], *, launcher: str = "", jobs: int = 1,
                  log_dir: Path, extra_env: Optional[dict] = None) -> list[PointResult]:
    """Run `<launcher> -m ntp_rl <stage> <point>` for every point and wait for all of them.

    `launcher` is e.g. "accelerate launch --num_processes 8" (empty: plain `python`). With
    jobs > 1 the machine's cores are shared out through OMP_NUM_THREADS, which is what
    small models on CPUs use best. Each point's output goes to `log_dir/<i>.log`.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))  # logs that can be followed while it runs
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))

    def run(index: int) -> PointResult:
        point = list(points[index])
        log = log_dir / f"{index}.log"
        command = [*prefix, "-m", "ntp_rl", stage, *point]
        start = time.perf_counter()
        with open(log, "w") as out:
            out.write(f"$ {shlex.join(command)}\n")
            out.flush()
            code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        return PointResult(point, code, time.perf_counter() - start, log)

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(run, range(len(points))))
