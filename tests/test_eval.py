"""`ntp-rl eval`: exact metrics from models whose outputs are known, its records, bad input, and the 2-process gather.

The models here are real transformers models whose weights are set by hand: every layer
adds nothing to the residual stream, so the logits depend on the current token alone, and
the LM head maps each token to the next one we want. Sampling them (at any temperature
with top-p < 1) emits a chosen completion, or a uniform choice among a few tokens.
"""

import csv
import json
import math
import subprocess
from itertools import combinations
from pathlib import Path

import pytest
import torch

from conftest import REPO, TWO_CPU_PROCESSES, fsdp_launch, run_cli
from ntp_rl.config.compose import compose
from ntp_rl.config.schema import TaskConfig
from ntp_rl.errors import ConfigError, DataError, UserError
from ntp_rl.tasks import build_task

EVAL_FAST = [
    "logger.wandb.mode=disabled", "logger.progress_bar=false", "eval.n=4", "eval.ks=[1,2,4]", "eval.num_problems=6",
    "sampling.max_new_tokens=8", "data.num_train_docs=400", "data.num_val_docs=40", "data.seq_len=32",
    "diagnostics.num_sequences=6", "diagnostics.k=5", "diagnostics.bins=10",
]


@pytest.fixture(scope="module")
def tokenizer():
    from ntp_rl.data.corpus import sample_documents
    from ntp_rl.data.tokenizer import train_embedded_tokenizer

    return train_embedded_tokenizer(sample_documents("pretrain", 0, 2, 400), 128)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def save_model(path: Path, tokenizer, transitions: dict[int, list[int]], margin: float = 50.0) -> Path:
    """A Qwen3 whose next token depends only on the current one: uniform over `transitions[token]`, else over all."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = len(tokenizer)
    config = Qwen3Config(vocab_size=vocab, hidden_size=vocab, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=16, intermediate_size=8, tie_word_embeddings=False,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))  # after RMSNorm: sqrt(vocab) * one-hot
        model.lm_head.weight.zero_()
        for current, following in transitions.items():
            model.lm_head.weight[following, current] = margin
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def prompt_end(tokenizer) -> int:
    ends = {ids(tokenizer, p.prompt)[-1] for p in build_task(TaskConfig()).problems("test", 20)}
    assert len(ends) == 1, "every prompt ends with the same token ('Answer:')"
    return ends.pop()


def answering_model(path: Path, tokenizer, answer: str) -> Path:
    """Always completes a prompt with ' #### <answer>' and EOS."""
    chain = [prompt_end(tokenizer), *ids(tokenizer, f" #### {answer}"), tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain), "a token-by-token chain needs distinct tokens"
    return save_model(path, tokenizer, {a: [b] for a, b in zip(chain, chain[1:])})


def guessing_model(path: Path, tokenizer) -> Path:
    """Completes a prompt with ' #### <one digit, uniformly at random>' and EOS."""
    end, (mark, space, _) = prompt_end(tokenizer), ids(tokenizer, " #### 0")
    digits = [ids(tokenizer, f" #### {d}")[-1] for d in range(10)]
    return save_model(path, tokenizer, {end: [mark], mark: [space], space: digits,
                                        **{d: [tokenizer.eos_token_id] for d in digits}})


def evaluate(overrides):
    from ntp_rl.stages import run_stage

    return run_stage("eval", compose("eval", overrides), overrides=overrides)


def setup(tmp_path, shared_cache, model_dir, *extra):
    return [f"model.name_or_path={model_dir}", f"out_dir={tmp_path / 'outputs'}", f"data.cache_dir={shared_cache}",
            *EVAL_FAST, *extra]


def the_run_dir(root: Path) -> Path:
    (run_dir,) = [p.parent for p in root.rglob("run.json")]
    return run_dir


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def brute_pass_at_k(flags, k):
    subsets = list(combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("completion, expected", [
    (" 3 + 4 = 7. #### 7", "7"), (" #### 1,000", "1000"), ("####-12", "-12"), ("#### 007", "7"), ("#### 7.", "7"),
    ("#### 7.5", None), ("#### 5 #### 6", "5"), ("the answer is 7", None), ("#### seven", None), ("", None),
])
def test_answer_extraction_through_the_task(completion, expected):
    from dataclasses import replace

    from ntp_rl.tasks import is_correct

    task = build_task(TaskConfig())
    assert task.extract_answer(completion) == expected
    problem = task.problems("test", 1)[0]
    # The completion is right exactly for the problem whose answer it gives.
    for answer in ("7", "1000", "-12", "5"):
        assert is_correct(task, completion, replace(problem, answer=answer)) == (expected == answer), answer


def test_a_model_that_always_gives_one_answer_scores_exactly(tokenizer, tmp_path, shared_cache):
    problems = build_task(TaskConfig()).problems("test", 6)
    answer = "41"
    assert problems[0].answer == answer and sum(p.answer == answer for p in problems) == 1
    model_dir = answering_model(tmp_path / "model", tokenizer, answer)
    record = evaluate(setup(tmp_path, shared_cache, model_dir, "eval.keep_samples=true"))

    expected = 1 / 6
    summary = record["summary"]
    for key in ("avg@4", "cons@4", "pass@1", "pass@2", "pass@4"):
        assert summary[key] == pytest.approx(expected), key
    assert summary["mean_length"] == 5 and summary["max_length"] == 5 and summary["truncated_frac"] == 0  # 4 tokens + EOS

    run_dir = the_run_dir(tmp_path / "outputs")
    rows = read_csv(run_dir / "problems.csv")
    assert [r["id"] for r in rows] == [p.id for p in problems]
    assert [r["majority"] for r in rows] == [answer] * 6
    assert [r["correct"] for r in rows] == ["4"] + ["0"] * 5 and rows[0]["pass@2"] == "1.0"
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples[1]["samples"] == [f" #### {answer}"] * 4 and samples[1]["prompt"] == problems[1].prompt

    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["stage"] == "eval" and info["checkpoint"] == str(model_dir)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["model"] == str(model_dir) and results["summary"] == summary and results["diagnostics"]["tokens"] > 0
    for png in ("passk.png", "entropy.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    (row,) = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]
    assert row["eval/avg@4"] == pytest.approx(expected) and "val/nll" in row and "val/forking_share" in row
    assert not (run_dir / "checkpoints").exists()


class FixedCompletions:
    """Stands in for HFGenerator: the completions each problem gets are written in the test."""

    texts: dict[str, list[str]] = {}  # prompt -> completions

    def __init__(self, model, tokenizer, stop_strings=(), batch_size=64):
        pass

    def generate(self, prompts, n, sampling, seed):
        from ntp_rl.generation import Completion

        return [[Completion(prompt_index=i, text=t, token_ids=list(range(len(t))), truncated=False)
                 for t in self.texts[p][:n]] for i, p in enumerate(prompts)]


def test_known_completions_give_exact_metrics_and_deterministic_tie_breaks(tokenizer, tmp_path, shared_cache, monkeypatch):
    from ntp_rl import engines

    problems = build_task(TaskConfig()).problems("test", 4)
    right = [f" #### {p.answer}" for p in problems]
    wrong = [f" #### {int(p.answer) + 1}" for p in problems]
    FixedCompletions.texts = {
        problems[0].prompt: [wrong[0], right[0], right[0], wrong[0]],  # 2-2 tie: the first seen (wrong) wins
        problems[1].prompt: [right[1], wrong[1], wrong[1], right[1]],  # 2-2 tie: the first seen (right) wins
        problems[2].prompt: ["no idea", "still none", wrong[2], right[2]],  # 1-1 among answers; no answer never votes
        problems[3].prompt: ["", "", "", ""],
    }
    monkeypatch.setattr(engines, "HFGenerator", FixedCompletions)  # what generator=hf makes
    model_dir = answering_model(tmp_path / "model", tokenizer, "41")
    record = evaluate(setup(tmp_path, shared_cache, model_dir, "eval.num_problems=4", "diagnostics.enabled=false"))

    flags = [[t == right[i] for t in FixedCompletions.texts[p.prompt]] for i, p in enumerate(problems)]
    rows = read_csv(the_run_dir(tmp_path / "outputs") / "problems.csv")
    assert [r["majority"] for r in rows] == [wrong[0].split()[-1], problems[1].answer, wrong[2].split()[-1], ""]
    assert [r["majority_correct"] for r in rows] == ["False", "True", "False", "False"]
    assert [int(r["correct"]) for r in rows] == [sum(f) for f in flags]
    for k in (1, 2, 4):
        per_problem = [brute_pass_at_k(f, k) for f in flags]
        assert [float(r[f"pass@{k}"]) for r in rows] == pytest.approx(per_problem, abs=1e-12), k
        assert record["summary"][f"pass@{k}"] == pytest.approx(sum(per_problem) / 4, abs=1e-12), k
    assert record["summary"]["avg@4"] == pytest.approx(sum(map(sum, flags)) / 16)
    assert record["summary"]["cons@4"] == pytest.approx(1 / 4)
    assert record["diagnostics"] is None


class Recording:
    """Stands in for the engine and records its generate calls: (sequences, distinct problems, seed). Sample j
    of a problem answers right when j % 3 == 0 and wrong otherwise, and says j, so a sample lost, repeated or
    scored against another problem shows in the counts, the samples' order or the verdicts."""

    answers: dict[str, int] = {}  # prompt -> its problem's answer
    calls: list[tuple[int, int, int]] = []

    def __init__(self, *args, **kwargs):
        self.drawn: dict[str, int] = {}

    def generate(self, prompts, n, sampling, seed):
        from ntp_rl.generation import Completion

        Recording.calls.append((len(prompts) * n, len(set(prompts)), seed))
        out = []
        for i, prompt in enumerate(prompts):
            out.append([])
            for _ in range(n):
                j = self.drawn[prompt] = self.drawn.get(prompt, -1) + 1
                answer = self.answers[prompt] + (j % 3 != 0)
                out[-1].append(Completion(i, f" sample {j} #### {answer}", list(range(1 + j % 4)), truncated=j == 1))
        return out


