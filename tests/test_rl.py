"""`ntp-rl rl` whole runs from a small policy: logging, evaluation, checkpoints, resume, processes and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TWO_CPU_PROCESSES, run_cli
from ntp_rl.checkpoint import latest_checkpoint, list_checkpoints
from ntp_rl.cli import check_command_line
from ntp_rl.config.compose import compose
from ntp_rl.errors import UserError
from rl_helpers import ONE_THREAD, RL_TINY, STEP_KEYS, eval_rows, rl_run, step_rows
from rl_helpers import one_thread, policy, rl_args  # noqa: F401 (fixtures)


def test_a_run_logs_evaluates_and_saves_hf_checkpoints(rl_args, tmp_path):
    results = rl_run(rl_args)
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("run.json")]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["step"] == 4 and saved["task"] == "embedded" and saved["eval_split"] == "test"
    for when in ("eval_before", "eval_after"):
        assert {"avg@4", "pass@1", "pass@4", "mean_length"} <= set(saved[when]), when
    assert saved["eval_before"] == results["eval_before"]

    steps = step_rows(run_dir)
    assert sorted(steps) == [1, 2, 3, 4]
    for row in steps.values():
        for key in STEP_KEYS:
            assert key in row, key
        generated = row["dynamic_sampling/rounds"] * 4
        zero_std = round(row["frac_reward_zero_std"] * generated)
        assert row["dynamic_sampling/dropped_groups"] + row["dynamic_sampling/filled_groups"] == zero_std
        assert 0 <= row["accuracy"] <= 1 and row["entropy"] > 0 and row["grad_norm"] > 0
        assert 0 <= row["clip_ratio/low_mean"] <= 1 and 0 <= row["clip_ratio/high_mean"] <= 1
    filled = [row["dynamic_sampling/filled_groups"] for row in steps.values()]
    assert saved["dynamic_sampling"] == {"short_steps": sum(f > 0 for f in filled), "filled_groups": sum(filled),
                                         "groups_per_step": 4}
    assert sorted(eval_rows(run_dir)) == [0, 2, 4]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000002", "step_00000004"]

    code = ("import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "print(m(**t('Question: What is 2 + 3?', return_tensors='pt')).logits.shape[-1], 'ntp_rl' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code, str(latest_checkpoint(run_dir / "checkpoints"))], capture_output=True,
                         text=True, cwd="/", env={**os.environ, "PYTHONPATH": ""}, check=True)
    assert out.stdout.split()[1] == "False"


def test_one_update_per_rollout_batch_never_clips(rl_args):
    results = rl_run([*rl_args, "rl.max_steps=2", "rl.num_mini_batches=1", "rl.eval_every=10", "rl.eval_split=validation"])
    assert results["eval_split"] == "validation"
    for row in step_rows(Path(results["checkpoint"]).parents[1]).values():
        assert row["clip_ratio/low_mean"] == row["clip_ratio/high_mean"] == 0, "one on-policy update: ratio 1"


def test_several_updates_per_step_with_kl_and_sequence_mean(rl_args, capsys):
    # One sampling round: some groups of a step have equal rewards, and the step trains without them.
    results = rl_run([*rl_args, "rl.max_steps=2", "rl.num_iterations=2", "rl.num_mini_batches=2", "rl.kl_coef=0.05",
                      "rl.loss_aggregation=seq_mean", "rl.mask_truncated=true", "optim.lr=1e-2", "rl.save_every=10",
                      "rl.eval_every=10", "rl.max_sampling_rounds=1"])
    run_dir = Path(results["checkpoint"]).parents[1]
    steps = step_rows(run_dir)
    filled = [steps[s]["dynamic_sampling/filled_groups"] for s in (1, 2)]
    assert results["dynamic_sampling"]["short_steps"] == sum(f > 0 for f in filled) > 0
    assert "the step trains on those alone" in capsys.readouterr().out
    # Later updates of a step see a policy that has moved: ratios leave 1 and the KL grows.
    assert all(steps[s]["kl"] > 0 for s in (1, 2))
    assert any(steps[s]["clip_ratio/low_mean"] + steps[s]["clip_ratio/high_mean"] > 0 for s in (1, 2))


def test_a_step_with_no_token_to_train_on_takes_no_update_and_says_so(rl_args, policy, tmp_path, capsys):
    """Every response cut at max_new_tokens under rl.mask_truncated: nothing to learn from, so no
    update (not a NaN loss, not a step on a zero gradient), counted and said."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "masked"
    results = rl_run([*rl_args, "rl.mask_truncated=true", "rl.sampling.max_new_tokens=2", "rl.dynamic_sampling=false",
                      "rl.max_steps=2", "rl.num_mini_batches=2", "rl.eval_every=10", f"run_dir={run_dir}"])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    steps = step_rows(run_dir)
    for row in steps.values():
        assert row["completions/clipped_ratio"] == 1.0, "the case under test: every response truncated"
        assert all(value is not None for value in row.values()), row
        assert row["empty_mini_batches"] == 2
        assert "policy_loss" not in row and "grad_norm" not in row, "no update, so no loss to report"
    assert results["empty_mini_batches"] == 4
    out = capsys.readouterr().out
    assert "had no response token with a loss" in out
    # every response cut after 2 tokens: no answer, reward 0 everywhere, so every group has equal rewards
    assert results["notices"]["equal_reward_steps"] == 2
    assert "2 of 2 steps had equal rewards within every group: zero advantages, policy_loss 0" in out
    before = load_file(latest_checkpoint(policy / "checkpoints") / "model.safetensors")
    after = load_file(Path(results["checkpoint"]) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before), "the weights must not move"


