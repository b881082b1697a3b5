"""`ntp-rl pretrain` end to end on a tiny model: learning, records, checkpoints, resume, DDP, sweeps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, TWO_CPU_PROCESSES, run_cli
from ntp_rl.checkpoint import latest_checkpoint, list_checkpoints
from ntp_rl.config.compose import compose
from ntp_rl.errors import ConfigError, TrainingDiverged
from ntp_rl.stages import run_stage
from ntp_rl.tracking import read_metrics


def pretrain(overrides):
    return run_stage("pretrain", compose("pretrain", overrides), overrides=overrides)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("run.json"))


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


def test_learns_and_writes_a_complete_run(tiny, tmp_path):
    results = pretrain([*tiny, "train.max_steps=40", "train.eval_every=20", "train.save_every=20", "optim.lr=1e-2"])
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert results["val"]["nll"] < 0.8 * results["unigram_nll"], "the model should beat the unigram baseline"

    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["stage"] == "pretrain"
    assert json.loads((run_dir / "results.json").read_text())["step"] == 40
    assert "beta: 0.0" in (run_dir / "config.yaml").read_text()
    rows = read_metrics(run_dir)
    train = [r for r in rows if "train/loss" in r]
    val = [r for r in rows if "val/nll" in r]
    assert [r["step"] for r in val] == [0, 20, 40]
    for key in ("train/loss", "train/nll", "train/ppl", "train/entropy", "train/accuracy", "train/target_prob",
                "train/topk_mass", "train/tail_mass", "train/lr", "train/grad_norm", "perf/tokens_per_sec",
                "perf/peak_mem_gib"):
        assert key in train[-1], key
    assert val[-1]["val/nll"] < val[0]["val/nll"]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000020", "step_00000040"]


def test_checkpoint_loads_with_transformers_alone(tiny, tmp_path):
    pretrain(tiny)
    (run_dir,) = run_dirs(tmp_path / "outputs")
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = t('Question: What is 2 + 3?', return_tensors='pt').input_ids\n"
        "print(m(ids).logits.shape[-1], len(t), 'ntp_rl' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, cwd="/",
                         env={**os.environ, "PYTHONPATH": ""}, check=True)
    vocab, tokenizer_len, imported = out.stdout.split()
    assert int(vocab) >= int(tokenizer_len) and imported == "False"


# Where the kill lands -> the checkpoint the resumed run must start from. The corpus of the
# tiny config has 913 windows, so with 112 windows a step the data wraps into its second
# (reshuffled) epoch during step 9.
KILLS = {
    "mid-run": ("step:6", "step_00000004"),
    "right-after-a-checkpoint": ("checkpoint_done:4", "step_00000004"),
    "during-a-checkpoint-write": ("checkpoint_write:8", "step_00000004"),
    "at-the-epoch-boundary": ("step:9", "step_00000008"),
}


@pytest.mark.parametrize("kill", sorted(KILLS))
def test_resume_after_sigkill_continues_exactly(kill, tiny, tmp_path):
    where, expected_checkpoint = KILLS[kill]
    common = [*tiny, "train.max_steps=10", "train.save_every=4", "train.log_every=1", "train.batch_size=112",
              "train.micro_batch_size=56"]
    straight = tmp_path / "straight"
    pretrain([*common, f"run_dir={straight}"])

    killed = tmp_path / "killed"
    args = ["pretrain", *common, f"run_dir={killed}"]
    first = run_cli(*args, env={"NTP_RL_KILL_AT": where})
    assert first.returncode == -9, first.stderr
    assert json.loads((killed / "run.json").read_text())["status"] == "running"  # not mistaken for finished
    assert latest_checkpoint(killed / "checkpoints").name == expected_checkpoint

    second = run_cli(*args, "resume=auto")
    assert second.returncode == 0, second.stderr
    a, b = train_rows(straight), train_rows(killed)
    assert sorted(b) == list(range(1, 11)), "one record per step, the repeated steps replaced"
    for step in range(1, 11):
        for key in ("train/loss", "train/grad_norm", "train/lr", "train/entropy"):
            assert a[step][key] == b[step][key], (step, key)  # bit-identical on CPU
    sa = torch.load(latest_checkpoint(straight / "checkpoints") / "optimizer.pt", weights_only=True)
    sb = torch.load(latest_checkpoint(killed / "checkpoints") / "optimizer.pt", weights_only=True)
    assert torch.equal(sa["state"][0]["exp_avg"], sb["state"][0]["exp_avg"])


def test_corrupt_or_foreign_checkpoints_are_refused_in_one_line(tiny, tmp_path):
    run_dir = tmp_path / "run"
    pretrain([*tiny, f"run_dir={run_dir}"])
    other_model = run_cli("pretrain", *tiny, "model.hidden_size=48", "train.max_steps=9", f"run_dir={run_dir}",
                          "resume=auto", "resume_allow_changes=true")
    assert other_model.returncode == 2
    assert "model: does not match the checkpoint" in other_model.stderr and "hidden_size=48" in other_model.stderr
    weights = latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    truncated = run_cli("pretrain", *tiny, "train.max_steps=9", f"run_dir={run_dir}", "resume=auto",
                        "resume_allow_changes=true")
    assert truncated.returncode == 2
    assert truncated.stderr.startswith("ntp-rl: error: resume=") and truncated.stderr.count("\n") == 1


def test_kill_during_checkpoint_write_keeps_the_previous_one(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = ["pretrain", *tiny, f"run_dir={run_dir}"]
    result = run_cli(*args, env={"NTP_RL_KILL_AT": "checkpoint_write:6"})
    assert result.returncode == -9
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000003"
    assert list((run_dir / "checkpoints").glob(".tmp-*")), "the half-written checkpoint stays hidden"
    resumed = run_cli(*args, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step 3" in resumed.stdout
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000006"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_resume_with_a_changed_config_is_refused_naming_the_keys_unless_allowed(tiny, tmp_path, capsys):
    """A CE run killed at step 4, resumed with loss.beta=-0.25: refused in one line, or, with
    resume_allow_changes=true, continued with the change said and recorded."""
    from ntp_rl.cli import main

    run_dir = tmp_path / "run"
    killed = run_cli("pretrain", *tiny, f"run_dir={run_dir}", env={"NTP_RL_KILL_AT": "step:4"})
    assert killed.returncode == -9
    before = (run_dir / "run.json").read_text()
    changed = ["pretrain", *tiny, "loss.beta=-0.25", "train.log_every=1", f"run_dir={run_dir}", "resume=auto"]
    with pytest.raises(SystemExit) as refused:
        main(changed)
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"ntp-rl: error: resume=auto: {run_dir} was trained with another config: loss.beta=0.0 (now -0.25), "
        "loss.name=ce (now precision); run the command it was started with, start a new run, or pass "
        "resume_allow_changes=true to continue it with this config (recorded in its run.json)")
    assert (run_dir / "run.json").read_text() == before, "the refused command touched nothing"

    results = pretrain([*changed[1:], "resume_allow_changes=true"])
    changes = [{"key": "loss.beta", "was": 0.0, "now": -0.25}, {"key": "loss.name", "was": "ce", "now": "precision"}]
    out = capsys.readouterr().out
    assert (f"note: resume_allow_changes=true: {run_dir} continues from {run_dir / 'checkpoints' / 'step_00000003'} "
            "with a changed config: loss.beta 0.0 -> -0.25, loss.name ce -> precision (recorded in its run.json)") in out
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished"
    assert info["config_changes"] == [{"resumed_from": str(run_dir / "checkpoints" / "step_00000003"),
                                       "changes": changes}]
    assert results["notices"]["config_changes"] == changes


def test_resume_auto_finds_the_unfinished_run_by_name(tiny, tmp_path):
    first = run_cli("pretrain", *tiny, "loss=precision", env={"NTP_RL_KILL_AT": "step:5"})
    assert first.returncode == -9
    second = run_cli("pretrain", *tiny, "loss=precision", "resume=auto")
    assert second.returncode == 0, second.stderr
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_existing_checkpoints_are_never_overwritten(tiny, tmp_path):
    run_dir = tmp_path / "run"
    pretrain([*tiny, f"run_dir={run_dir}"])
    with pytest.raises(ConfigError, match="resume=auto"):
        pretrain([*tiny, f"run_dir={run_dir}"])
    again = pretrain([*tiny, f"run_dir={run_dir}", "resume=auto"])  # already finished: nothing to do
    assert again["step"] == 6


def test_non_finite_loss_stops_and_leaves_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    from ntp_rl import models

    calls = {"n": 0}
    forward = models.ShapedLossLM.forward

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 8:  # micro-batches: 2 per step, so step 5 goes bad
                return out._replace(loss=out.loss * float("nan"))
        return out

    monkeypatch.setattr(models.ShapedLossLM, "forward", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="step 5"):
        pretrain([*tiny, f"run_dir={run_dir}"])
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "diverged" and "step_00000003" in info["error"]
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["step_00000003"]


def test_non_finite_steps_can_be_skipped_and_counted(tiny, tmp_path, monkeypatch):
    from ntp_rl import models

    forward = models.ShapedLossLM.forward
    calls = {"n": 0}

    def flaky(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 3:  # one bad micro-batch in step 2
                return out._replace(loss=out.loss * float("inf"))
        return out

    monkeypatch.setattr(models.ShapedLossLM, "forward", flaky)
    results = pretrain([*tiny, "train.on_nonfinite=skip", "train.log_every=1"])
    (run_dir,) = run_dirs(tmp_path / "outputs")
    assert results["step"] == 6
    assert train_rows(run_dir)[6]["train/nonfinite_skips"] == 1


def test_compiled_loss_trains_like_the_eager_one(tiny, tmp_path, compiled_loss):
    runs = {}
    for compiled in ("false", "true"):
        runs[compiled] = tmp_path / compiled
        pretrain([*tiny, "loss=tail_penalty", "loss.beta=-0.25", f"loss.compile={compiled}", "train.max_steps=4",
                  "train.log_every=1", f"run_dir={runs[compiled]}"])
    eager, compiled = train_rows(runs["false"]), train_rows(runs["true"])
    for step in range(1, 5):
        for key in ("train/loss", "train/grad_norm", "train/topk_mass"):
            assert compiled[step][key] == pytest.approx(eager[step][key], rel=1e-4), (step, key)


def test_two_processes_match_one_with_the_same_global_batch(tiny, tmp_path):
    one = tmp_path / "one"
    pretrain([*tiny, "train.micro_batch_size=8", "train.log_every=1", f"run_dir={one}"])
    two = tmp_path / "two"
    # On a machine without GPUs, --multi_gpu is how `accelerate launch` is told to start
    # several processes (they then train over gloo).
    cmd = [*TWO_CPU_PROCESSES, "-m", "ntp_rl", "pretrain",
           *tiny, "train.micro_batch_size=4", "train.log_every=1", f"run_dir={two}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "finished" and info["world_size"] == 2
    assert info["environment"]["distributed"] == {"kind": "ddp", "world_size": 2}
    assert len(run_dirs(tmp_path)) == 2, "rank 1 must not create a run directory of its own"
    a, b = train_rows(one), train_rows(two)
    for step in range(1, 7):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-3), step


def test_shell_sweep_makes_one_run_per_value(tiny, tmp_path):
    result = run_cli("pretrain", "-m", "loss.beta=-0.25,0,0.5", *tiny, "train.max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    dirs = run_dirs(tmp_path / "outputs" / "sweeps")
    assert len(dirs) == 3
    betas = sorted(float(json.loads((d / "run.json").read_text())["overrides"][0].split("=")[1]) for d in dirs)
    assert betas == [-0.25, 0.0, 0.5]
    for d in dirs:
        info = json.loads((d / "run.json").read_text())
        assert info["status"] == "finished" and info["name"].startswith("pretrain-loss.beta=")


def test_wandb_run_gets_name_group_tags_and_config(tiny, tmp_path, monkeypatch):
    captured = {}

    def fake_init(self, project_name, config=None, init_kwargs=None):
        captured.update(project=project_name, config=config, **init_kwargs["wandb"])

    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "init_trackers", fake_init)
    monkeypatch.setattr(Accelerator, "get_tracker", lambda self, name, unwrap=False: None)
    pretrain([*tiny, "logger.wandb.mode=offline", "loss=precision", "loss.k=7", "train.max_steps=1"])
    assert captured["project"] == "ntp-rl" and captured["job_type"] == "pretrain" and captured["mode"] == "offline"
    assert {"loss=precision", "loss.k=7"} <= set(captured["tags"])
    assert not any(t.startswith(("out_dir", "data.cache_dir", "logger.")) for t in captured["tags"])
    assert captured["config"]["loss"]["beta"] == -0.25 and captured["config"]["loss"]["k"] == 7
    assert captured["dir"].startswith(str(tmp_path))


def test_hf_text_files_and_streaming(tiny, tmp_path, shared_cache):
    from ntp_rl.data.corpus import sample_documents

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in sample_documents("pretrain", 0, 2, 300)))
    # A tokenizer from an earlier run's checkpoint stands in for a hub tokenizer.
    pretrain([*tiny, "train.max_steps=1", f"run_dir={tmp_path / 'tok'}"])
    tokenizer_dir = latest_checkpoint(tmp_path / "tok" / "checkpoints")
    for streaming in ("false", "true"):
        results = pretrain([*tiny, "data=hf", f"data.path={corpus}", f"data.tokenizer={tokenizer_dir}",
                            "data.seq_len=32", "data.val_docs=20", f"data.streaming={streaming}",
                            f"run_dir={tmp_path / streaming}"])
        assert results["step"] == 6


def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients():
    from types import SimpleNamespace

    from ntp_rl.models import ShapedLossLM
    from ntp_rl.stages.pretrain import build_lm

    class Tokenizer:
        pad_token_id, eos_token_id = 0, 1

        def __len__(self):
            return 64

    ids = torch.randint(2, 64, (3, 17), generator=torch.Generator().manual_seed(0))
    runs = {}
    for on in (False, True):
        cfg = compose("pretrain", [*TINY, "data.seq_len=16", f"model.gradient_checkpointing={str(on).lower()}"])
        torch.manual_seed(0)
        lm = build_lm(cfg, SimpleNamespace(tokenizer=Tokenizer()), None)
        calls = []
        # on a module inside the layer, as a pre-hook: transformers from 5.2x checkpoints the layer's forward, not
        # its __call__, so the layer's own hooks do not run again; the recompute stops once backward has what it needs
        lm.model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        ShapedLossLM(lm, cfg.loss)(ids[:, :-1], ids[:, 1:]).loss.backward()
        runs[on] = (len(calls), {name: p.grad for name, p in lm.named_parameters()})
    assert runs[False][0] == 1 and runs[True][0] == 2, "with the switch on, the layer runs again in backward"
    for name, want in runs[False][1].items():
        assert torch.allclose(runs[True][1][name], want, atol=1e-6), name


# The small policy's settings (tests/rl_helpers.py), checked every 10 steps: on 16 validation problems x 4
# samples its avg@4 is 0.016 until step 40, then 0.047 at step 50.
STOP_AT = ["data.difficulty=1", "data.seq_len=64", "train.batch_size=16", "train.micro_batch_size=16",
           "train.max_steps=60", "train.eval_every=10", "train.save_every=10", "train.keep_last=10", "optim.lr=1e-2",
           "optim.warmup_steps=5", "task.difficulty=1", "train.stop_at.problems=16", "train.stop_at.samples=4",
           "train.stop_at.sampling.max_new_tokens=24", "train.stop_at.sampling.batch_size=64"]


def test_stop_at_ends_pretraining_at_the_first_check_that_reaches_the_accuracy(tiny, tmp_path):
    torch.set_num_threads(1)
    plain = pretrain([*tiny, *STOP_AT, f"run_dir={tmp_path / 'plain'}"])
    stopped = pretrain([*tiny, *STOP_AT, f"run_dir={tmp_path / 'stopped'}", "train.stop_at.accuracy=0.03"])

    checks = [r for r in read_metrics(tmp_path / "stopped") if "val/task_avg@4" in r]
    assert stopped["step"] == checks[-1]["step"] < 60 and plain["step"] == 60
    assert checks[-1]["val/task_avg@4"] >= 0.03 > max(r["val/task_avg@4"] for r in checks[:-1])
    assert stopped["stopped_at"] == {"step": stopped["step"], "metric": "avg@4", "value": checks[-1]["val/task_avg@4"],
                                     "accuracy": 0.03, "split": "validation", "problems": 16}
    assert "stopped_at" not in plain  # a run without train.stop_at says nothing of it
    late = pretrain([*tiny, *STOP_AT, f"run_dir={tmp_path / 'late'}", "train.stop_at.accuracy=0.001",
                     "train.stop_at.min_steps=25"])
    assert late["step"] == 30 and [r["step"] for r in read_metrics(tmp_path / "late") if "val/task_avg@4" in r] == [30]
    final = latest_checkpoint(tmp_path / "stopped" / "checkpoints")
    assert final.name == f"step_{stopped['step']:08d}"
    # The checks sample with seeds of their own: the weights are those of a run that never checked.
    same_step = tmp_path / "plain" / "checkpoints" / final.name
    from safetensors.torch import load_file
    ours, theirs = load_file(final / "model.safetensors"), load_file(same_step / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # Finished means finished: resume=auto trains no further, even from the checkpoint alone.
    again = pretrain([*tiny, *STOP_AT, f"run_dir={tmp_path / 'stopped'}", "train.stop_at.accuracy=0.03", "resume=auto"])
    assert again["step"] == stopped["step"]
    (tmp_path / "stopped" / "results.json").unlink()
    again = pretrain([*tiny, *STOP_AT, f"run_dir={tmp_path / 'stopped'}", "train.stop_at.accuracy=0.03", "resume=auto"])
    assert again["step"] == stopped["step"] and again["stopped_at"]["value"] == stopped["stopped_at"]["value"]
    assert latest_checkpoint(tmp_path / "stopped" / "checkpoints") == final
