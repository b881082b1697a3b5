"""Starting vLLM inside this process: the variables its external launcher reads, set for the start and
then restored, and the caller's state (RNGs, torch's thread count) that starting it would change."""

from __future__ import annotations

import contextlib
import os
import random
import socket
from typing import Iterator

import torch

from ntp_rl.errors import ConfigError


@contextlib.contextmanager
def launcher_env(tensor_parallel_size: int) -> Iterator[None]:
    """The variables the external launcher reads, from torch.distributed when Accelerate started it.

    Each process is its own data-parallel engine (vLLM's "external DP"); with
    tensor_parallel_size > 1, consecutive ranks form one engine.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if world % tensor_parallel_size:
            raise ConfigError("vllm.tensor_parallel_size", f"must divide the number of processes ({world})",
                              tensor_parallel_size)
        wanted = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": os.environ.get("LOCAL_RANK", str(rank))}
    else:
        if tensor_parallel_size != 1:
            raise ConfigError("vllm.tensor_parallel_size", "needs as many processes (accelerate launch)",
                              tensor_parallel_size)
        wanted = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    wanted.setdefault("MASTER_ADDR", os.environ.get("MASTER_ADDR", "127.0.0.1"))
    wanted.setdefault("MASTER_PORT", os.environ.get("MASTER_PORT") or str(_free_port()))
    before = {k: os.environ.get(k) for k in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        # Left set, they would make a later Accelerator in this process think it was launched distributed.
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def caller_state_kept() -> Iterator[None]:
    """Undoes what starting vLLM does to the process: it reseeds every RNG, and its CPU worker
    replaces torch.set_num_threads with a no-op (for good, which would silently pin the trainer)."""
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    with rng_kept():
        try:
            yield
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)


@contextlib.contextmanager
def rng_kept() -> Iterator[None]:
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