def test_starting_from_an_unfinished_run_and_a_resume_that_finds_nothing_are_said(rl_args, policy, tmp_path, capsys):
    """rl from a run marked failed: allowed, but said with the checkpoint used; resume=auto with nothing to resume
    says that a new run starts. Both are kept in results.json's notices."""
    import shutil

    failed = tmp_path / "failed_run"
    shutil.copytree(policy, failed)
    info = json.loads((failed / "run.json").read_text())
    (failed / "run.json").write_text(json.dumps({**info, "status": "failed"}))
    args = [a for a in rl_args if not a.startswith("init_from=")]
    results = rl_run([*args, f"init_from={failed}", "rl.max_steps=1", "rl.eval_every=10", "resume=auto"])
    checkpoint = latest_checkpoint(failed / "checkpoints")
    assert results["notices"]["init_from_status"] == "failed"
    assert results["notices"]["resume_auto_found_nothing"] is True
    out = capsys.readouterr().out
    assert f"note: init_from={failed} is a run whose status is failed, not finished; using its checkpoint {checkpoint}" in out
    assert "note: resume=auto found no unfinished run of this command to resume; a new run starts in" in out


def test_resume_after_sigkill_reproduces_the_run(rl_args, tmp_path):
    straight = tmp_path / "straight"
    rl_run([*rl_args, f"run_dir={straight}"])

    killed = tmp_path / "killed"
    args = ["rl", *rl_args, f"run_dir={killed}"]
    first = run_cli(*args, env={"NTP_RL_KILL_AT": "step:3", **ONE_THREAD})
    assert first.returncode == -9, first.stderr[-2000:]
    assert json.loads((killed / "run.json").read_text())["status"] == "running"
    assert latest_checkpoint(killed / "checkpoints").name == "step_00000002"
    second = run_cli(*args, "resume=auto", env=ONE_THREAD)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout

    a, b = step_rows(straight), step_rows(killed)
    assert sorted(b) == [1, 2, 3, 4], "one record per step"
    for step in range(1, 5):
        for key in ("reward", "accuracy", "policy_loss", "grad_norm", "entropy", "completions/mean_length",
                    "dynamic_sampling/dropped_groups"):
            assert a[step][key] == b[step][key], (step, key)  # bit-identical on CPU
    assert eval_rows(straight)[4] == eval_rows(killed)[4]
    results = json.loads((killed / "results.json").read_text())
    assert results["eval_before"] == json.loads((straight / "results.json").read_text())["eval_before"]
    assert rl_run([*rl_args, f"run_dir={killed}", "resume=auto"]) == results, "a finished run is not run again"


