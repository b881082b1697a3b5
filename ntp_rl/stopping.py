"""Stopping a run on a signal, as Ctrl-C does: one line, `interrupted` in run.json, a checkpoint first.

SIGTERM is what `kill`, `scancel` and SLURM (on time-out or pre-emption) send; submitit's
launchers send SIGUSR2 before a job's time runs out, and requeue the job when its callable
is checkpointable. Inside a training loop that can checkpoint (`checkpointing()`), either
signal asks the loop to stop at the end of its current step, after saving a checkpoint
(`stop_if_asked`); elsewhere (building data, an eval, a second signal) it stops the run at
once. Either way the run is marked interrupted and `resume=auto` continues it.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal; a KeyboardInterrupt, so that every place that records Ctrl-C records it."""

    def __init__(self, signame: str, then: Optional[Callable[[], None]] = None):
        super().__init__(signame)
        self.signame = signame
        self.then = then  # what the signal's owner does once the run has stopped (submitit: requeue the job)

    @property
    def exit_code(self) -> int:
        return 128 + getattr(signal, self.signame, signal.SIGTERM).value


_state: dict[str, Any] = {"loops": 0, "asked": None}


def _on_signal(signum: int, frame: Any, then: Optional[Callable[[], None]] = None) -> None:
    stop = Stopped(signal.Signals(signum).name, then)
    if _state["loops"] and _state["asked"] is None:
        _state["asked"] = stop  # the loop saves a checkpoint at the end of this step, then raises it
        return
    raise stop


def install() -> None:
    """SIGTERM stops a run as Ctrl-C does, after a checkpoint when a loop is running (main thread only)."""
    try:
        signal.signal(signal.SIGTERM, _on_signal)
    except ValueError:  # not the main thread: the signal keeps its default
        pass


def install_requeue(signum: int) -> None:
    """Under submitit: its pre-emption signal first lets the loop checkpoint, then runs submitit's own handler,
    which checkpoints the job's callable and requeues it (the requeued job resumes the run)."""
    previous = signal.getsignal(signum)
    if not callable(previous):
        return
    signal.signal(signum, lambda s, frame: _on_signal(s, frame, then=lambda: previous(s, None)))


@contextmanager
def checkpointing() -> Iterator[None]:
    """A training loop that calls stop_if_asked at the end of each step runs inside this."""
    _state["loops"] += 1
    try:
        yield
    finally:
        _state["loops"] -= 1
        asked, _state["asked"] = _state["asked"], None
    if asked is not None:  # asked after the loop's last step (its final evaluation): stop now
        raise asked


def stop_if_asked(accelerator: Any, save: Callable[[], Any]) -> None:
    """At the end of a step: if a signal asked any process to stop, all save a checkpoint together and stop."""
    import torch

    asked = _state["asked"]
    if accelerator.num_processes > 1:  # a signal may reach the processes at different steps; they must agree
        flag = torch.tensor([0.0 if asked is None else 1.0], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() == 0:
            return
    elif asked is None:
        return
    save()
    raise asked or Stopped("SIGTERM")

