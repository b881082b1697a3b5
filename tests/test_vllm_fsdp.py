"""vLLM next to FSDP2: the weight sync streams the sharded policy into each process's engine a parameter at a
time (its peak extra memory measured against gathering the model first), and `rl generator=vllm` under an
FSDP2 launch takes the steps a single process takes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TWO_CPU_PROCESSES, fsdp_launch
from rl_helpers import assert_same_steps, pretrain_small_policy

pytestmark = pytest.mark.vllm

# fp32 and eager, as tests/test_vllm.py runs the engine: what it samples and scores is exact to ~1e-6.
CONFIG = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory, shared_cache):
    """Eight layers of 1 MiB MLP matrices: the model (~32 MiB) is many times its largest parameter, so a
    sync that holds the model at once and one that holds a layer at once are far apart."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    small = tmp_path_factory.mktemp("vllm_fsdp_tokenizer")
    pretrain_small_policy(small, shared_cache, "model.head_dim=32", "train.max_steps=1")
    (trained,) = (small / "run" / "checkpoints").iterdir()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    torch.manual_seed(0)
    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=1024,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=256, tie_word_embeddings=True))
    out = tmp_path_factory.mktemp("vllm_fsdp_wide")
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_the_sync_to_vllm_streams_the_shards_a_parameter_at_a_time(wide_checkpoint, tmp_path):
    """2 processes, each with its engine, the policy sharded over both: rl's sync gathers one parameter at a
    time as vLLM reads it. Its peak extra memory (torch's CPU allocations, from the profiler) is about one of
    vLLM's layers twice over: vLLM holds a layer's incoming weights until the layer is complete (gate and up
    for its fused MLP layer) and builds the layer anew before copying it into place. The control, the same weights gathered into a list first, peaks at the whole model,
    so the measurement sees a full copy when there is one. The engine then scores with the trained weights."""
    out = tmp_path / "figures.json"
    cmd = [*TWO_CPU_PROCESSES, str(REPO / "tests" / "fsdp_vllm_sync.py"),
           str(wide_checkpoint), json.dumps(CONFIG), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    whole, largest = figures["whole_bytes"], figures["largest_bytes"]
    assert whole > 25 * largest
    for rank in figures["ranks"]:
        print(f"rank {rank['rank']}: streamed sync peak {rank['streamed'] / 2**20:.1f} MiB, gathered first "
              f"{rank['gathered_first'] / 2**20:.1f} MiB; model {whole / 2**20:.1f} MiB, largest parameter "
              f"{largest / 2**20:.1f} MiB")
        assert rank["gathered_first"] >= whole, rank  # the control: a full copy is seen
        # Measured 4.0 MiB for 1 MiB parameters: gate and up (2 MiB) held and rebuilt.
        assert rank["streamed"] <= 5 * largest and rank["streamed"] < whole / 6, rank
        assert rank["gap"] < 1e-4, rank  # the engine holds the policy's weights, not the checkpoint's


@pytest.mark.slow  # a trained policy, then rl in one process and in two sharded ones, each with engines: ~3 min
def test_rl_with_vllm_under_fsdp2_takes_the_steps_one_process_takes(tmp_path_factory, shared_cache, tmp_path):
    """`accelerate launch --config_file scripts/accelerate/fsdp.yaml -m ntp_rl rl generator=vllm` on 2 CPU
    processes: each engine gets the sharded policy's weights every step, samples its share, and the sharded
    update is the one-process update of the same samples."""
    from test_vllm import RL_ARGS

    policy_dir = tmp_path_factory.mktemp("vllm_fsdp_policy")
    pretrain_small_policy(policy_dir, shared_cache, "model.head_dim=32")
    (checkpoint,) = (policy_dir / "run" / "checkpoints").iterdir()
    # Two generate calls per round (2 prompts x 4 samples each): each process makes exactly the calls the
    # single process makes for its half of the prompts; the held-out checks likewise.
    common = [f"init_from={checkpoint}", *RL_ARGS, "rl.prompts_per_generate_call=2", "rl.eval_sampling.batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, "-m", "ntp_rl", "rl", *common, f"run_dir={one}"], capture_output=True,
                            text=True, cwd=REPO, timeout=900, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    sharded = subprocess.run([*fsdp_launch(tmp_path), "rl", *common, f"run_dir={two}"], capture_output=True, text=True,
                             cwd=REPO, timeout=900, env=env)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert json.loads((two / "run.json").read_text())["environment"]["distributed"] == {"kind": "fsdp2", "world_size": 2}

    assert_same_steps(one, two, {1, 2, 3})  # the same rollouts: every engine had the policy's weights