def test_two_processes_match_one_with_the_same_global_batch(rl_args, tmp_path):
    # Two generate calls per round (2 prompts each), so each process makes exactly the calls
    # the single process makes for its half of the prompts.
    # The held-out checks: 4 chunks of 2 problems, dealt 2 to each process.
    common = [*rl_args, "rl.max_steps=3", "rl.save_every=3", "rl.eval_every=3", "rl.sampling.batch_size=8",
              "rl.eval_sampling.batch_size=8"]
    one = tmp_path / "one"
    rl_run([*common, f"run_dir={one}"])
    two = tmp_path / "two"
    # The two processes also group their rows by a token budget (about 2 rows a micro-batch, as many
    # micro-batches as each process's lengths need): neither the grouping nor the split changes an update.
    cmd = [*TWO_CPU_PROCESSES, "-m", "ntp_rl", "rl", *common, f"run_dir={two}",
           "rl.max_tokens_per_micro_batch=100"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, **ONE_THREAD})
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "finished" and info["world_size"] == 2
    a, b = step_rows(one), step_rows(two)
    for step in (1, 2, 3):
        for key in ("reward", "accuracy", "frac_reward_zero_std", "dynamic_sampling/dropped_groups",
                    "completions/mean_length"):
            assert b[step][key] == a[step][key], (step, key)  # the same rollouts
        for key in ("policy_loss", "entropy"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3), step
        assert 0 < a[step]["perf/useful_token_share"] <= b[step]["perf/useful_token_share"] <= 1, step
    assert eval_rows(two)[0] == eval_rows(one)[0], "the held-out check of the same model gives the same numbers"
    assert eval_rows(two)[3] == pytest.approx(eval_rows(one)[3])


