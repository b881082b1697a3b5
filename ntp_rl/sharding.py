"""FSDP2: parameters, gradients and optimizer state split over the processes, with torch's `fully_shard`.

`accelerate launch --config_file scripts/accelerate/fsdp.yaml` asks for it (Accelerate puts
ACCELERATE_USE_FSDP=true and FSDP_VERSION=2 in every process's environment); ntp-rl then shards the
model itself rather than through `accelerator.prepare`. Why: Accelerate 1.16 sets FSDP up on
accelerator devices only; on CPU the same launch becomes MULTI_CPU, which is DDP, without a word.
Sharding here is one code path on CPU (gloo) and GPU (NCCL) alike, so what CI runs on 2 CPU
processes is what runs on the GPUs. Accelerate still starts the processes, picks the devices and
the process group, and reduces metrics.

Each decoder layer is its own FSDP unit (its parameters are gathered for its forward and backward
only, and freed after if FSDP_RESHARD_AFTER_FORWARD is true); the root unit holds the embeddings,
the final norm and the LM head. Parameters become DTensors sharded on their first dimension; the
optimizer is built on them, so its state is sharded too. Gradients are reduce-scattered and
averaged over the processes, as DDP averages them, so an N-process run takes the same steps as a
1-process run of the same global batch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


def _env_flag(name: str, default: str) -> bool:
    """A true/false setting `accelerate launch` put in the environment from the launch config."""
    from accelerate.utils.environment import str_to_bool

    return bool(str_to_bool(os.environ.get(name, default)))


def requested() -> bool:
    """This process was launched with an FSDP2 config (scripts/accelerate/fsdp.yaml)."""
    return _env_flag("ACCELERATE_USE_FSDP", "false") and os.environ.get("FSDP_VERSION", "1") == "2"


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def layer_classes(lm: nn.Module) -> set[str]:
    """The classes that are an FSDP unit each: the launch config's list, else the model's own
    (`_no_split_modules`: its decoder layer)."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return {name.strip() for name in named.split(",") if name.strip()} or set(getattr(lm, "_no_split_modules", None) or ())


def shard(model: nn.Module, lm: nn.Module, device: torch.device, bf16: bool) -> nn.Module:
    """Shard `model` (which holds the Hugging Face model `lm`) over every process: one unit per decoder
    layer, then the root. With bf16 the gathered parameters and the compute are bf16, while the
    sharded parameters, the optimizer state and the gradient reduction stay fp32.

    The first process holds the whole model; the others hold its shape on the meta device, and every
    process then receives its shards (and the buffers) from the first: no other process ever
    materialises the whole model, and all start from the first's weights."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from ntp_rl.errors import UserError

    names = layer_classes(lm)
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"FSDP: no module of {type(lm).__name__} is of the classes to shard by layer "
                        f"(FSDP_TRANSFORMER_CLS_TO_WRAP / fsdp_transformer_layer_cls_to_wrap: {', '.join(sorted(names)) or 'none'})")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    reshard = _env_flag("FSDP_RESHARD_AFTER_FORWARD", "true")
    # fsdp_offload_params: the shards and the optimizer step live in CPU memory, gathered onto the GPU per unit.
    offload = CPUOffloadPolicy() if _env_flag("FSDP_OFFLOAD_PARAMS", "false") else OffloadPolicy()
    empty = any(p.is_meta for p in model.parameters())
    whole = {} if empty else model.to(device).state_dict()  # the first process's weights, kept until sent
    for layer in layers:
        fully_shard(layer, mp_policy=policy, offload_policy=offload, reshard_after_forward=reshard)
    # The root's parameters are needed again at once by backward: kept gathered between the two.
    fully_shard(model, mp_policy=policy, offload_policy=offload, reshard_after_forward=False)
    if empty:
        model.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are not sharded, and those not saved (RoPE's inverse frequencies) are in no state dict.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


@contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Every unit's parameters gathered and kept whole until the block ends, then resharded: for sampling,
    where `generate` runs the layers' forwards many times, a different number on each process, so no
    collective may happen inside. Every process enters and leaves together; the peak extra memory is one
    whole copy of the model's parameters (in the compute dtype) on each process."""
    from torch.distributed.fsdp import FSDPModule

    if not is_sharded(model):
        yield
        return
    # The root must know it is the root before a layer's forward runs outside the root's own forward;
    # FSDP2 decides that lazily, at the first root forward (a private call: no public one does it).
    model._get_fsdp_state()._lazy_init()
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(_env_flag("FSDP_RESHARD_AFTER_FORWARD", "true"))
        model.set_reshard_after_forward(False, recurse=False)


def whole_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`module`'s parameters whole, one at a time, under their names in it: for copying a sharded model into
    a sampling engine without a full copy. A sharded parameter is gathered from every process just before
    it is yielded (a collective: every process must walk all of them, in the same order) and is freed as
    soon as the consumer lets it go, so the extra memory is what the consumer holds at once (vLLM: the
    incoming weights of one of its layers), not the model. Unsharded parameters are yielded as they are."""
    from torch.distributed.tensor import DTensor

    for name, param in module.named_parameters():
        param = param.detach()
        yield name, param.full_tensor() if isinstance(param, DTensor) else param


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce-scatter gradients in this backward only when `sync` (the last micro-batch of a step); before
    it they accumulate unreduced, as DDP's no_sync does."""
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, on the main process only (empty elsewhere); every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(directory: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Each process writes its own shard of the model and optimizer state (torch.distributed.checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load_sharded(directory: os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read a sharded checkpoint back into this run's shards; DCP reshards when the number of processes
    differs from the run that wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
