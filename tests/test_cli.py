"""The command line: stages, Hydra's flags, and one clear line for every mistake."""

import json

import pytest

from conftest import run_cli
from ntp_rl.cli import check_command_line, main
from ntp_rl.config.compose import compose
from ntp_rl.errors import UserError


def test_help_lists_every_stage(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for stage in ("pretrain", "rl", "eval", "pipeline", "compare"):
        assert f"  {stage} " in out


def test_no_arguments_prints_usage_and_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: ntp-rl <stage>" in capsys.readouterr().err


def test_cfg_job_prints_the_composed_config():
    result = run_cli("pretrain", "loss=precision", "loss.k=20", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "beta: -0.25" in result.stdout and "k: 20" in result.stdout and "name: precision" in result.stdout


def test_hydra_help_still_works():
    result = run_cli("pretrain", "--hydra-help")
    assert result.returncode == 0
    assert "Hydra" in result.stdout


@pytest.mark.parametrize("stage", ["pretrain", "rl", "eval", "pipeline"])
def test_each_stage_help_names_its_own_groups_presets_and_keys(stage, capsys):
    """Generated from the stage table and conf/<stage>.yaml: no group the stage does not read."""
    from ntp_rl.stage_help import field_comment, stage_groups
    from ntp_rl.stages import STAGES

    main([stage, "--help"])
    out = capsys.readouterr().out
    assert "powered by Hydra" not in out and STAGES[stage].summary in out
    groups = {key for key, _, _ in stage_groups(stage)}
    for key in groups:
        assert f"\n  {key}= " in out
    for key in STAGES[stage].keys:
        assert f"\n  {key} " in out and field_comment(STAGES[stage].schema, key), key
    if stage == "pretrain":
        assert groups == {"model", "data", "loss", "optim", "task"}  # task: what train.stop_at checks; not sampling or eval
        assert "  loss=         ce, dft, diversity, head_reward, precision, tail_penalty" in out
        assert "  loss.beta                    0.0          ground-truth reward factor: < 0 precision" in out
    if stage == "rl":
        assert "  init_from                    (required)" in out


def test_help_and_docs_give_the_same_multi_process_command(capsys):
    from conftest import REPO
    from ntp_rl.cli import MULTI_PROCESS_EXAMPLE

    main(["--help"])
    assert MULTI_PROCESS_EXAMPLE in capsys.readouterr().out
    assert MULTI_PROCESS_EXAMPLE in (REPO / "docs" / "many-gpus.md").read_text()


@pytest.mark.parametrize(
    "preset, expected",
    [
        ("ce", dict(beta=0.0, lambda_top=0.0, lambda_tail=0.0)),
        ("precision", dict(beta=-0.25, lambda_top=0.0, lambda_tail=0.0)),
        ("diversity", dict(beta=0.5, lambda_top=0.0, lambda_tail=0.0)),
        ("tail_penalty", dict(beta=0.0, lambda_top=0.0, lambda_tail=-0.1, k=100)),
        ("head_reward", dict(beta=0.0, lambda_top=0.1, lambda_tail=0.0, k=100)),
    ],
)
def test_loss_presets_are_the_papers_settings(preset, expected):
    cfg = compose("pretrain", [f"loss={preset}"])
    assert cfg.loss.name == preset
    for key, value in expected.items():
        assert cfg.loss[key] == value


def test_any_loss_field_is_overridable():
    cfg = compose("pretrain", ["loss=precision", "loss.beta=-0.1", "loss.k=20", "loss.positive_form=multiplicative"])
    assert (cfg.loss.beta, cfg.loss.k, cfg.loss.positive_form.value) == (-0.1, 20, "multiplicative")


@pytest.mark.parametrize(
    "args, names",
    [
        (["loss.bta=1"], ["loss.bta", "beta"]),
        (["bogus=1"], ["bogus"]),
        (["loss=foo"], ["loss=foo", "precision"]),
        (["model=huge"], ["model=huge", "tiny"]),
        (["loss.k=many"], ["loss.k"]),
        (["loss.k=0"], ["loss.k"]),
        (["loss.beta=nan"], ["loss.beta"]),
        (["loss.lambda_tail=inf"], ["loss.lambda_tail"]),
        (["loss.positive_form=additive"], ["loss.positive_form", "exponent", "multiplicative"]),
        (["data.seq_len=0"], ["data.seq_len"]),
        (["data.seq_len=-5"], ["data.seq_len"]),
        (["data=hf"], ["data.path"]),
        (["data.difficulty=9"], ["data.difficulty"]),
        (["data.solution_order=shuffled"], ["data.solution_order", "given", "any"]),
        (["train.batch_size=10", "train.micro_batch_size=4"], ["train.batch_size", "train.micro_batch_size"]),
        (["model.num_heads=5"], ["model.num_heads"]),
        (["optim.lr=-1"], ["optim.lr"]),
        (["optim.beta2=1.5"], ["optim.beta2"]),
        (["model=hf"], ["model.name_or_path"]),
        (["resume=/no/such/checkpoint"], ["resume"]),
        (["-m", "loss.beta=0,inf"], ["loss.beta=inf"]),
        (["loss.beta=[1,2]"], ["loss.beta"]),
    ],
)
def test_bad_overrides_fail_with_one_line_naming_the_key(args, names):
    with pytest.raises(UserError) as exc:
        check_command_line("pretrain", args)
    message = str(exc.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_bad_input_from_the_shell_exits_2_with_one_line(tmp_path):
    result = run_cli("pretrain", "loss.k=0", f"out_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("ntp-rl: error: loss.k=0")
    assert not any(tmp_path.iterdir()), "a refused run must leave nothing behind"


def test_unknown_stage():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "unknown stage 'frobnicate'" in result.stderr and result.stderr.strip().count("\n") == 0


def test_a_model_path_stands_for_the_hf_preset():
    from ntp_rl.cli import expand_model_paths

    assert expand_model_paths(["model=outputs/run", "x=1"]) == ["model=hf", "model.name_or_path=outputs/run", "x=1"]
    assert expand_model_paths(["model=tiny"]) == ["model=tiny"]
    assert expand_model_paths(["model=tinyy"]) == ["model=tinyy"]  # a typo gets the list of presets
    assert expand_model_paths(["model=Qwen/Qwen3-0.6B"])[1] == "model.name_or_path=Qwen/Qwen3-0.6B"


def test_micro_batch_defaults_to_each_process_share_of_the_batch():
    from ntp_rl.config.validate import micro_batches
    from ntp_rl.errors import ConfigError

    assert micro_batches(16, None, 1) == (16, 1)
    assert micro_batches(16, None, 2) == (8, 1)  # `accelerate launch --num_processes 2` with the defaults
    assert micro_batches(16, 4, 2) == (4, 2)  # an explicit micro batch accumulates
    with pytest.raises(ConfigError, match="train.batch_size=16: must be a multiple of the 3 processes"):
        micro_batches(16, None, 3)


@pytest.mark.parametrize("stage", ["pretrain", "midtrain", "rl", "eval", "pipeline"])
def test_enum_keys_are_enum_members_after_composition(stage):
    """The code compares with `is Enum.member`: a composed config must never hand it a string."""
    from enum import Enum

    from omegaconf import EnumNode, OmegaConf

    cfg = compose(stage, ["init_from=x"] if stage in ("rl", "midtrain") else ["model.name_or_path=x"] if stage == "eval" else [])

    def enum_leaves(node, prefix=""):
        for key in node:
            if OmegaConf.is_dict(node[key]):
                yield from enum_leaves(node[key], f"{prefix}{key}.")
            elif isinstance(node._get_node(key), EnumNode):
                yield f"{prefix}{key}", node[key]

    leaves = dict(enum_leaves(cfg))
    assert {"logger.wandb.mode"} < set(leaves), "every stage has enum keys (precision, wandb mode, ...)"
    assert all(isinstance(value, Enum) or value is None for value in leaves.values()), leaves  # None: Optional


def test_readme_and_help_list_the_stages_of_the_stage_table(capsys):
    import re

    from conftest import REPO
    from ntp_rl.stages import STAGES

    readme = (REPO / "README.md").read_text()
    documented = re.findall(r"^\| `(\w+)` \| .* \| built \|$", readme, re.M)
    assert documented == list(STAGES)
    main(["--help"])
    shown = re.findall(r"^  (\w+)\s{2,}", capsys.readouterr().out.split("stages:")[1].split("examples:")[0], re.M)
    assert shown == list(STAGES)


# ---------------------------------------------------------------------------
# Paths the tool printed, given back to it unquoted (issue 12, item 1)

RUN_NAME = "20261128-124035-pretrain-train.max_steps=5,loss=precision"


@pytest.mark.parametrize("key", ["init_from", "run_dir", "resume"])
def test_a_run_directory_with_equals_and_commas_is_one_path_value(key, tmp_path, monkeypatch):
    """`pretrain-loss=precision,seed=1` in a directory name is not Hydra syntax to the user."""
    from ntp_rl.overrides import check_parsable, quote_path_values

    run = tmp_path / "outputs" / "pretrain" / RUN_NAME
    (run / "checkpoints").mkdir(parents=True)
    args = quote_path_values([f"{key}={run}", "seed=3"])
    check_parsable(args)
    stage = "rl" if key == "init_from" else "pretrain"
    cfg = compose(stage, args + (["init_from=x"] if stage == "rl" and key != "init_from" else []))
    assert cfg[key] == str(run) and cfg.seed == 3


def test_a_model_directory_with_equals_and_commas_stands_for_the_hf_preset(tmp_path):
    from ntp_rl.cli import expand_model_paths
    from ntp_rl.overrides import quote_path_values

    run = tmp_path / RUN_NAME
    run.mkdir()
    args = quote_path_values(expand_model_paths([f"model={run}"]))
    assert compose("eval", args).model.name_or_path == str(run)


def test_a_sweep_over_existing_run_directories_stays_a_sweep(tmp_path):
    from ntp_rl.overrides import quote_path_values

    first, second = tmp_path / "a=1", tmp_path / "b=2"
    first.mkdir(), second.mkdir()
    from ntp_rl.sweeps import sweep_points

    points = sweep_points(quote_path_values([f"init_from={first},{second}"]))
    assert [compose("rl", point).init_from for point in points] == [str(first), str(second)]


def test_eval_of_a_run_directory_named_by_its_overrides(tmp_path, shared_cache):
    """The issue's own command, `ntp-rl eval model=outputs/pretrain/<time>-pretrain-train.max_steps=5`, runs."""
    from test_eval import EVAL_FAST, answering_model

    from ntp_rl.data.corpus import sample_documents
    from ntp_rl.data.tokenizer import train_embedded_tokenizer

    tok = train_embedded_tokenizer(sample_documents("pretrain", 0, 2, 400), 128)
    model = answering_model(tmp_path / "outputs" / "pretrain" / RUN_NAME, tok, "7")
    main(["eval", f"model={model}", f"out_dir={tmp_path / 'out'}", f"data.cache_dir={shared_cache}", *EVAL_FAST,
          "diagnostics.enabled=false"])
    (results,) = (tmp_path / "out").rglob("results.json")
    results = json.loads(results.read_text())
    assert results["model_arg"] == str(model) and results["model"] == str(model)


@pytest.mark.parametrize("args, name", [
    (["loss=ce", "loss.beta=-0.25"], "precision"),  # the case: not `ce`
    (["loss=ce", "loss.beta=-0.1"], "custom"),
    (["loss=precision", "loss.beta=0"], "ce"),
    (["loss=precision", "loss.k=20"], "precision"),  # k plays no part without top/tail rewards
    (["loss=tail_penalty", "loss.k=20"], "custom"),  # here it does
    (["loss=precision", "loss.positive_form=multiplicative"], "custom"),
    (["loss=ce", "loss.positive_form=multiplicative"], "ce"),  # both forms are 1/p at beta 0
    (["loss=ce", "loss.positive_form=constant"], "dft"),  # constant is 1, not 1/p, even at beta 0
    (["loss=dft", "loss.positive_form=exponent"], "ce"),
    (["loss=dft", "loss.beta=0.5"], "custom"),
    (["loss.lambda_top=0.1", "loss.k=100"], "head_reward"),
    (["loss.beta=-0.1", "loss.name=mine"], "mine"),  # a name of the user's own is kept
    (["loss.beta=-0.1", "loss.name=diversity"], "custom"),  # a preset's name on other numbers is not
])
def test_a_loss_name_follows_its_numbers(args, name):
    from ntp_rl.config.compose import loss_name

    assert loss_name(compose("pretrain", args).loss) == name


def test_a_run_shows_and_records_the_name_its_numbers_have(tmp_path, shared_cache, capsys):
    from conftest import TINY

    args = [*TINY, "train.max_steps=2", f"out_dir={tmp_path}", f"data.cache_dir={shared_cache}", "loss=ce",
            "loss.beta=-0.1"]
    main(["pretrain", *args])
    assert "| loss: custom (beta=-0.1," in capsys.readouterr().out
    (config,) = tmp_path.rglob("config.yaml")
    assert "name: custom" in config.read_text()
