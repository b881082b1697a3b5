"""`ntp-rl midtrain`: pre-training continued from a checkpoint with a new RoPE base, sequence length and schedule."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ntp_rl.checkpoint import latest_checkpoint
from ntp_rl.config.compose import compose
from ntp_rl.models import build_model, rope_theta_of
from ntp_rl.stages import run_stage
from ntp_rl.stages.pipeline import stage_config
from ntp_rl.tracking import read_metrics

from test_pipeline import PIPE


def run(stage, overrides):
    return run_stage(stage, compose(stage, overrides), overrides=overrides)


@pytest.fixture
def pretrained(tiny, tmp_path):
    results = run("pretrain", [*tiny, f"run_dir={tmp_path / 'pre'}"])
    return tmp_path / "pre", results


def midtrain_args(tiny, tmp_path, name, *overrides):
    # the pre-training's data keys, a run of 2 steps
    data = [o for o in tiny if o.startswith(("data.", "out_dir", "logger."))]
    return ["init_from=" + str(tmp_path / "pre"), *data, f"run_dir={tmp_path / name}", "train.batch_size=8",
            "train.max_steps=2", "train.eval_every=2", "train.save_every=2", "train.eval_sequences=8",
            "train.log_every=1", *overrides]


def test_midtrain_starts_from_the_pretrained_weights(pretrained, tiny, tmp_path):
    pre_dir, pre = pretrained
    # The same RoPE base and windows as the pre-training: step 0 is the pre-trained model exactly.
    same = run("midtrain", midtrain_args(tiny, tmp_path, "same", "model.rope_theta=10000", "data.seq_len=32"))
    val0 = next(r for r in read_metrics(tmp_path / "same") if r["step"] == 0 and "val/nll" in r)
    assert val0["val/nll"] == pytest.approx(pre["val"]["nll"], abs=1e-5)
    assert same["stage"] == "midtrain" and same["step"] == 2
    first = next(r for r in read_metrics(tmp_path / "same") if "train/lr" in r)
    assert first["train/lr"] == pytest.approx(3e-4 * (1 - 0.9 / 2)), "its own schedule: 3e-4 decaying to 3e-5"
    saved = OmegaConf.load(tmp_path / "same" / "config.yaml")
    assert saved.model.name_or_path == str(latest_checkpoint(pre_dir / "checkpoints"))


def test_midtrain_saves_the_new_rope_base_and_sequence_length(pretrained, tiny, tmp_path):
    results = run("midtrain", midtrain_args(tiny, tmp_path, "mid", "data.seq_len=64"))
    config = json.loads((Path(results["checkpoint"]) / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 1e6 and config["max_position_embeddings"] == 64
    pre_config = json.loads((latest_checkpoint(pretrained[0] / "checkpoints") / "config.json").read_text())
    assert pre_config["rope_parameters"]["rope_theta"] == 1e4
    # resuming the finished mid-training keeps its base: the run is recognised as done
    again = run("midtrain", midtrain_args(tiny, tmp_path, "mid", "data.seq_len=64", "resume=auto"))
    assert again["step"] == 2


def test_model_hf_takes_a_new_rope_base_and_keeps_its_own_when_null(pretrained):
    checkpoint = str(latest_checkpoint(pretrained[0] / "checkpoints"))
    for overrides, theta in ([], 1e4), (["model.rope_theta=5e5", "model.max_position_embeddings=77"], 5e5):
        cfg = compose("pretrain", ["model=hf", f"model.name_or_path={checkpoint}", *overrides])
        lm = build_model(cfg.model, vocab_size=128, pad_token_id=None, eos_token_id=None)
        assert rope_theta_of(lm.config) == theta
        assert lm.config.max_position_embeddings == (77 if overrides else 1024)


def test_the_pipeline_puts_midtrain_between_pretrain_and_the_rest(tmp_path):
    cfg = compose("pipeline", ["stages=[pretrain,midtrain,eval_base,rl,eval_rl]", "midtrain.rope_theta=2e6",
                               "midtrain.seq_len=128", "midtrain.max_steps=7"])
    lineage = tmp_path / "lineage"
    mid = stage_config("midtrain", cfg, lineage, "x", [])
    assert mid.init_from == str(lineage / "pretrain") and mid.model.rope_theta == 2e6
    assert (mid.data.seq_len, mid.model.max_position_embeddings, mid.train.max_steps) == (128, 128, 7)
    assert mid.optim.lr == 3e-4 and mid.loss == cfg.loss
    with_target = compose("pipeline", ["stages=[pretrain,midtrain,eval_base,rl,eval_rl]", "train.stop_at.accuracy=0.3",
                                       "task.difficulty=3"])
    pre = stage_config("pretrain", with_target, lineage, "x", [])
    assert pre.train.stop_at.accuracy == 0.3 and pre.task.difficulty == 3  # the pipeline's task is the one checked
    assert stage_config("midtrain", with_target, lineage, "x", []).train.stop_at.accuracy is None
    assert stage_config("rl", cfg, lineage, "x", []).init_from == str(lineage / "midtrain")
    assert stage_config("eval_base", cfg, lineage, "x", []).model.name_or_path == str(lineage / "midtrain")
    plain = compose("pipeline", [])
    assert "midtrain" not in plain.stages
    assert stage_config("rl", plain, lineage, "x", []).init_from == str(lineage / "pretrain")


def test_midtrain_loss_names_a_preset_for_mid_training_alone(tmp_path):
    cfg = compose("pipeline", ["stages=[pretrain,midtrain,eval_base,rl,eval_rl]", "loss=precision", "loss.k=10",
                               "midtrain.loss=dft"])
    lineage = tmp_path / "lineage"
    pre, mid = (stage_config(stage, cfg, lineage, "x", []).loss for stage in ("pretrain", "midtrain"))
    assert (pre.beta, pre.k) == (-0.25, 10)
    dft = compose("pretrain", ["loss=dft"]).loss
    assert mid == dft and mid.positive_form.value == "constant" and mid.k != 10  # the preset's numbers, not loss.*


@pytest.mark.slow
def test_a_pipeline_with_midtrain_runs_end_to_end(tmp_path, shared_cache):
    overrides = ["stages=[pretrain,midtrain,eval_base,rl,eval_rl]", "midtrain.seq_len=64", "midtrain.max_steps=2",
                 "midtrain.loss=dft"]
    args = [*PIPE, f"out_dir={tmp_path / 'outputs'}", f"data.cache_dir={shared_cache}", *overrides]
    results = run_stage("pipeline", compose("pipeline", args), overrides=overrides)
    lineage = Path(results["lineage"])
    mid_ckpt = latest_checkpoint(lineage / "midtrain" / "checkpoints")
    assert json.loads((mid_ckpt / "config.json").read_text())["rope_parameters"]["rope_theta"] == 1e6
    assert OmegaConf.load(lineage / "rl" / "config.yaml").init_from == str(lineage / "midtrain")
    assert [OmegaConf.load(lineage / stage / "config.yaml").loss.name for stage in ("pretrain", "midtrain")] == ["ce", "dft"]
    base = json.loads((lineage / "eval_base" / "results.json").read_text())
    assert base["model"] == str(mid_ckpt)
    assert "midtrain_nll" in results["summary"] and "rl_avg@4" in results["summary"]
