"""Run by tests/test_vllm.py under `accelerate launch --num_processes 2`: a policy sharded with FSDP2 is copied
into each process's vLLM engine by rl's weight sync, the stream that gathers one parameter at a time. Measures
the torch memory the sync allocates beyond what was held before it (peak), for the stream and, as a control,
for the same weights gathered into a list first; then checks that the engine scores with the synced weights.
Rank 0 writes the figures as JSON."""

import json
import sys

import torch
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile
from transformers import AutoTokenizer

from ntp_rl import sharding
from ntp_rl.models import load_pretrained
from ntp_rl.rl.rollout import PolicyLogprobs
from ntp_rl.stages.rl_sample import policy_weights
from ntp_rl.vllm_engine import VLLMConfig, VLLMGenerator


def peak_allocated(run) -> int:
    """Bytes: the highest torch CPU memory allocated while `run()` runs, above what was allocated when it began."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


checkpoint, config, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
lm = load_pretrained(checkpoint, key="init_from", empty=rank != 0)  # as in rl: the first process holds the model
policy = PolicyLogprobs(lm, chunk_size=512)
policy = sharding.shard(policy, lm, torch.device("cpu"), bf16=False)
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
engine = VLLMGenerator(checkpoint, tokenizer, (), VLLMConfig(**config))

with torch.no_grad():  # the policy moves away from the checkpoint the engine started from
    generator = torch.Generator().manual_seed(rank)
    for param in policy.parameters():
        local = param.to_local()
        local.add_(0.02 * torch.randn(local.shape, generator=generator))
whole_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
largest_bytes = max(p.numel() * p.element_size() for p in policy.parameters())
streamed = peak_allocated(lambda: engine.load_weights(policy_weights(accelerator, policy)))
gathered_first = peak_allocated(lambda: engine.load_weights(list(policy_weights(accelerator, policy))))

prompt, response = "Question: 2 + 3 = ?\nAnswer:", [5, 6, 7, 8, 9, 10]
ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
with sharding.full_weights(policy), torch.no_grad():
    logits = policy.lm(torch.tensor([ids + response])).logits[0, len(ids) - 1:-1]
trainer = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
gap = (trainer - torch.tensor(engine.score([prompt], [response])[0], dtype=torch.float64)).abs().max().item()

figures = accelerator.gather_for_metrics([{"rank": rank, "streamed": streamed, "gathered_first": gathered_first,
                                           "gap": gap}], use_gather_object=True)
if accelerator.is_main_process:
    with open(out, "w") as f:
        json.dump({"whole_bytes": whole_bytes, "largest_bytes": largest_bytes, "ranks": figures}, f)
accelerator.wait_for_everyone()
