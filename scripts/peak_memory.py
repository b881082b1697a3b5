"""Peak memory of one step above what is held before it, shared by the benchmark scripts.

CUDA allocator statistics on GPU. On CPU freed memory stays in the process, so each measured
variant runs in a process of its own (`run_isolated`), with glibc told to return large blocks
on free, and the peak RSS above the starting point is read from /proc (Linux).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def start(cuda: bool) -> int:
    """Reset the peak counter; the bytes held now, which `extra_since` subtracts."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak-RSS counter
        f.write("5")
    return _rss_kib("VmRSS:") * 1024


def extra_since(base: int, cuda: bool) -> int:
    """Peak bytes above `base` since `start`."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0)
    return max(_rss_kib("VmHWM:") * 1024 - base, 0)


def run_isolated(script: str, args: list[str]) -> dict:
    """`script args` in a fresh process; the JSON object on its last line of output."""
    # A fixed mmap threshold stops glibc from keeping freed large blocks in the heap, so a
    # warm-up step's memory is returned and the measured step's peak is its own.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
