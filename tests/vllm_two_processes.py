"""Run by test_vllm under `accelerate launch --num_processes 2`: each process starts a vLLM engine
inside Accelerate's process group (its own, or with tensor_parallel_size=2 one shared by both)
and samples its half of 8 prompts; rank 0 writes what every rank got, and the result of an
all-reduce made after the engines started."""

import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import AutoTokenizer

from ntp_rl.config.compose import compose
from ntp_rl.generation import Sampling
from ntp_rl.tasks import build_task
from ntp_rl.vllm_engine import VLLMConfig, VLLMGenerator

checkpoint, config, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
accelerator = Accelerator(cpu=True)
rank = accelerator.process_index
task = build_task(compose("rl", ["task.difficulty=1"]).task)
prompts = [p.prompt for p in task.problems("test", 8)][rank * 4:(rank + 1) * 4]
generator = VLLMGenerator(checkpoint, AutoTokenizer.from_pretrained(checkpoint), task.stop_strings, VLLMConfig(**config))
results = generator.generate(prompts, 2, Sampling(temperature=1.0, max_new_tokens=24), seed=100 + rank)
total = torch.tensor([float(rank + 1)])
torch.distributed.all_reduce(total)  # the trainer's collectives still work next to the engines
completions = gather_object([[[[c.token_ids, c.text] for c in cs] for cs in results]])
if accelerator.is_main_process:
    with open(out, "w") as f:
        json.dump({"all_reduce": total.item(), "completions": completions}, f)
accelerator.wait_for_everyone()