@pytest.mark.parametrize("generator, n, batch_size, problems, sequences, per_call", [
    ("hf", 128, 256, 5, [256, 256, 128], [2, 2, 1]),  # whole problems, as many as fit
    ("hf", 8, 48, 8, [48, 16], [6, 2]),
    ("hf", 5, 4, 3, [4, 4, 4, 3], [1, 2, 2, 1]),  # n > batch_size: a problem's samples span calls
    ("vllm", 8, 4, 5, [40], [5]),  # every problem in one call: the engine batches
])
def test_generate_calls_are_filled_by_samples_and_each_problem_gets_its_own_n(
        generator, n, batch_size, problems, sequences, per_call, tokenizer, tmp_path, shared_cache, monkeypatch):
    from ntp_rl import engines, vllm_engine

    tasks = build_task(TaskConfig()).problems("test", problems)
    assert len({p.answer for p in tasks}) == problems, "different answers: a sample scored against another problem fails"
    Recording.answers, Recording.calls = {p.prompt: int(p.answer) for p in tasks}, []
    monkeypatch.setattr(engines, "HFGenerator", Recording)
    monkeypatch.setattr(vllm_engine, "VLLMGenerator", Recording)
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    model_dir = answering_model(tmp_path / "model", tokenizer, "41")
    record = evaluate(setup(tmp_path, shared_cache, model_dir, f"generator={generator}", f"eval.n={n}", "eval.ks=[1,4]",
                            f"sampling.batch_size={batch_size}", f"eval.num_problems={problems}", "eval.keep_samples=true",
                            "diagnostics.enabled=false"))

    assert [c[0] for c in Recording.calls] == sequences and [c[1] for c in Recording.calls] == per_call
    assert len({c[2] for c in Recording.calls}) == len(sequences), "a seed of its own for each call"
    run_dir = the_run_dir(tmp_path / "outputs")
    kept = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    for problem, row in zip(tasks, kept):
        assert row["samples"] == [f" sample {j} #### {int(problem.answer) + (j % 3 != 0)}" for j in range(n)]
    right = len(range(0, n, 3))
    rows = read_csv(run_dir / "problems.csv")
    assert [(r["id"], int(r["n"]), int(r["correct"]), int(r["truncated"])) for r in rows] == \
        [(p.id, n, right, 1) for p in tasks]
    assert record["summary"][f"avg@{n}"] == pytest.approx(right / n)
    assert record["summary"]["mean_length"] == pytest.approx(sum(1 + j % 4 for j in range(n)) / n)


