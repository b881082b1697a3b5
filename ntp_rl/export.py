"""Hugging Face exports written a layer at a time, so that no process ever holds the whole model.

A sharded (FSDP2) run cannot gather its model onto one process for `save_pretrained`: for the
20B MoE that is 80 GB of fp32 weights in one process's memory. Here the model's state is walked
in a fixed order, one group at a time (a decoder layer, which is one FSDP unit, or one tensor
outside the layers: the embeddings, the final norm, an untied head). Every process gathers each
tensor of the group (`DTensor.full_tensor`, a collective, in the same order everywhere); the main
process keeps the group's whole tensors until it has written them as one safetensors file, then
drops them. Peak memory on the main process: its own shard plus one group; elsewhere its shard
plus one tensor.

The files are Hugging Face's sharded layout (model-00001-of-000NN.safetensors and
model.safetensors.index.json), under the names `save_pretrained` writes: transformers' reverse
weight conversion runs per group (a Qwen3-MoE's fused experts become per-expert tensors on disk
where transformers saves them so), a tied head is written once, and config.json,
generation_config.json and a bias MoE's code (named in config.json's auto_map) are written as
`save_pretrained` writes them. So `AutoModelForCausalLM.from_pretrained(dir)` and
`ntp_rl.models.load_pretrained` read it as they read a single-file export.

`ntp-rl export` (ntp_rl/stages/export.py) does the same from a checkpoint on disk: the sharded
state (torch.distributed.checkpoint) is read group by group on one process, without a process
group (`read_sharded_state`), so it too holds one group at a time.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from ntp_rl import sharding

INDEX_FILE = "model.safetensors.index.json"


@dataclass
class ExportReport:
    files: int  # safetensors files written
    tensors: int  # tensors written, under their on-disk names
    total_bytes: int  # the whole model's weights as written
    largest_group_bytes: int  # the largest group's whole tensors
    peak_held_bytes: int  # the most bytes of whole tensors the writing process held at one time
    seconds: float


def exported_names(lm: nn.Module) -> list[str]:
    """The state-dict names an export holds, in state-dict order: a tied weight once (under the name
    transformers keeps, the first one), and nothing the model says to leave out of a save."""
    aliases = {n for n, _ in lm.named_parameters(remove_duplicate=False)} - {n for n, _ in lm.named_parameters()}
    ignored = set(getattr(lm, "_keys_to_ignore_on_save", None) or ())
    return [n for n in lm.state_dict(keep_vars=True) if n not in aliases and n not in ignored]


def weight_groups(lm: nn.Module, names: Iterable[str]) -> list[list[str]]:
    """`names` in groups, in order: a decoder layer's tensors together (the unit FSDP shards, and the unit
    within which transformers' weight conversions combine tensors), every other tensor alone."""
    # A sharded layer's class is FSDP<its class>; the classes are those sharding.shard makes units of.
    classes = sharding.layer_classes(lm)
    prefixes = [f"{name}." for name, module in lm.named_modules()
                if name and type(module).__name__.removeprefix("FSDP") in classes]
    groups: dict[str, list[str]] = {}
    for name in names:
        key = next((p for p in prefixes if name.startswith(p)), name)
        groups.setdefault(key, []).append(name)
    return list(groups.values())


