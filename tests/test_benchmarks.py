"""The benchmark scripts run at CI size and print the figures the README quotes.

Their numbers are never asserted (shared machines are noisy); what is checked is that every
variant runs and reports a time or rate and a ratio against its baseline.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY


def run_script(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                            cwd=REPO, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_bench_loss_reports_every_variant_and_ratio():
    out = run_script("bench_loss.py", "--tokens", "256", "--hidden", "32", "--vocab", "1000", "--chunk-size", "64",
                     "--repeats", "2")
    timed = re.findall(r"^(\S+)\s+[\d.]+ ms\s+[\d.]+ GiB extra$", out, re.M)
    assert {"ce", "naive/precision", "chunked/precision", "fused/precision", "fused/tail_penalty",
            "compiled/precision"} <= set(timed)
    ratios = re.findall(r"^(\S+)\s+([\d.]+)x ce time", out, re.M)
    assert len(ratios) == len(timed) and all(float(r) > 0 for _, r in ratios)
    assert re.search(r"^fused/precision\s+[\d.]+x ce time\s+[\d.]+x naive$", out, re.M)


def test_bench_train_compares_the_stage_with_a_plain_loop():
    model = [o for o in TINY if o.startswith("model.")]
    out = run_script("bench_train.py", "--steps", "4", "--warmup", "1", "--rounds", "1", "--seq-len", "32",
                     "--batch-size", "8", "--micro-batch-size", "4", "--loss", "ce", "precision",
                     "--extra", *model, "data.num_train_docs=400", "data.num_val_docs=40", "data.vocab_size=128")
    rows = {label.strip(): (float(rate), float(ratio))
            for label, rate, ratio in re.findall(r"^(.+?)\s+(\d+) tokens/s\s+([\d.]+)x plain", out, re.M)}
    assert set(rows) == {"plain transformers + F.cross_entropy", "ntp-rl pretrain loss=ce", "ntp-rl pretrain loss=precision"}
    # Each ratio is that variant's rate over the plain loop's. Both are printed rounded (rates to whole
    # tokens/s, ratios to 0.01), so the ratio must lie within what the rounded rates allow.
    plain = rows["plain transformers + F.cross_entropy"][0]
    for label, (rate, ratio) in rows.items():
        lowest, highest = (rate - 0.5) / (plain + 0.5), (rate + 0.5) / (plain - 0.5)
        assert rate > 0 and lowest - 0.005 <= ratio <= highest + 0.005, (label, rate, plain, ratio)


def test_bench_rollout_compares_the_generators_with_plain_generate():
    out = run_script("bench_rollout.py", "--prompts", "4", "--generations", "2", "--max-new-tokens", "8",
                     "--batch-size", "8", "--repeats", "1")
    rates = dict(re.findall(r"^(.+?)\s+\d+ generated tokens/s\s+([\d.]+)x plain", out, re.M))
    expected = {"plain model.generate", "ntp-rl HFGenerator", "  without stop strings"}
    if importlib.util.find_spec("vllm") is not None:  # CI installs it, so there the vLLM row is checked too
        expected.add("ntp-rl VLLMGenerator")
    else:
        assert "vllm: not installed, left out" in out
    assert set(rates) == expected


@pytest.mark.slow
def test_gpu_check_script_runs_every_part_at_tiny_sizes(tmp_path):
    # The script is meant for a lent GPU, where device time is scarce: a typo in it must
    # show up here, not there.
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, cwd=REPO,
                            timeout=600, env={**os.environ, "WANDB_MODE": "disabled", "GPU_CHECK_SMALL": "1",
                                              "OUT": str(tmp_path)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parts = {p.stem for p in tmp_path.glob("*.txt")}
    assert parts == {"device", "bench_loss", "bench_loss_chunk512", "bench_train", "bench_rollout", "bench_rollout_vllm"}
    assert "compiled/precision" in (tmp_path / "bench_loss.txt").read_text()
    assert "x plain" in (tmp_path / "bench_train.txt").read_text()


def test_bench_rl_memory_prints_one_json_object_per_length():
    out = run_script("bench_rl_memory.py", "--vocab", "3000", "--hidden", "16", "--prompt", "8", "--tokens", "32,96",
                     "--chunk-size", "16", "--temperature", "0.7", "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["tokens"] for r in rows] == [32, 96]
    for row in rows:
        assert set(row) == {"tokens", "materialised_gib", "chunked_gib", "max_abs_diff"}
        assert row["materialised_gib"] >= 0 and row["chunked_gib"] >= 0
        assert row["max_abs_diff"] < 1e-5, "the two paths give the same loss and gradients"


def test_bench_data_reports_prepare_rates_fetch_times_and_the_data_wait():
    out = run_script("bench_data.py", "--docs", "600", "--docs-per-shard", "100", "--seq-len", "32", "--batch-size", "4",
                     "--repeats", "1")
    rates = re.findall(r"^prepare, (\d) worker\(s\): [\d.]+M tokens in [\d.]+ s, ([\d,]+) tokens/s$", out, re.M)
    assert [w for w, _ in rates] == ["1", "2"] and all(int(r.replace(",", "")) > 0 for _, r in rates)
    assert re.search(r"^fetch 4 x 33 at position 0: [\d.]+ ms; at position \d+ of \d+ \(95%\): [\d.]+ ms; ratio [\d.]+x$",
                     out, re.M)
    assert re.search(r"data wait [\d.]+% of a step$", out, re.M)


def test_bench_export_times_the_gathered_and_the_streamed_export():
    out = run_script("bench_export.py", "--vocab", "128", "--repeats", "1")
    rows = dict(re.findall(r"^(gathered|streamed)\s+[\d.]+ s\s+([\d.]+)x gathered time\s+[\d.]+ MB held at once on rank 0$",
                           out, re.M))
    assert sorted(rows) == ["gathered", "streamed"] and float(rows["gathered"]) == 1.0, out