def test_samples_spanning_calls_are_reproducible_from_the_seed(tokenizer, tmp_path, shared_cache):
    model_dir = guessing_model(tmp_path / "model", tokenizer)
    common = ["eval.n=6", "sampling.batch_size=4", "eval.num_problems=3", "eval.keep_samples=true",
              "diagnostics.enabled=false"]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        record = evaluate(setup(tmp_path / name, shared_cache, model_dir, *common, f"seed={seed}"))
        samples = (the_run_dir(tmp_path / name / "outputs") / "samples.jsonl").read_text()
        runs[name] = record["summary"], [json.loads(line)["samples"] for line in samples.splitlines()]
    assert runs["a"] == runs["b"]
    assert all(len(samples) == 6 for samples in runs["a"][1])
    assert runs["c"][1] != runs["a"][1], "another seed, other samples"


def test_a_uniform_model_has_known_diagnostics(tokenizer, tmp_path, shared_cache):
    model_dir = save_model(tmp_path / "model", tokenizer, {})  # every logit 0
    record = evaluate(setup(tmp_path, shared_cache, model_dir, "eval.num_problems=1", "eval.n=1", "eval.ks=[1]",
                            "diagnostics.forking_threshold=1.0"))
    d, vocab = record["diagnostics"], len(tokenizer)
    assert d["tokens"] == 6 * 32
    assert d["nll"] == pytest.approx(math.log(vocab), rel=1e-5) and d["ppl"] == pytest.approx(vocab, rel=1e-4)
    assert d["entropy"] == pytest.approx(math.log(vocab), rel=1e-5) and d["forking_share"] == 1.0
    assert d["topk_mass"] == pytest.approx(5 / vocab, rel=1e-4) and d["target_rank_median"] == 1


