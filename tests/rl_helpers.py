"""What the tests of whole `ntp-rl rl` runs share: a small pre-trained policy, the tiny RL settings, and
readers of a run's metrics. A test module imports the fixtures it uses (pytest finds them there)."""

from pathlib import Path

import pytest
import torch

from conftest import TINY
from ntp_rl.config.compose import compose
from ntp_rl.stages import run_stage
from ntp_rl.tracking import read_metrics

# Difficulty 1 and a format bonus: the small policy's groups then mostly hold different rewards.
RL_TINY = [
    "task.difficulty=1", "task.format_reward=0.5", "rl.max_steps=4", "rl.prompts_per_step=4", "rl.num_mini_batches=2",
    "rl.num_generations=4",
    "rl.micro_batch_size=8", "rl.sampling.max_new_tokens=24", "rl.sampling.batch_size=8", "rl.train_problems=64",
    "rl.eval_problems=8", "rl.eval_samples=4", "rl.eval_ks=[1,4]", "rl.eval_every=2", "rl.save_every=2",
    "rl.eval_sampling.max_new_tokens=24", "optim.lr=1e-3", "logger.wandb.mode=disabled", "logger.progress_bar=false",
]

STEP_KEYS = ["reward", "reward_std", "accuracy", "frac_reward_zero_std", "dynamic_sampling/dropped_groups",
             "dynamic_sampling/rounds", "entropy", "completions/mean_length", "completions/max_length",
             "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "policy_loss", "grad_norm",
             "lr", "perf/gen_tokens_per_sec", "perf/train_tokens_per_sec", "perf/step_time_s"]


# Subprocesses (a killed run and its resumption, `accelerate launch`) use one thread each too.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models' ops are too small to gain from a second thread, and on a shared 2-core
    machine a thread waiting for a busy core makes them ten times slower; results do not change."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy(tmp_path_factory, shared_cache) -> Path:
    """A pre-trained run small enough to train in seconds, yet one that writes "#### <number>" answers."""
    out = tmp_path_factory.mktemp("policy")
    pretrain_small_policy(out, shared_cache)
    return out / "run"


def pretrain_small_policy(out: Path, shared_cache: Path, *extra: str) -> None:
    """60 steps of the tiny model on the easiest corpus, into <out>/run: enough to write "#### <number>" answers."""
    overrides = [*TINY, f"out_dir={out}", f"data.cache_dir={shared_cache}", f"run_dir={out / 'run'}", "data.difficulty=1",
                 "data.seq_len=64", "train.batch_size=16", "train.micro_batch_size=16", "train.max_steps=60",
                 "train.eval_every=60", "train.save_every=60", "optim.lr=1e-2", "optim.warmup_steps=5", *extra]
    run_stage("pretrain", compose("pretrain", overrides), overrides=overrides)


@pytest.fixture
def rl_args(policy, tmp_path) -> list[str]:
    return [*RL_TINY, f"init_from={policy}", f"out_dir={tmp_path / 'outputs'}"]


def rl_run(args):
    return run_stage("rl", compose("rl", args), overrides=args)


def step_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "reward" in r}


def assert_same_steps(one: Path, two: Path, steps: set[int]) -> None:
    """Two runs from the same samples (one process and two, say): the same rollouts at every step, and the
    same updates to float precision (losses within 1e-4, gradient norms within 1e-3)."""
    a, b = step_rows(one), step_rows(two)
    assert set(a) == set(b) == steps
    for step in a:
        for key in ("reward", "accuracy", "completions/mean_length"):
            assert b[step][key] == a[step][key], (step, key)
        # A step whose groups all had equal rewards takes no update and logs no loss: in both runs alike.
        assert ("policy_loss" in b[step]) == ("policy_loss" in a[step]), step
        if "policy_loss" in a[step]:
            assert b[step]["policy_loss"] == pytest.approx(a[step]["policy_loss"], rel=1e-4, abs=1e-6), step
            assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3), step
    assert any("policy_loss" in row for row in a.values()), "at least one step must update for the comparison to mean anything"


def eval_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "eval/avg@4" in r}
