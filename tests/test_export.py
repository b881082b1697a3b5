"""Hugging Face exports written a layer group at a time (ntp_rl/export.py): the same model as save_pretrained's
gathered export, by every loader, without the writer ever holding more than one group."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY
from ntp_rl.cli import main
from ntp_rl.config.compose import compose
from ntp_rl.export import INDEX_FILE, write_streamed
from ntp_rl.models import build_model, load_pretrained

SMALL = [a for a in TINY if a.startswith("model.")]
IDS = torch.randint(0, 100, (2, 24), generator=torch.Generator().manual_seed(0))


def built(*overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    lm = build_model(compose("pretrain", [*SMALL, *overrides]).model, vocab_size=128, pad_token_id=0, eos_token_id=1)
    with torch.no_grad():  # a trained bias: a zero one would not show whether it was written
        for name, buffer in lm.named_buffers():
            if name.endswith("expert_bias"):
                buffer.copy_(torch.randn(buffer.shape))
    return lm.eval()


def logits_of(directory: Path, remote: bool) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return {"transformers": AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote).eval()(IDS).logits,
                "ntp_rl": load_pretrained(str(directory)).eval()(IDS).logits}


def assert_same_export(streamed: Path, gathered: Path, remote: bool) -> None:
    """`streamed` is `gathered` in Hugging Face's sharded layout: the same config files, and the same logits
    from transformers alone and from ntp-rl's loader."""
    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads((gathered / name).read_text()), name
    assert sorted(p.name for p in streamed.glob("*.py")) == sorted(p.name for p in gathered.glob("*.py"))
    expected = logits_of(gathered, remote)
    for loader, logits in logits_of(streamed, remote).items():
        torch.testing.assert_close(logits, expected[loader], rtol=0, atol=1e-6, msg=loader)