def test_diagnostics_on_a_datasets_text_source(tokenizer, tmp_path, shared_cache):
    from ntp_rl.data.corpus import sample_documents

    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in sample_documents("test", 1, 3, 60)))
    model_dir = save_model(tmp_path / "model", tokenizer, {})
    record = evaluate(setup(tmp_path, shared_cache, model_dir, "eval.num_problems=1", "eval.n=1", "eval.ks=[1]",
                            "data=hf", f"data.path={corpus}", "data.text_field=body", "data.val_docs=30",
                            "data.seq_len=32", "diagnostics.num_sequences=3"))
    d = record["diagnostics"]
    assert str(corpus) in d["text"] and d["tokens"] == 3 * 32
    assert d["nll"] == pytest.approx(math.log(len(tokenizer)), rel=1e-5)


def test_wandb_gets_summary_table_and_figures(tokenizer, tmp_path, shared_cache, monkeypatch):
    from accelerate import Accelerator

    logged, init = {}, {}

    class FakeRun:
        summary: dict = {}

        def log(self, payload, step=None):
            logged.update(payload)

    monkeypatch.setattr(Accelerator, "init_trackers",
                        lambda self, project, config=None, init_kwargs=None: init.update(init_kwargs["wandb"]))
    monkeypatch.setattr(Accelerator, "get_tracker", lambda self, name, unwrap=False: FakeRun())
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None: logged.update(values))
    monkeypatch.setattr(Accelerator, "end_training", lambda self: None)
    model_dir = answering_model(tmp_path / "model", tokenizer, "41")
    evaluate(setup(tmp_path, shared_cache, model_dir, "logger.wandb.mode=offline"))

    import wandb

    assert init["job_type"] == "eval" and init["name"].startswith(f"eval-model={model_dir.name},")
    assert FakeRun.summary["eval/pass@4"] == pytest.approx(1 / 6) and "val/entropy" in FakeRun.summary
    table = logged["eval/per_problem"]
    assert isinstance(table, wandb.Table) and len(table.data) == 6 and "pass@4" in table.columns
    assert isinstance(logged["eval/pass_at_k"], wandb.Image) and isinstance(logged["val/entropy_histogram"], wandb.Image)


