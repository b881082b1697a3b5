"""Run by tests/test_fsdp.py under `torch.distributed.run --nproc_per_node 2`: the second process builds the model on
the meta device only, and `sharding.shard` gives it the first process's weights and buffers."""

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import Qwen3Config, Qwen3ForCausalLM

from ntp_rl import sharding


def tiny() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16))


dist.init_process_group("gloo")
rank = dist.get_rank()
expected = tiny()  # what the first process builds (seeded), for the comparison only
if rank == 0:
    lm = tiny()
else:
    with torch.device("meta"):
        lm = Qwen3ForCausalLM(expected.config)
    assert all(p.is_meta for p in lm.parameters())
model = sharding.shard(lm, lm, torch.device("cpu"), bf16=False)
assert all(p.to_local().numel() < p.numel() for p in model.parameters() if p.shape[0] > 1), "every parameter is sharded"
got = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
for name, tensor in expected.state_dict().items():
    assert torch.equal(got[name], tensor), name
for (name, buffer), (_, want) in zip(model.named_buffers(), expected.named_buffers()):
    assert torch.equal(buffer, want), name  # RoPE's inverse frequencies are in no state dict
dist.barrier()
print(f"rank {rank}: ok")
dist.destroy_process_group()
