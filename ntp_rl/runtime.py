"""The process a stage runs in: Accelerate, precision, how many processes, and perf figures."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ntp_rl.config.schema import Precision

# Dense bf16 peak of the cards people run this on, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "RTX 4090": 165e12}


def resolved_precision(precision: Precision) -> Precision:
    """auto -> bf16 on GPU, fp32 on CPU."""
    if precision is Precision.auto:
        return Precision.bf16 if torch.cuda.is_available() else Precision.fp32
    return precision


def launched_processes() -> int:
    """Processes of this launch, as torchrun / accelerate launch announce them to each process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state() -> Any:
    """Accelerate's view of this launch, before any Accelerator exists (the pipeline's stages share it).

    cpu=True on machines without a GPU is what makes several launched processes form a gloo
    process group (Accelerate's MULTI_CPU) instead of each training alone; the state is made
    once per process, so this must be how it is first made.
    """
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def make_accelerator(precision: Precision, wandb_mode_resolved: str) -> Any:
    from accelerate import Accelerator

    mixed = "bf16" if resolved_precision(precision) is Precision.bf16 else "no"
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    log_with = None if wandb_mode_resolved == "disabled" else "wandb"
    # cpu=True on machines without a GPU: see process_state.
    return Accelerator(mixed_precision=mixed, log_with=log_with, cpu=not torch.cuda.is_available(),
                       step_scheduler_with_optimizer=False)


def parallelism(accelerator: Any) -> dict[str, Any]:
    """How this run is split over processes, as run.json records it: fsdp2, fsdp1, ddp or single."""
    from accelerate.utils import DistributedType

    from ntp_rl import sharding

    kind = accelerator.distributed_type
    if sharding.requested() and accelerator.num_processes > 1:
        name = "fsdp2"  # ntp-rl shards with torch's fully_shard, whatever Accelerate set up (ntp_rl/sharding.py)
    elif kind is DistributedType.FSDP:
        name = "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    elif kind is DistributedType.NO:
        name = "single"
    else:
        name = "ddp"  # MULTI_CPU, MULTI_GPU, ...: every process holds the whole model
    return {"kind": name, "world_size": accelerator.num_processes}


def check_parallelism(accelerator: Any) -> None:
    """A launch that asked for FSDP (`accelerate launch --config_file scripts/accelerate/fsdp.yaml`) and would get
    anything else stops here: FSDP2 is sharded by ntp-rl itself on CPU and GPU (ntp_rl/sharding.py); FSDP1
    is Accelerate's, which on CPU falls back to DDP without a word."""
    from accelerate.utils import DistributedType
    from accelerate.utils.environment import str_to_bool

    from ntp_rl import sharding
    from ntp_rl.errors import UserError

    asked = str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false"))
    if asked and not sharding.requested() and accelerator.distributed_type is not DistributedType.FSDP:
        version = os.environ.get("FSDP_VERSION", "1")
        raise UserError(f"accelerate launch asked for FSDP (fsdp_version {version}) but the run was set up as "
                        f"{parallelism(accelerator)['kind']}, which would not shard anything; use fsdp_version: 2 "
                        "(scripts/accelerate/fsdp.yaml), which ntp-rl shards on CPU and GPU alike")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux, bytes on macOS
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def flops_per_token(num_params_no_embedding: int, num_layers: int, num_heads: int, head_dim: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus the attention scores (PaLM appendix B)."""
    return 6 * num_params_no_embedding + 12 * num_layers * num_heads * head_dim * seq_len


def _cpu_model() -> Optional[str]:
    """The CPU's model name as the kernel reports it (Linux); platform.processor() is often just the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def environment(device: Any, distributed: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What a run's numbers depend on beyond its config, recorded in run.json: library versions, the
    CPU threads torch uses (reductions are summed in another order with another count), the device,
    the CPU and the vector instructions torch's CPU kernels run with (`cpu_capability`: AVX2 and AVX512
    kernels round differently, so the same run on another CPU drifts, and a threshold such as
    train.stop_at turns that drift into another stopping step), and how the run is split over processes."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> Optional[str]:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    device = torch.device(device)
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": installed("transformers"),
            "ntp_rl": installed("ntp-rl"), "accelerate": installed("accelerate"), "torch_threads": torch.get_num_threads(),
            "device": device.type, "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                   else platform.processor() or platform.machine()),
            "cpu": _cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cuda": torch.version.cuda, "distributed": distributed or {"kind": "single", "world_size": 1}}
