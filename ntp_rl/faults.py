"""Deterministic fault injection, so the tests can kill a run at an exact point.

NTP_RL_KILL_AT=<point>:<step> sends SIGKILL to the process when it reaches that point of
that step. Points: `step` (after the optimizer step, before logging and saving),
`checkpoint_write` (the weights are written, the checkpoint is not yet complete),
`checkpoint_done` (right after a checkpoint is complete).
"""

from __future__ import annotations

import os
import signal


def kill_point(point: str, step: int) -> None:
    if os.environ.get("NTP_RL_KILL_AT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
