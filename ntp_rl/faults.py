"""Deterministic fault injection, so the tests can kill or signal a run at an exact point.

NTP_RL_KILL_AT=<point>:<step>[:<signal>] sends SIGKILL (or the named signal: SIGTERM, SIGUSR2,
as a scheduler would) to the process when it reaches that point of that step. Points: `step`
(after the optimizer step, before logging and saving), `checkpoint_write` (the weights are
written, the checkpoint is not yet complete), `checkpoint_done` (right after a checkpoint is
complete).
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str, step: int) -> None:
    where, _, name = os.environ.get("NTP_RL_KILL_AT", "").partition(f"{point}:{step}")
    if where or not _ or (name and not name.startswith(":")):
        return
    os.kill(os.getpid(), getattr(signal, name[1:]) if name else signal.SIGKILL)
