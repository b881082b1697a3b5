"""Every seed ntp-rl derives, and the RNG state a checkpoint carries.

Runs are reproducible because each random choice draws from a seed that is a pure function
of what it is for (the run seed, a step, a position), never from whatever ran before. All
of those functions live here, so the seeding scheme can be read in one place.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

# Sampling seeds stay below this so that `generate_batch_seed` never overflows int64.
_SAMPLING_SEED_BOUND = 2**40


def mix_seed(*parts: object) -> int:
    """A seed that is a pure function of `parts`, the same in every process (str hash() is salted)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch seeds must fit in int64


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) from the run seed, before anything random happens."""
    from accelerate.utils import set_seed

    set_seed(seed)


def rollout_seed(seed: int, step: int, round_: int, offset: int) -> int:
    """The seed of an RL generate call: run seed, step, sampling round, global index of its first prompt."""
    return mix_seed("rollout", seed, step, round_, offset) % _SAMPLING_SEED_BOUND


def rl_eval_seed(seed: int, chunk: int) -> int:
    """RL's held-out checks sample each chunk of problems with the same seed every time, so their
    changes come from the model, and never depend on which process drew the chunk."""
    return mix_seed("eval", seed, chunk) % _SAMPLING_SEED_BOUND


def eval_chunk_seed(seed: int, chunk: int) -> int:
    """`eval` seeds each generate call on its own, so samples never depend on which process drew it."""
    return seed * 1_000_003 + chunk


def generate_batch_seed(seed: int, batch: int) -> int:
    """One seed per generate batch of a call: samples depend on (seed, batch), not on what ran before."""
    return seed * 100_003 + batch


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy and torch RNG state, as plain tensors and lists (loads with weights_only=True)."""
    mt_name, mt_keys, mt_pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy_keys": torch.from_numpy(np.asarray(mt_keys, dtype=np.int64)),
        "numpy_pos": int(mt_pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
