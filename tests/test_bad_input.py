"""Every mistake a user can make, across the stages: one line naming the cause, exit code 2,
and no run directory left behind that could be mistaken for a finished run."""

import json
import shutil

import pytest

from conftest import TINY
from ntp_rl.checkpoint import latest_checkpoint
from ntp_rl.cli import main
from ntp_rl.config.compose import compose
from ntp_rl.stages import run_stage


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny trained run, a truncated copy of its checkpoint, and data files good and bad."""
    root = tmp_path_factory.mktemp("inputs")
    overrides = [*TINY, "train.max_steps=2", "train.save_every=2", f"out_dir={root}", f"run_dir={root / 'run'}",
                 f"data.cache_dir={root / 'cache'}"]
    run_stage("pretrain", compose("pretrain", overrides), overrides)
    checkpoint = latest_checkpoint(root / "run" / "checkpoints")
    truncated = root / "truncated" / "checkpoints" / checkpoint.name
    shutil.copytree(checkpoint, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    no_eos = root / "no_eos_tokenizer"
    shutil.copytree(checkpoint, no_eos)
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    config.pop("eos_token", None)
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    special = no_eos / "special_tokens_map.json"
    if special.exists():
        special.write_text(json.dumps({k: v for k, v in json.loads(special.read_text()).items() if k != "eos_token"}))
    (root / "empty.jsonl").write_text("")
    (root / "corpus.jsonl").write_text("".join(json.dumps({"body": "Question: 1 + 1?"}) + "\n" for _ in range(50)))
    (root / "one.jsonl").write_text(json.dumps({"text": "Question: 1 + 1? Answer: 2. #### 2"}) + "\n")
    (root / "few.jsonl").write_text("".join(json.dumps({"text": "Question: 1 + 1?"}) + "\n" for _ in range(3)))
    (root / "numbers.jsonl").write_text("".join(json.dumps({"text": "Question: 1 + 1?" if i != 7 else 12}) + "\n"
                                                for i in range(50)))
    (root / "a_file").write_text("not a directory")
    bad_config = root / "bad_config"  # config.json disagrees with the weights
    shutil.copytree(checkpoint, bad_config)
    config = json.loads((bad_config / "config.json").read_text())
    (bad_config / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] + 32}))
    bad_tokenizer = root / "bad_tokenizer"
    shutil.copytree(checkpoint, bad_tokenizer)
    (bad_tokenizer / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    return {"root": root, "run": root / "run", "checkpoint": checkpoint, "truncated": truncated, "no_eos": no_eos}


# (stage and arguments, what the one line must name). {run} etc. are filled from `inputs`.
CASES = [
    # malformed overrides, wrong types, unknown presets and keys
    ("pretrain loss.bta=1", "loss.bta"),
    ("pretrain loss.k=many", "loss.k"),
    ("pretrain loss=sharp", "loss=sharp"),
    ("pretrain model=tinyy", "model=tinyy"),
    ("pretrain data.seq_len=abc", "data.seq_len"),
    ("pretrain loss.positive_form=additive", "loss.positive_form"),
    ("pretrain train.max_steps=", "train.max_steps"),
    # impossible arithmetic and ranges
    ("pretrain train.batch_size=10 train.micro_batch_size=4", "train.batch_size"),
    ("pretrain model.num_heads=5", "model.num_"),
    ("pretrain data.seq_len=0", "data.seq_len"),
    ("pretrain loss.k=0", "loss.k"),
    ("pretrain loss.k=100000", "loss.k"),  # more than the vocabulary: known only once the tokenizer is built
    # non-finite hyperparameters
    ("pretrain loss.beta=nan", "loss.beta"),
    ("pretrain loss.lambda_tail=-inf", "loss.lambda_tail"),
    ("pretrain loss.compile=true loss.impl=reference", "loss.compile"),
    ("pretrain optim.lr=inf", "optim.lr"),
    # missing or empty datasets, a tokenizer without the tokens it needs
    ("pretrain data=hf data.path={root}/none/*.jsonl data.tokenizer={checkpoint}", "data.path"),
    ("pretrain data=hf data.path={root}/empty.jsonl data.tokenizer={checkpoint}", "empty.jsonl"),
    ("pretrain data=hf data.path={root}/corpus.jsonl data.tokenizer={checkpoint}", "data.text_field"),
    ("pretrain data=hf data.path={root}/corpus.jsonl data.text_field=body data.tokenizer={no_eos}", "eos"),
    # checkpoints: truncated, of another architecture, missing
    ("pretrain resume={truncated}", "resume"),
    ("pretrain model.hidden_size=48 run_dir={run} resume=auto train.max_steps=4", "model.hidden_size=32 (now 48)"),
    ("pretrain model.hidden_size=48 run_dir={run} resume=auto resume_allow_changes=true train.max_steps=4",
     "does not match the checkpoint"),
    ("pretrain resume=/no/such/checkpoint", "resume"),
    ("pretrain run_dir={run}", "run_dir"),  # holds checkpoints already: never overwritten
    # MoE balancing and mid-training
    ("pretrain model=tiny_moe model.moe_balancing=loss", "model.moe_balancing"),
    ("pretrain model=tiny_moe model.moe_bias_rate=-1", "model.moe_bias_rate"),
    ("pretrain train.stop_at.accuracy=1.5", "train.stop_at.accuracy"),
    ("pretrain train.stop_at.accuracy=0.3 train.stop_at.split=dev", "train.stop_at.split"),
    ("pipeline train.stop_at.accuracy=0.3 train.stop_at.samples=0", "train.stop_at.samples"),
    ("midtrain", "init_from"),
    ("midtrain init_from=/no/such/run", "init_from"),
    ("midtrain init_from={run} model=tiny", "model"),
    ("midtrain init_from={run} model.rope_theta=0", "model.rope_theta"),
    ("midtrain init_from={run} data.seq_len=64 model.max_position_embeddings=32", "data.seq_len"),
    ("pipeline stages=[midtrain,pretrain]", "stages"),
    ("pipeline stages=[pretrain,midtrain] midtrain.seq_len=0", "midtrain.seq_len"),
    ("pipeline stages=[pretrain,midtrain] midtrain.loss=sft", "midtrain.loss"),
    # rl
    ("rl init_from=/no/such/run", "init_from"),
    ("rl init_from={run} rl.num_generations=1", "rl.num_generations"),
    ("rl init_from={run} rl.max_logp_gap=0", "rl.max_logp_gap"),
    ("rl init_from={run} rl.num_mini_batches=3", "rl.prompts_per_step"),
    ("rl init_from={run} rl.clip_eps_low=1.5", "rl.clip_eps_low"),
    ("rl init_from={run} task=nonexistent", "task=nonexistent"),
    ("rl init_from={run} task.reward_fn=nowhere", "task.reward_fn"),
    ("rl init_from={run} optim.lr=nan", "optim.lr"),
    # eval
    ("eval model=/no/such/run", "model"),
    ("eval model={run} eval.ks=[1,32]", "eval.ks"),
    ("eval model={run} eval.num_problems=0", "eval.num_problems"),
    ("eval model={run} sampling.top_p=0", "sampling.top_p"),
    ("eval model=tiny", "eval needs trained weights"),
    # pipeline, compare, the command itself
    ("pipeline stages=[rl,pretrain]", "stages"),
    ("pipeline rl_optim.lr=-1", "rl_optim.lr"),
    ("pipeline hypotheses=no_such_study", "hypotheses: compare: --hypotheses no_such_study: neither a YAML file"),
    ("pipeline train.precision=bf16", "must be the same in a pipeline"),
    ("compare {root}/nothing", "nothing"),
    ("export", "export.run"),
    ("export {root}/nothing", "export.run"),
    ("export {root}", "export.run"),
    ("export {run} export.out=hf", "export.out"),
    ("export {run} export.out_dir={run}", "export.out_dir"),
    ("frobnicate", "frobnicate"),
]


@pytest.mark.parametrize("command, needle", CASES, ids=[c for c, _ in CASES])
def test_a_mistake_costs_one_line_and_exit_2(command, needle, inputs, tmp_path, capsys):
    paths = {k: str(v) for k, v in inputs.items()}
    stage, *rest = command.format(**paths).split()
    common = []
    if stage == "pretrain":  # the case's own arguments come last, so they win over the tiny setup
        common = [*TINY, f"data.cache_dir={inputs['root'] / 'cache'}"]
    if stage in ("pretrain", "rl", "eval", "pipeline"):
        common += [f"out_dir={tmp_path}", "logger.wandb.mode=disabled"]
    args = [stage, *common, *rest]
    before = {p: p.stat().st_mtime for p in inputs["run"].rglob("*")}
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert err.startswith("ntp-rl: error: ") and "\n" not in err, err
    assert needle in err, err
    assert not list(tmp_path.rglob("run.json")), "a refused command must leave no run directory"
    assert {p: p.stat().st_mtime for p in inputs["run"].rglob("*")} == before, "existing runs are never touched"


BAD_CONFIG = ("model.name_or_path={root}/bad_config: cannot load the model: its weights do not have the shapes its "
              "config.json describes (was config.json edited, or taken from another model?)")

# (arguments, the exact line after "ntp-rl: error: "); {out} is the case's out_dir, the rest from `inputs`.
EXACT = [
    # values Hydra's grammar cannot read: how to quote them (issue 12, items 1 and 6)
    (["pretrain", "logger.wandb.name=café"],
     "logger.wandb.name: Hydra cannot read the value 'café' ($, =, commas, brackets, parentheses, quotes and "
     "non-ASCII characters are its syntax); quote it for Hydra inside the shell's quotes: 'logger.wandb.name=\"café\"'"),
    (["pretrain", "logger.wandb.name=$(whoami)"],
     "logger.wandb.name: Hydra cannot read the value '$(whoami)' ($, =, commas, brackets, parentheses, quotes and "
     "non-ASCII characters are its syntax); quote it for Hydra inside the shell's quotes: "
     "'logger.wandb.name=\"$(whoami)\"'"),
    (["pretrain", "logger.wandb.name=it's=1"],
     "logger.wandb.name: Hydra cannot read the value \"it's=1\" ($, =, commas, brackets, parentheses, quotes and "
     "non-ASCII characters are its syntax); quote it for Hydra inside the shell's quotes: "
     "\"logger.wandb.name='it\\\\'s=1'\""),
    # tracebacks where one line is due (issue 12, item 3)
    (["pretrain", "seed=-1"], "seed=-1: must be an integer in 0..4294967295 (0..2**32-1)"),
    (["rl", "init_from={run}", "seed=4294967296"], "seed=4294967296: must be an integer in 0..4294967295 (0..2**32-1)"),
    (["pretrain", "data=hf", "data.path={root}/few.jsonl", "data.tokenizer={checkpoint}", "data.val_docs=5"],
     "data.path={root}/few.jsonl: has 3 document(s) with text, not more than data.val_docs=5 (the first "
     "data.val_docs are held out for validation, the rest trained on); set data.val_docs to at most 2 "
     "(e.g. data.val_docs=1) or add documents"),
    (["pretrain", "data=hf", "data.path={root}/one.jsonl", "data.tokenizer={checkpoint}", "data.val_docs=1"],
     "data.path={root}/one.jsonl: has 1 document(s) with text, not more than data.val_docs=1 (the first "
     "data.val_docs are held out for validation, the rest trained on); data.val_docs is at least 1, so a corpus "
     "of 1 document(s) cannot be split: add documents (2 or more: one held out, the rest trained on)"),
    (["pretrain", "data=hf", "data.path={root}/numbers.jsonl", "data.tokenizer={checkpoint}", "data.val_docs=5"],
     "data.text_field=text: row 7 of data.path={root}/numbers.jsonl holds int 12, not text"),
    (["pretrain", "out_dir={root}/a_file"], "out_dir={root}/a_file: is a file, not a directory"),
    (["pretrain", "out_dir={root}/a_file/sub"], "out_dir={root}/a_file/sub: {root}/a_file is a file, not a directory"),
    (["pretrain", "run_dir={root}/a_file"], "run_dir={root}/a_file: is a file, not a directory"),
    (["pretrain", "data.cache_dir={root}/a_file"], "data.cache_dir={root}/a_file: is a file, not a directory"),
    # a reward function that cannot be one (issue 12, item 4): refused before any run starts, never called
    (["rl", "init_from={run}", "task.reward_fn=os:system"],
     "task.reward_fn=os:system: must accept (completion, problem); os.system takes (command)"),
    (["rl", "init_from={run}", "task.reward_fn=os:sep"], "task.reward_fn=os:sep: os has no function sep"),
    # messages that pointed at the wrong thing (issue 12, item 6)
    (["eval", "model={root}/bad_tokenizer"],
     "tokenizer '{root}/bad_tokenizer': cannot be read; its tokenizer files are corrupt or incomplete (Unterminated "
     "string starting at: line 1 column 20 (char 19))"),
    (["eval", "model={root}/bad_config"], BAD_CONFIG),
    (["pipeline", "task.reward_fn=os:getcwd"],
     "task.reward_fn=os:getcwd: must accept (completion, problem); os.getcwd takes ()"),
]


@pytest.mark.parametrize("args, expected", EXACT, ids=[" ".join(a) for a, _ in EXACT])
def test_a_mistake_is_refused_with_its_exact_line(args, expected, inputs, tmp_path, capsys):
    paths = {k: str(v) for k, v in inputs.items()}
    stage, *rest = [a.format(**paths, out=tmp_path) for a in args]
    common = [*TINY, f"data.cache_dir={inputs['root'] / 'cache'}"] if stage == "pretrain" else []
    if stage in ("pretrain", "rl", "eval", "pipeline"):
        common += [f"out_dir={tmp_path}", "logger.wandb.mode=disabled"]
    before = {p: p.stat().st_mtime for p in inputs["run"].rglob("*")}
    with pytest.raises(SystemExit) as exc:
        main([stage, *common, *rest])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2, err
    assert err == f"ntp-rl: error: {expected.format(**paths, out=tmp_path)}"
    assert not list(tmp_path.rglob("run.json")), "a refused command must leave no run directory"
    assert {p: p.stat().st_mtime for p in inputs["run"].rglob("*")} == before, "existing runs are never touched"


def test_a_checkpoint_whose_config_disagrees_with_its_weights_costs_our_line_only(inputs, tmp_path):
    """Not transformers' load report first: the whole of stderr is the one line."""
    from conftest import run_cli

    result = run_cli("eval", f"model={inputs['root']}/bad_config", f"out_dir={tmp_path}", "logger.wandb.mode=disabled")
    assert result.returncode == 2
    assert result.stderr.strip() == f"ntp-rl: error: {BAD_CONFIG.format(root=inputs['root'])}"


def test_generator_vllm_without_vllm_is_refused_before_a_run_directory_exists(inputs, tmp_path, monkeypatch, capsys):
    """Not after the engine's start, leaving a failed run directory and a W&B run: at validation, in one line."""
    import sys

    from ntp_rl.vllm_engine import INSTALL_HINT

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, as where it is not installed
    with pytest.raises(SystemExit) as exc:
        main(["rl", f"init_from={inputs['run']}", "generator=vllm", f"out_dir={tmp_path}", "logger.wandb.mode=offline"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"ntp-rl: error: generator=vllm: vllm needs vLLM, which is not installed (or fails to import): "
        f"{INSTALL_HINT}; or sample with generator=hf")
    assert not list(tmp_path.rglob("*")), "no run directory, no W&B files"