# ---------------------------------------------------------------------------
# Bad input: one line naming the key, exit 2, no run directory


@pytest.mark.parametrize("args, names", [
    ([], ["model.name_or_path", "required"]),
    (["model=/some/run", "eval.ks=[1,32]"], ["eval.ks", "eval.n=16"]),
    (["model=/some/run", "eval.n=4"], ["eval.ks", "8"]),
    (["model=/some/run", "eval.num_problems=0"], ["eval.num_problems"]),
    (["model=/some/run", "sampling.top_p=0"], ["sampling.top_p"]),
    (["model=/some/run", "eval.split=train2"], ["eval.split", "train, validation, test"]),
    (["model=/some/run", "task=gsm8k", "eval.split=validation"], ["eval.split=validation", "train, test"]),
    (["model=/some/run", "diagnostics.forking_threshold=-1"], ["diagnostics.forking_threshold"]),
    (["model=/some/run", "resume=auto"], ["resume"]),
    (["model=/some/run", "eval=quick"], ["eval=quick", "paper"]),
])
def test_bad_config_fails_with_one_line_naming_the_key(args, names):
    from ntp_rl.cli import check_command_line, expand_model_paths

    with pytest.raises(UserError) as exc:
        check_command_line("eval", expand_model_paths(args))
    message = str(exc.value)
    assert "\n" not in message
    for name in names:
        assert name in message


def test_the_embedded_tasks_validation_split_is_an_eval_split():
    """What rl.eval_split=validation tunes on, eval can measure too (a checkpoint picked without the test split)."""
    from ntp_rl.cli import check_command_line, expand_model_paths

    check_command_line("eval", expand_model_paths(["model=/some/run", "eval.split=validation"]))


def test_missing_model_dir_from_the_shell_exits_2_with_one_line(tmp_path):
    result = run_cli("eval", f"model={tmp_path / 'no_such_run'}", f"out_dir={tmp_path / 'outputs'}")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"ntp-rl: error: model.name_or_path={tmp_path / 'no_such_run'}")
    assert not (tmp_path / "outputs").exists(), "a refused run must leave nothing behind"


def test_a_directory_without_a_model_is_refused(tmp_path, shared_cache):
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(DataError, match="model.name_or_path=.*no model there"):
        evaluate(setup(tmp_path, shared_cache, tmp_path / "empty_run"))
    assert not (tmp_path / "outputs").exists()


