#!/usr/bin/env bash
# The GPU figures of the performance goals, in one run of a few minutes on one H100/H200:
#   bench_loss     the shaped loss at N=8192, hidden 2048, vocab 151936, bf16: CE, fused, compiled
#   bench_train    pretrain of dense_1b at sequence 4096 against a plain loop: tokens/s and MFU
#   bench_rollout  rollouts of dense_1b: ntp-rl's generator against plain model.generate
#   bench_rollout_vllm  the vLLM engine against plain model.generate at 128 prompts x 16 samples x 1024
#                  new tokens (goal: >= 5x); needs vLLM installed (pip install -e ".[vllm]"), else only plain runs
# Each part's output goes to $OUT (default ./gpu_check); a part that fails or runs past its
# time limit is reported and the next one still runs; the exit status is non-zero if any failed.
#
#   scripts/gpu_check.sh                      # the real sizes, on a GPU
#   GPU_CHECK_SMALL=1 scripts/gpu_check.sh    # tiny sizes: checks the script itself on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_check}"
mkdir -p "$out"

if [ "${GPU_CHECK_SMALL:-0}" = 1 ]; then
  loss=(--tokens 256 --hidden 32 --vocab 1000 --chunk-size 64 --repeats 2)
  train=(--model tiny --seq-len 32 --batch-size 8 --micro-batch-size 4 --steps 4 --warmup 1
         --extra data.num_train_docs=400 data.num_val_docs=40 data.vocab_size=128 model.hidden_size=32
         model.num_layers=2 model.intermediate_size=64 model.num_heads=2 model.num_kv_heads=1 loss.compile=true)
  rollout=(--model-preset tiny --prompts 4 --generations 2 --max-new-tokens 8 --batch-size 8 --repeats 1)
  rollout_vllm=(--model-preset tiny --prompts 4 --generations 2 --max-new-tokens 8 --batch-size 8 --repeats 1
                --variants plain,vllm)
else
  loss=(--tokens 8192 --hidden 2048 --vocab 151936 --dtype bf16 --repeats 10 --warmup 2)
  train=(--model dense_1b --seq-len 4096 --batch-size 8 --micro-batch-size 1 --steps 20 --warmup 5 --compile
         --extra loss.compile=true)
  rollout=(--model-preset dense_1b --prompts 32 --generations 8 --max-new-tokens 256 --batch-size 256 --repeats 3)
  # 2048 sequences of up to 1024 tokens, 512 at a time for both (KV cache ~32 GB in bf16 each;
  # 0.45 of an 80 GB H100 leaves room for transformers' own)
  rollout_vllm=(--model-preset dense_1b --prompts 128 --generations 16 --max-new-tokens 1024 --batch-size 512
                --repeats 1 --variants plain,vllm --vllm-memory 0.45)
fi

failed=()
part() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*"
  if ! timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"; then
    echo "== $name FAILED or timed out; see $out/$name.txt"
    failed+=("$name")
  fi
}

python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
  | tee "$out/device.txt"
part bench_loss 150 python scripts/bench_loss.py "${loss[@]}" \
  --variants ce,fused/precision,fused/tail_penalty,compiled/precision,compiled/tail_penalty
# At chunk 1024 the bf16 chunk buffers (logits and their gradient, 0.3 GB each) plus the head's
# gradient (0.6 GB) come to about 1.2 GB; chunks of 512 should bring the compiled path under 1 GiB.
part bench_loss_chunk512 120 python scripts/bench_loss.py "${loss[@]}" --chunk-size 512 \
  --variants ce,compiled/precision,compiled/tail_penalty
part bench_train 300 python scripts/bench_train.py "${train[@]}" --rounds 1 --loss ce precision
part bench_rollout 150 python scripts/bench_rollout.py "${rollout[@]}"
part bench_rollout_vllm 600 python scripts/bench_rollout.py "${rollout_vllm[@]}"

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