class _GroupWriter:
    """Writes one group's whole tensors per call as the next file of the sharded layout, then the index."""

    def __init__(self, directory: Path, lm: nn.Module, groups: int):
        self.directory, self.lm, self.groups = Path(directory), lm, groups
        self.weight_map: dict[str, str] = {}
        self.total_bytes = self.largest = self.peak = 0
        self.started = time.perf_counter()

    def hold(self, held: dict[str, torch.Tensor]) -> None:
        """Record what the caller holds now (the group gathered so far)."""
        self.peak = max(self.peak, sum(t.numel() * t.element_size() for t in held.values()))

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file
        from transformers.core_model_loading import revert_weight_conversion

        self.hold(tensors)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        self.largest = max(self.largest, size)
        on_disk = {name: tensor.contiguous() for name, tensor in revert_weight_conversion(self.lm, tensors).items()}
        file = f"model-{len(set(self.weight_map.values())) + 1:05d}-of-{self.groups:05d}.safetensors"
        save_file(on_disk, str(self.directory / file), metadata={"format": "pt"})
        self.weight_map.update({name: file for name in on_disk})
        self.total_bytes += sum(t.numel() * t.element_size() for t in on_disk.values())

    def finish(self) -> ExportReport:
        index = {"metadata": {"total_parameters": self.lm.num_parameters(), "total_size": self.total_bytes},
                 "weight_map": dict(sorted(self.weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return ExportReport(files=len(set(self.weight_map.values())), tensors=len(self.weight_map),
                            total_bytes=self.total_bytes, largest_group_bytes=self.largest, peak_held_bytes=self.peak,
                            seconds=time.perf_counter() - self.started)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value on every process: gathered if it is a shard (a collective; FSDP's state-dict hook
    has every parameter as its shard then), else itself (a buffer, which FSDP keeps whole on every process, or
    a tensor of an unsharded model)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return tensor.detach()
    if tensor.device.type != tensor.device_mesh.device_type:  # offloaded shards live on CPU; NCCL gathers on the GPU
        tensor = tensor.to(tensor.device_mesh.device_type)
    return tensor.full_tensor().detach()


def write_config(directory: Path, lm: nn.Module) -> None:
    """What save_pretrained writes besides the weights: config.json (with the dtype and architecture it
    records), generation_config.json, and a custom model's code with config.json's auto_map."""
    from transformers.dynamic_module_utils import custom_object_save

    lm.config.dtype = str(lm.dtype).split(".")[1]
    lm.config.architectures = [type(lm).__name__.removeprefix("FSDP")]
    if lm.is_remote_code():
        custom_object_save(lm, str(directory), config=lm.config)
    lm.config.save_pretrained(directory)
    if lm.can_generate():
        lm.generation_config.save_pretrained(directory)


def write_streamed(directory: Path, lm: nn.Module, is_main: bool) -> Optional[ExportReport]:
    """Export `lm` (sharded or not) into `directory` a group at a time; every process calls it together, and
    only the main process writes (and returns the report)."""
    directory = Path(directory)
    state = lm.state_dict(keep_vars=True)  # references to the shards: nothing is copied here
    groups = weight_groups(lm, exported_names(lm))
    writer = _GroupWriter(directory, lm, len(groups)) if is_main else None
    if writer is not None:
        directory.mkdir(parents=True, exist_ok=True)
        write_config(directory, lm)
    for group in groups:
        held: dict[str, torch.Tensor] = {}
        for name in group:
            whole = _whole(state[name])
            if writer is not None:
                held[name] = whole.cpu()
                writer.hold(held)
            del whole
        if writer is not None:
            writer.write(held)
        del held
    return writer.finish() if writer is not None else None


def write_from_reader(directory: Path, lm: nn.Module, read: Callable[[list[str]], dict[str, torch.Tensor]]) -> ExportReport:
    """Export the model whose structure `lm` has (it may be on the meta device) with the weights `read(names)`
    returns, a group at a time (one process, no collectives)."""
    groups = weight_groups(lm, exported_names(lm))
    writer = _GroupWriter(Path(directory), lm, len(groups))
    for group in groups:
        writer.write(read(group))
    return writer.finish()


def read_sharded_state(sharded_dir: Path, lm: nn.Module) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """A reader of the model's tensors, by the HF model's names, from a checkpoint's sharded/ directory (what
    sharding.save_sharded wrote from the training module that holds the HF model); each call reads only the
    tensors asked for, from every process's file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(sharded_dir)).read_metadata().state_dict_metadata
    prefix = _saved_prefix(saved, exported_names(lm))

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        state = {}
        for name in names:
            meta = saved[prefix + name]
            state[prefix + name] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        with warnings.catch_warnings():  # DCP warns that it reads on one process even when asked to: it is meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(sharded_dir), no_dist=True)
        return {name: state[prefix + name] for name in names}

    return read


def _saved_prefix(saved: dict, names: list[str]) -> str:
    """Where the HF model's state sits in the saved state: `model.` (the model half of the checkpoint) then
    the HF model's path inside the training module (`lm.` in pretrain's ShapedLossLM)."""
    from ntp_rl.errors import DataError

    first = names[0]
    found = [key[: -len(first)] for key in saved if key.startswith("model.") and key.endswith(f".{first}")]
    whole = [prefix for prefix in found if all(prefix + name in saved for name in names)]
    if len(whole) > 1:  # two copies of the model in one training module: which is the trained one is not known here
        raise DataError(f"the sharded state holds the model {len(whole)} times ({', '.join(p.rstrip('.') for p in whole)})")
    if whole:
        return whole[0]
    missing = next((n for n in names if not any(p + n in saved for p in found)), first)
    raise DataError(f"the sharded state does not hold the model its config.json describes (no {missing})")


def meta_model(checkpoint: Path) -> nn.Module:
    """The checkpoint's model built from its config.json on the meta device: names, shapes and conversions,
    no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ntp_rl import moe

    moe.register_checkpoint_classes()
    config = AutoConfig.from_pretrained(checkpoint)
    model_cls = moe.model_class(config)
    with torch.device("meta"):
        return model_cls(config) if model_cls is not None else AutoModelForCausalLM.from_config(config)