@pytest.mark.parametrize(
    "args, names",
    [
        ([], ["init_from", "required"]),
        (["init_from=/no/such/run"], ["init_from=/no/such/run"]),
        (["rl.num_generations=1"], ["rl.num_generations"]),
        (["rl.clip_eps_low=1.5"], ["rl.clip_eps_low"]),
        (["rl.clip_eps_high=-0.1"], ["rl.clip_eps_high"]),
        (["rl.prompts_per_step=6", "rl.num_mini_batches=4"], ["rl.prompts_per_step", "rl.num_mini_batches"]),
        (["rl.advantage=ppo"], ["rl.advantage", "grpo"]),
        (["rl.policy_loss=nope"], ["rl.policy_loss", "ppo_clip"]),
        (["rl.loss_aggregation=sum"], ["rl.loss_aggregation", "token_mean", "seq_mean"]),
        (["rl.sampling.temperature=0"], ["rl.sampling.temperature"]),
        (["rl.eval_ks=[1,16]"], ["rl.eval_ks"]),
        (["rl.eval_split=dev"], ["rl.eval_split=dev", "task embedded serves only: train, validation, test"]),
        (["task=gsm8k", "rl.eval_split=validation"], ["rl.eval_split=validation", "task gsm8k serves only: train, test"]),
        (["rl.kl_coef=-1"], ["rl.kl_coef"]),
        (["rl.on_nonfinite=ignore"], ["rl.on_nonfinite", "stop", "skip"]),
        (["rl.max_nonfinite_skips=-1"], ["rl.max_nonfinite_skips"]),
        (["rl.max_tokens_per_micro_batch=0"], ["rl.max_tokens_per_micro_batch", "> 0"]),
        (["rl.logprob_chunk_size=0"], ["rl.logprob_chunk_size", "> 0"]),
        (["rl.prompts_per_generate_call=-2"], ["rl.prompts_per_generate_call", "> 0"]),
        (["task=nope"], ["task=nope", "chain_sum", "gsm8k"]),
        (["rl.num_generation=4"], ["rl.num_generation", "num_generations"]),
        (["rl.plateau.patience=50"], ["rl.plateau.patience", "rl.eval_split=test", "rl.eval_split=validation"]),
        (["rl.plateau.patience=0", "rl.eval_split=validation"], ["rl.plateau.patience", "> 0"]),
        (["rl.plateau.patience=50", "rl.plateau.min_gain=-0.1", "rl.eval_split=validation"], ["rl.plateau.min_gain"]),
    ],
)
def test_bad_config_fails_with_one_line_naming_the_key(args, names, tmp_path):
    init = [] if not args or args[0].startswith("init_from") else [f"init_from={tmp_path}"]
    (tmp_path / "config.json").write_text("{}")  # enough for init_from to look like a model directory
    with pytest.raises(UserError) as exc:
        check_command_line("rl", [*init, *args])
    message = str(exc.value)
    assert "\n" not in message
    for name in names:
        assert name in message


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "task").glob("*.yaml")))
def test_every_task_preset_composes_into_an_rl_run(preset, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    check_command_line("rl", [f"init_from={tmp_path}", f"task={preset}"])
    assert compose("rl", [f"init_from={tmp_path}", f"task={preset}"]).task.name == preset


@pytest.mark.parametrize(
    "args, error",
    [
        (["task.kind=bogus"], "task.kind=bogus: unknown task kind; choose one of: embedded, hf_math, reasoning_gym"),
        (["task=chain_sum", "task.dataset=nope"], "task.dataset=nope: unknown reasoning-gym dataset; choose one of: "),
        (["task=chain_sum", "+task.dataset_kwargs.min_terms=9", "+task.dataset_kwargs.max_terms=2"], "task.dataset_kwargs="),
        (["task=gsm8k", "task.path=/no/such/dir"], "task.path=/no/such/dir: no such file or directory"),
        (["task=gsm8k", "task.path=/no/such/file.jsonl"], "task.path=/no/such/file.jsonl: no such file"),
    ],
)
def test_bad_task_is_refused_before_the_run_directory_exists(policy, tmp_path, args, error):
    out = tmp_path / "outputs"
    with pytest.raises(UserError) as exc:
        rl_run([*RL_TINY, f"init_from={policy}", f"out_dir={out}", *args])
    assert str(exc.value).startswith(error) and "\n" not in str(exc.value)
    assert not out.exists(), "a refused run must leave nothing behind"


def test_bad_input_from_the_shell_exits_2_with_one_line(policy, tmp_path):
    out = tmp_path / "outputs"
    result = run_cli("rl", f"init_from={policy}", f"out_dir={out}", "task=chain_sum", "task.dataset=nope", env=ONE_THREAD)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("ntp-rl: error: task.dataset=nope: unknown reasoning-gym dataset; choose one of: ")
    assert not out.exists()


@pytest.mark.slow
def test_the_default_run_raises_held_out_accuracy(tmp_path):
    """The issue's promise, as a new user runs it: default pretrain, then default rl (~10 min on 2 cores)."""
    common = [f"out_dir={tmp_path}", "logger.wandb.mode=disabled", "logger.progress_bar=false"]
    pretrain = run_cli("pretrain", *common, timeout=1800)
    assert pretrain.returncode == 0, pretrain.stderr[-2000:]
    (pretrain_dir,) = (tmp_path / "pretrain").iterdir()
    rl = run_cli("rl", f"init_from={pretrain_dir}", *common, timeout=1800)
    assert rl.returncode == 0, rl.stderr[-2000:]
    (rl_dir,) = (tmp_path / "rl").iterdir()
    results = json.loads((rl_dir / "results.json").read_text())
    before, after = results["eval_before"]["avg@8"], results["eval_after"]["avg@8"]
    # From the 600-step default pretrain (tuned on the validation split, issue 28) seeds 0 and 1 measured
    # +0.070 and +0.083 (docs/rl.md "Round 2"), identical under transformers 5.19 and 5.25. The floor is
    # the promise, +0.05: ~2.9 seed sds (0.009) below their mean.
    assert after - before >= 0.05, (before, after)
    assert results["train_last_step"]["entropy"] < results["train_first_step"]["entropy"]
    steps = step_rows(rl_dir).values()
    assert any(row["clip_ratio/high_mean"] > 0 for row in steps) and any(row["clip_ratio/low_mean"] > 0 for row in steps), \
        "the default run's later updates move the policy far enough for both clip bounds to act"
