"""FSDP2 through `accelerate launch --config_file scripts/accelerate/fsdp.yaml`: ntp-rl shards with torch's
fully_shard (ntp_rl/sharding.py), on CPU over gloo as on GPUs; recorded, and never silently DDP."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, TWO_CPU_PROCESSES, fsdp_launch
from ntp_rl.errors import UserError
from test_export import on_disk
from rl_helpers import ONE_THREAD, eval_rows, one_thread, policy, rl_args, rl_run, step_rows  # noqa: F401 (fixtures)
from test_pretrain import pretrain, train_rows


def launched(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, **(env or {})})


def test_two_fsdp2_processes_shard_and_match_one_process(tiny, tmp_path):
    """20 steps of a 2-process FSDP2 pretrain take the steps of a 1-process run of the same global batch;
    each process keeps half of every parameter, writes its own shard, and the export is the whole model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    steps = ["train.max_steps=20", "train.log_every=1", "train.save_every=20", "train.eval_every=20"]
    one = tmp_path / "one"
    pretrain([*tiny, *steps, "train.micro_batch_size=8", f"run_dir={one}"])
    two = tmp_path / "two"
    result = launched([*fsdp_launch(tmp_path), "pretrain", *tiny, *steps, "train.micro_batch_size=2", f"run_dir={two}"])
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "finished" and info["environment"]["distributed"] == {"kind": "fsdp2", "world_size": 2}
    a, b = train_rows(one), train_rows(two)
    for step in range(1, 21):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-4), step

    checkpoint = two / "checkpoints" / "step_00000020"
    from torch.distributed.checkpoint import FileSystemReader

    assert sorted(p.name for p in (checkpoint / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Every weight and both AdamW moments of it were held, and written, as one half per process.
    saved = FileSystemReader(str(checkpoint / "sharded")).read_metadata().state_dict_metadata
    tensors = {name: meta for name, meta in saved.items() if hasattr(meta, "chunks") and meta.size.numel() > 1}
    assert any(name.startswith("optimizer.state.") and name.endswith("exp_avg_sq") for name in tensors)
    for name, meta in tensors.items():
        assert [tuple(chunk.sizes) for chunk in meta.chunks] == [(meta.size[0] // 2, *meta.size[1:])] * 2, name
    whole, single = on_disk(checkpoint), load_file(one / "checkpoints" / "step_00000020" / "model.safetensors")
    # Written a layer at a time (ntp_rl/export.py): a file per decoder layer, embeddings and norm.
    assert len(list(checkpoint.glob("model-*-of-00004.safetensors"))) == 4
    assert sorted(whole) == sorted(single), "the export holds each weight once, under the names of a 1-process run"
    for name, tensor in single.items():
        assert whole[name].shape == tensor.shape and (whole[name] - tensor).abs().max() < 1e-4, name
    AutoModelForCausalLM.from_pretrained(checkpoint)


@pytest.mark.slow  # five launches of 2 processes: about 2 minutes on 2 cores
def test_a_sharded_run_resumes_exactly_and_on_one_process(tiny, tmp_path):
    common = [*tiny, "train.max_steps=10", "train.save_every=4", "train.log_every=1", "train.micro_batch_size=2"]
    launch = fsdp_launch(tmp_path)
    straight = tmp_path / "straight"
    assert launched([*launch, "pretrain", *common, f"run_dir={straight}"]).returncode == 0
    killed = tmp_path / "killed"
    first = launched([*launch, "pretrain", *common, f"run_dir={killed}"], env={"NTP_RL_KILL_AT": "step:6"})
    assert first.returncode != 0 and (killed / "checkpoints" / "step_00000004" / "sharded").is_dir()
    elsewhere, ddp = tmp_path / "elsewhere", tmp_path / "ddp"  # the same interrupted run, resumed otherwise
    shutil.copytree(killed, elsewhere)
    shutil.copytree(killed, ddp)

    second = launched([*launch, "pretrain", *common, f"run_dir={killed}", "resume=auto"])
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = train_rows(straight), train_rows(killed)
    for step in range(1, 11):
        assert b[step]["train/loss"] == a[step]["train/loss"] and b[step]["train/grad_norm"] == a[step]["train/grad_norm"], step

    pretrain([*common, f"run_dir={elsewhere}", "resume=auto"])
    c = train_rows(elsewhere)
    for step in range(5, 11):
        assert c[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step

    # A plain multi-process (DDP) launch cannot take the shards: one line, nothing trained.
    plain = [*TWO_CPU_PROCESSES, "-m", "ntp_rl"]
    refused = launched([*plain, "pretrain", *common, f"run_dir={ddp}", "resume=auto"])
    assert refused.returncode != 0
    assert any(line.startswith("ntp-rl: error: resume: checkpoint") and "holds FSDP shards" in line
               for line in refused.stderr.splitlines()), refused.stderr[-2000:]


@pytest.mark.slow  # a policy, then 1 and 2 processes of rl: about a minute on 2 cores
def test_two_fsdp2_processes_of_rl_take_the_steps_of_one(rl_args, tmp_path):
    """Rollouts sampled with the weights gathered, then the same updates from the same samples: 3 steps."""
    common = [*rl_args, "rl.max_steps=3", "rl.save_every=3", "rl.eval_every=3", "rl.sampling.batch_size=8",
              "rl.eval_sampling.batch_size=8"]
    one = tmp_path / "one"
    rl_run([*common, f"run_dir={one}"])
    two = tmp_path / "two"
    result = launched([*fsdp_launch(tmp_path), "rl", *common, f"run_dir={two}"], env=ONE_THREAD)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / "run.json").read_text())["environment"]["distributed"] == {"kind": "fsdp2", "world_size": 2}
    assert (two / "checkpoints" / "step_00000003" / "sharded").is_dir()
    a, b = step_rows(one), step_rows(two)
    for step in (1, 2, 3):
        for key in ("reward", "accuracy", "completions/mean_length"):
            assert b[step][key] == a[step][key], (step, key)  # the same rollouts, sampled from gathered weights
        for key in ("policy_loss", "entropy", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert eval_rows(two)[3]["eval/avg@4"] == eval_rows(one)[3]["eval/avg@4"], "held-out checks sampled from gathered weights"


def test_a_launch_that_asked_for_fsdp1_and_got_ddp_is_refused_in_one_line(monkeypatch):
    from accelerate.utils import DistributedType

    from ntp_rl.runtime import check_parallelism, parallelism

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, is_fsdp2=False)
    fsdp1 = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2, is_fsdp2=False)
    assert parallelism(ddp) == {"kind": "ddp", "world_size": 2}
    assert parallelism(fsdp1) == {"kind": "fsdp1", "world_size": 2}
    check_parallelism(ddp)  # nobody asked for FSDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    check_parallelism(fsdp1)
    with pytest.raises(UserError) as caught:
        check_parallelism(ddp)
    message = str(caught.value)
    assert "\n" not in message and "asked for FSDP (fsdp_version 1)" in message and "set up as ddp" in message
    # FSDP2 is ntp-rl's own sharding: whatever Accelerate set up, the run is sharded and recorded so.
    monkeypatch.setenv("FSDP_VERSION", "2")
    check_parallelism(ddp)
    assert parallelism(ddp) == {"kind": "fsdp2", "world_size": 2}


@pytest.fixture
def fsdp_session(monkeypatch):
    """StageSession as an FSDP2 launch of 2 processes sees it (without the processes)."""
    import torch
    from accelerate.utils import DistributedType

    from ntp_rl.stages import session

    two_processes = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, is_main_process=True,
                                    process_index=0, device=torch.device("cpu"), mixed_precision="no", is_fsdp2=False)
    monkeypatch.setattr(session, "make_accelerator", lambda *args: two_processes)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    return session


def test_every_stage_shards_under_an_fsdp_launch(fsdp_session):
    from omegaconf import OmegaConf

    from ntp_rl.config.schema import WandbMode

    cfg = OmegaConf.create({"logger": {"wandb": {"mode": WandbMode.disabled}}})
    for stage in ("pretrain", "midtrain", "rl", "eval"):
        made = fsdp_session.StageSession(stage, cfg, [], precision="fp32")
        assert made.sharded and not made.empty_model, stage  # the first process holds the whole model


def test_processes_other_than_the_first_never_hold_the_whole_model():
    """The second process builds the model on the meta device; its shards and buffers come from the first."""
    result = launched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(REPO / "tests" / "fsdp_shard_check.py")], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout


@pytest.mark.slow  # a whole lineage in 2 launched processes: about 2 minutes on 2 cores
def test_a_lineage_runs_sharded_from_one_fsdp_launch(tmp_path, shared_cache):
    """pretrain -> eval -> rl -> eval in the processes of one FSDP2 launch: every stage sharded and recorded so."""
    from test_pipeline import PIPE

    # 6 eval problems x 4 samples are one generate call: the second process has none to make.
    result = launched([*fsdp_launch(tmp_path), "pipeline", *PIPE, "rl.num_mini_batches=2", f"out_dir={tmp_path / 'outputs'}",
                       f"data.cache_dir={shared_cache}"], env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {json.loads(p.read_text())["stage"]: json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("run.json")}
    assert {"pretrain", "rl", "eval"} <= set(runs)
    for stage, info in runs.items():
        assert info["status"] == "finished", stage
        if stage != "pipeline":
            assert info["environment"]["distributed"] == {"kind": "fsdp2", "world_size": 2}, stage