def on_disk(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (directory / "model.safetensors").exists():
        return load_file(directory / "model.safetensors")
    return {k: v for f in sorted(directory.glob("model-*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("overrides", [(), ("model=tiny_moe", "model.moe_balancing=bias"),
                                       ("model=tiny_moe", "model.moe_balancing=aux_loss")],
                         ids=["dense", "moe_bias", "moe_aux_loss"])
def test_a_streamed_export_is_the_gathered_one_in_hf_sharded_layout(overrides, tmp_path):
    lm = built(*overrides)
    gathered, streamed = tmp_path / "gathered", tmp_path / "streamed"
    lm.save_pretrained(gathered)
    report = write_streamed(streamed, lm, is_main=True)

    index = json.loads((streamed / INDEX_FILE).read_text())
    files = sorted(p.name for p in streamed.glob("*.safetensors"))
    # embeddings, one file per decoder layer, final norm; the tied head nowhere
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert len(files) == lm.config.num_hidden_layers + 2 == report.files
    assert sorted(set(index["weight_map"].values())) == files and "lm_head.weight" not in index["weight_map"]
    assert sorted(on_disk(streamed)) == sorted(on_disk(gathered)) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == report.total_bytes == sum(t.nbytes for t in on_disk(gathered).values())
    if "moe_balancing=aux_loss" in overrides:  # transformers writes a plain Qwen3-MoE's experts one by one
        assert "model.layers.0.mlp.experts.0.gate_proj.weight" in index["weight_map"]
    assert_same_export(streamed, gathered, remote="model.moe_balancing=bias" in overrides)

    # The writer held one group at a time: a decoder layer at most, far from the whole model.
    assert report.peak_held_bytes == report.largest_group_bytes
    assert report.largest_group_bytes <= max(t.nbytes for t in lm.state_dict().values()) + \
        sum(t.nbytes for n, t in lm.state_dict().items() if n.startswith("model.layers.0."))
    assert report.peak_held_bytes < report.total_bytes / 2


def gathered_reference(checkpoint: Path, out: Path) -> Path:
    """What a checkpoint's export was before it was streamed: the whole model, read from the FSDP shards,
    saved by save_pretrained."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoConfig, AutoModelForCausalLM

    from ntp_rl import moe

    out.mkdir()
    dcp_to_torch_save(str(checkpoint / "sharded"), str(out / "whole.pt"))
    saved = torch.load(out / "whole.pt", weights_only=True)["model"]
    moe.register_checkpoint_classes()
    lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    lm.load_state_dict({k.removeprefix("lm."): v for k, v in saved.items()}, strict=True)
    lm.save_pretrained(out)
    (out / "whole.pt").unlink()
    return out


def model_files(directory: Path) -> list[str]:
    training = ("trainer_state", "rng_state_", "optimizer")
    return sorted(p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(training))


def test_a_sharded_run_exports_a_layer_at_a_time_in_the_run_and_on_demand(tiny, tmp_path, capsys):
    """A 2-process FSDP2 run of the bias MoE: each checkpoint's export, and `ntp-rl export` of the run from its
    shards on one process, are the gathered export (logits to 1e-6 from transformers and from ntp-rl), file
    for file the same, and the on-demand one held one layer group at a time."""
    from conftest import fsdp_launch
    from test_fsdp import launched

    run = tmp_path / "run"
    result = launched([*fsdp_launch(tmp_path), "pretrain", *tiny, "model=tiny_moe", "train.max_steps=4",
                       "train.save_every=4", "train.eval_every=4", "train.micro_batch_size=2", f"run_dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = run / "checkpoints" / "step_00000004"
    assert (checkpoint / INDEX_FILE).exists() and not (checkpoint / "model.safetensors").exists()
    reference = gathered_reference(checkpoint, tmp_path / "gathered")
    assert_same_export(checkpoint, reference, remote=True)
    assert any(t.abs().max() > 0 for n, t in on_disk(checkpoint).items() if n.endswith("expert_bias")), "a trained bias"

    exported = main(["export", str(run)])
    out = run / "export" / "step_00000004"
    assert exported["out_dir"] == str(out) and exported["sharded"]
    assert "rebuilt from the FSDP shards" in capsys.readouterr().out
    assert_same_export(out, reference, remote=True)
    assert sorted(p.name for p in out.iterdir()) == model_files(checkpoint), "the model's files, no training state"
    for name in [*sorted(p.name for p in out.glob("model*")), "config.json"]:
        assert (out / name).read_bytes() == (checkpoint / name).read_bytes(), name
    report = exported["report"]
    assert report["peak_held_bytes"] == report["largest_group_bytes"] < report["total_bytes"] / 2

    # Shards cut short: one line naming the key, exit 2, and nothing left where the export would be.
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    shard = broken / "sharded" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["export", str(broken), f"export.out_dir={tmp_path / 'nothing'}"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err, err
    assert err.startswith(f"ntp-rl: error: export.run={broken}: cannot read the checkpoint ("), err
    assert not (tmp_path / "nothing").exists() and not list(tmp_path.glob(".nothing*"))


def test_ntp_rl_export_of_a_plain_run_is_its_checkpoint_without_the_training_state(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from test_pretrain import pretrain

    run, out = tmp_path / "run", tmp_path / "hf"
    pretrain([*tiny, f"run_dir={run}"])
    checkpoint = run / "checkpoints" / "step_00000006"
    exported = main(["export", str(checkpoint), f"export.out_dir={out}"])
    assert not exported["sharded"] and exported["report"] is None
    assert sorted(p.name for p in out.iterdir()) == model_files(checkpoint) and (out / "model.safetensors").exists()
    for name in model_files(checkpoint):
        assert (out / name).read_bytes() == (checkpoint / name).read_bytes(), name
    AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(SystemExit) as done:
        main(["export", "--help"])
    assert done.value.code == 0 and "usage: ntp-rl export <run dir or checkpoint dir>" in capsys.readouterr().out


def test_the_model_is_found_in_the_saved_state_under_its_training_module_or_refused():
    from ntp_rl.errors import DataError
    from ntp_rl.export import _saved_prefix

    names = ["model.embed_tokens.weight", "model.norm.weight"]
    assert _saved_prefix({f"model.lm.{n}": None for n in names} | {"optimizer.state.x": None}, names) == "model.lm."
    assert _saved_prefix({f"model.{n}": None for n in names}, names) == "model."
    with pytest.raises(DataError, match="no model.norm.weight"):
        _saved_prefix({"model.lm.model.embed_tokens.weight": None}, names)
    with pytest.raises(DataError, match="holds the model 2 times"):
        _saved_prefix({f"model.{p}.{n}": None for p in ("lm", "ref") for n in names}, names)