def test_an_empty_task_is_refused_before_a_run_dir_exists(tokenizer, tmp_path, shared_cache, monkeypatch):
    from ntp_rl import tasks
    from ntp_rl.tasks.embedded import EmbeddedTask

    class NoProblems(EmbeddedTask):
        def problems(self, split, n):
            return []

    monkeypatch.setitem(tasks.KINDS, "no_problems", lambda cfg: NoProblems(difficulty=2, seed=0, name="no_problems"))
    model_dir = answering_model(tmp_path / "model", tokenizer, "41")
    with pytest.raises(DataError, match="task=empty: the test split has no problems"):
        evaluate(setup(tmp_path, shared_cache, model_dir, "task.kind=no_problems", "task.name=empty"))
    assert not (tmp_path / "outputs").exists()
    with pytest.raises(ConfigError, match="task.kind=nope: unknown task kind"):
        evaluate(setup(tmp_path, shared_cache, model_dir, "task.kind=nope"))


def test_a_run_that_fails_midway_is_marked_failed(tokenizer, tmp_path, shared_cache, monkeypatch):
    from ntp_rl.diagnostics import TextDiagnostics

    def broken(self, logits, targets, chunk_size=1024):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(TextDiagnostics, "add", broken)
    model_dir = answering_model(tmp_path / "model", tokenizer, "41")
    with pytest.raises(RuntimeError):
        evaluate(setup(tmp_path, shared_cache, model_dir))
    run_dir = the_run_dir(tmp_path / "outputs")
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "out of memory" in info["error"]
    assert not (run_dir / "results.json").exists()


def test_the_paper_preset():
    cfg = compose("eval", ["model.name_or_path=/x", "eval=paper"])
    assert cfg.eval.n == 128 and 64 in cfg.eval.ks and max(cfg.eval.ks) <= 128
    assert (cfg.sampling.temperature, cfg.sampling.top_p) == (0.7, 0.95)


# ---------------------------------------------------------------------------
# Several processes


@pytest.mark.parametrize("launch", ["ddp", pytest.param("fsdp2", marks=pytest.mark.slow)])
def test_two_processes_gather_to_the_one_process_result(launch, tokenizer, tmp_path, shared_cache):
    model_dir = guessing_model(tmp_path / "model", tokenizer)
    # 5 problems x 4 samples in calls of 6: problems 1 and 3 span calls sampled by different processes.
    common = ["eval.num_problems=5", "sampling.batch_size=6", "eval.keep_samples=true", "diagnostics.num_sequences=5"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs
    try:
        one = evaluate(setup(tmp_path / "one", shared_cache, model_dir, *common))
    finally:
        torch.set_num_threads(threads)
    # fsdp2: the model sharded (only the first process reads it), its weights gathered to sample and measure.
    ddp = [*TWO_CPU_PROCESSES, "-m", "ntp_rl"]
    cmd = [*(ddp if launch == "ddp" else fsdp_launch(tmp_path)), "eval", *setup(tmp_path / "two", shared_cache, model_dir, *common)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().splitlines()[-1].lstrip().startswith("target rank"), "the console ends with the table"

    assert len(list((tmp_path / "two").rglob("run.json"))) == 1, "rank 1 must not create a run directory of its own"
    a, b = the_run_dir(tmp_path / "one" / "outputs"), the_run_dir(tmp_path / "two" / "outputs")
    two = json.loads((b / "results.json").read_text())
    assert two["num_processes"] == 2 and json.loads((b / "run.json").read_text())["world_size"] == 2
    assert json.loads((b / "run.json").read_text())["environment"]["distributed"]["kind"] == launch
    assert (a / "samples.jsonl").read_text() == (b / "samples.jsonl").read_text()
    assert (a / "problems.csv").read_text() == (b / "problems.csv").read_text()
    assert len({s for row in map(json.loads, (a / "samples.jsonl").read_text().splitlines()) for s in row["samples"]}) > 1
    assert two["summary"] == one["summary"]
    da, db = one["diagnostics"], two["diagnostics"]
    assert da["tokens"] == db["tokens"] == 5 * 32 and da["entropy_histogram"] == db["entropy_histogram"]
    for key in ("nll", "entropy", "topk_mass", "forking_share", "target_rank_mean"):
        assert db[key] == pytest.approx(da[key], rel=1e-6), key
