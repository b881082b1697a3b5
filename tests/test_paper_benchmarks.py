r"""The paper's six benchmarks (task=aime24|aime25|amc23|math500|minerva|olympiadbench), end to end through
`ntp-rl eval` on a few local rows written here in each dataset's real format.

The model is a real transformers Qwen3 whose next token depends on the current token alone (tests/test_eval.py's
save_model): after the prompt's last token it writes one fixed completion and EOS. Each benchmark gets two rows,
one whose gold answer that completion gives and one whose it does not, so every number of the run is known.
"""

import csv
import json
from functools import lru_cache
from pathlib import Path

import pytest

from ntp_rl.config.compose import compose
from test_eval import save_model

# preset -> (the file its split reads, the local rows in the hub dataset's fields and types, the completion)
BENCHMARKS = {
    "aime24": ("train.jsonl", [{"problem": "Find n.", "answer": "204"}, {"problem": "Find m.", "answer": "33"}],
               r" \boxed{204}"),
    "aime25": ("train.jsonl", [{"problem": "Find n.", "answer": "037"}, {"problem": "Find m.", "answer": "204"}],
               r" \boxed{37}"),
    "amc23": ("test.jsonl", [{"question": "How many?", "answer": 27.0}, {"question": "How few?", "answer": 3.0}],
              r" \boxed{27}"),
    "math500": ("test.jsonl", [{"problem": "Solve it.", "answer": "[-2,7]"}, {"problem": "Solve that.", "answer": "(-2,7)"}],
                r" \boxed{[-2,7]}"),
    "minerva": ("test.jsonl", [{"question": "Find c.", "answer": "5.8e-3"}, {"question": "Find d.", "answer": "5.8e-2"}],
                r" \boxed{5.8e-3}"),
    "olympiadbench": ("train.jsonl", [{"question": "Find S.", "final_answer": ["$(0,1]$"]},
                                      {"question": "Find T.", "final_answer": ["$(0,1)$"]}],
                      r" \boxed{(0,1]}"),
}
GOLDS = {"aime24": ["204", "33"], "aime25": ["037", "204"], "amc23": ["27.0", "3.0"], "math500": ["[-2,7]", "(-2,7)"],
         "minerva": ["5.8e-3", "5.8e-2"], "olympiadbench": ["(0,1]", "(0,1)"]}


def write_benchmark(root: Path, preset: str) -> Path:
    filename, rows, _ = BENCHMARKS[preset]
    (root / preset).mkdir(parents=True, exist_ok=True)
    (root / preset / filename).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root / preset


@lru_cache(maxsize=None)
def prompt_texts(preset: str) -> tuple[str, ...]:
    cfg = compose("eval", ["model=hf", "model.name_or_path=x", f"task={preset}"])
    return tuple(cfg.task.prompt_template.replace("{question}", str(row.get("problem", row.get("question"))))
                 for row in BENCHMARKS[preset][1])


@pytest.fixture(scope="module")
def tokenizer():
    from ntp_rl.data.tokenizer import train_embedded_tokenizer

    texts = [text for preset in BENCHMARKS for text in prompt_texts(preset)]
    texts += [completion for _, _, completion in BENCHMARKS.values()]
    return train_embedded_tokenizer(texts * 4, 256)


def writing_model(path: Path, tokenizer, completion: str) -> Path:
    """After the prompt's last token (every preset's prompt ends "Solution:"), writes `completion` and EOS."""
    ends = {tokenizer(p, add_special_tokens=False).input_ids[-1] for preset in BENCHMARKS for p in prompt_texts(preset)}
    assert len(ends) == 1
    chain = [ends.pop(), *tokenizer(completion, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain), f"{completion!r}: a token-by-token chain needs distinct tokens"
    assert tokenizer.decode(chain[1:-1]) == completion
    return save_model(path, tokenizer, {a: [b] for a, b in zip(chain, chain[1:])})


def eval_overrides(tmp_path, model_dir, *extra):
    return [f"model.name_or_path={model_dir}", f"out_dir={tmp_path / 'outputs'}", "logger.wandb.mode=disabled",
            "logger.progress_bar=false", "diagnostics.enabled=false", "eval.n=2", "eval.ks=[1,2]",
            "sampling.max_new_tokens=16", "eval.keep_samples=true", "task.score_workers=1", *extra]


@pytest.mark.parametrize("preset", list(BENCHMARKS))
def test_every_preset_runs_end_to_end_on_local_rows(preset, tokenizer, tmp_path):
    from ntp_rl.stages import run_stage

    data = write_benchmark(tmp_path / "data", preset)
    model_dir = writing_model(tmp_path / "model", tokenizer, BENCHMARKS[preset][2])
    overrides = eval_overrides(tmp_path, model_dir, f"task={preset}", f"task.path={data}", "task.subset=null")
    record = run_stage("eval", compose("eval", overrides), overrides=overrides)
    summary = record["summary"]
    assert (summary["problems"], summary["avg@2"], summary["cons@2"], summary["pass@2"]) == (2, 0.5, 0.5, 0.5)
    assert summary["scoring_timeouts"] == 0
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("results.json")]
    with open(run_dir / "problems.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["answer"] for r in rows] == GOLDS[preset]
    assert [int(r["correct"]) for r in rows] == [2, 0]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["samples"] == [BENCHMARKS[preset][2]] * 2
    assert samples[0]["prompt"].endswith("within \\boxed{}.\nSolution:")


# ---------------------------------------------------------------------------
# eval=paper_suite: the six in one run, a row each and their mean

# The model always answers \boxed{204}; each benchmark's rows (its real format) hold 204 as gold this many times
# out of its rows, so each benchmark's Avg@n is known: 1/2, 0/1, 2/2, 1/3, 1/2, 1/2.
SUITE_ROWS = {
    "aime24": ("train.jsonl", [{"problem": "Find n.", "answer": "204"}, {"problem": "Find m.", "answer": "33"}]),
    "aime25": ("train.jsonl", [{"problem": "Find n.", "answer": "37"}]),
    "amc23": ("test.jsonl", [{"question": "How many?", "answer": 204.0}, {"question": "Or?", "answer": 204.0}]),
    "math500": ("test.jsonl", [{"problem": "A?", "answer": "204"}, {"problem": "B?", "answer": "\\frac{1}{2}"},
                               {"problem": "C?", "answer": "[-2,7]"}]),
    "minerva": ("test.jsonl", [{"question": "Find c.", "answer": "2.04e2"}, {"question": "Find d.", "answer": "5.8e-3"}]),
    "olympiadbench": ("train.jsonl", [{"question": "Find S.", "final_answer": ["$204$"]},
                                      {"question": "Find T.", "final_answer": ["$(0,1]$"]}]),
}
SUITE_AVG = {"aime24": 1 / 2, "aime25": 0.0, "amc23": 1.0, "math500": 1 / 3, "minerva": 1 / 2, "olympiadbench": 1 / 2}


def test_the_paper_suite_preset_and_what_cfg_job_shows():
    from conftest import run_cli

    cfg = compose("eval", ["model=hf", "model.name_or_path=x", "eval=paper_suite"])
    assert list(cfg.eval.benchmarks) == ["aime24", "aime25", "amc23", "math500", "minerva", "olympiadbench"]
    assert (cfg.eval.n, list(cfg.eval.ks), cfg.sampling.temperature, cfg.sampling.top_p) == \
        (128, [1, 2, 4, 8, 16, 32, 64], 0.7, 0.95)
    shown = run_cli("eval", "model=Qwen/Qwen3-0.6B", "eval=paper_suite", "eval.n=8", "eval.ks=[1,8]",
                    "eval.benchmarks=[math500,amc23]", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert "'n': 8" in shown.stdout and "- math500\n" in shown.stdout and "- amc23\n" in shown.stdout
    bad = run_cli("eval", "model=Qwen/Qwen3-0.6B", "eval=paper_suite", "eval.benchmarks=[math500,aime]")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "ntp-rl: error: eval.benchmarks=['math500', 'aime']: aime is no task preset; choose from: aime24, aime25")


def test_the_suite_runs_every_benchmark_into_one_table_one_record_and_one_wandb_run(tokenizer, tmp_path, monkeypatch):
    from accelerate import Accelerator

    from ntp_rl.stages import run_stage
    from ntp_rl.stages.compare import compare

    logged = {}

    class FakeRun:
        summary: dict = {}

        def log(self, payload, step=None):
            logged.update(payload)

    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, project, config=None, init_kwargs=None: None)
    monkeypatch.setattr(Accelerator, "get_tracker", lambda self, name, unwrap=False: FakeRun())
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None: logged.update(values))
    monkeypatch.setattr(Accelerator, "end_training", lambda self: None)
    for name, (filename, rows) in SUITE_ROWS.items():
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / filename).write_text("".join(json.dumps(row) + "\n" for row in rows))
    model_dir = writing_model(tmp_path / "model", tokenizer, r" \boxed{204}")
    overrides = [*eval_overrides(tmp_path, model_dir, "eval=paper_suite", f"eval.benchmarks_dir={tmp_path / 'data'}",
                                 "logger.wandb.mode=offline"), "eval.n=2", "eval.ks=[1,2]", "eval.keep_samples=false"]
    record = run_stage("eval", compose("eval", overrides), overrides=overrides)

    assert list(record["benchmarks"]) == list(SUITE_AVG)
    for name, avg in SUITE_AVG.items():
        assert record["benchmarks"][name]["avg@2"] == pytest.approx(avg), name
        assert record["benchmarks"][name]["problems"] == len(SUITE_ROWS[name][1])
    mean = sum(SUITE_AVG.values()) / 6  # each benchmark weighs the same, whatever its size
    assert record["summary"]["avg@2"] == pytest.approx(mean) and record["summary"]["problems"] == 12
    assert record["task"]["olympiadbench"]["path"] == str(tmp_path / "data" / "olympiadbench")
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("results.json")]
    assert json.loads((run_dir / "results.json").read_text())["benchmarks"] == record["benchmarks"]
    with open(run_dir / "benchmarks.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["benchmark"] for row in table] == [*SUITE_AVG, "mean"]
    assert float(table[-1]["avg@2"]) == pytest.approx(mean) and float(table[2]["pass@2"]) == 1.0
    for name in SUITE_AVG:
        assert (run_dir / name / "problems.csv").exists()
    # One W&B run: a summary per benchmark, the mean under the plain names, and the table.
    assert FakeRun.summary["eval/amc23/avg@2"] == 1.0 and FakeRun.summary["eval/avg@2"] == pytest.approx(mean)
    assert len(logged["eval/benchmarks"].data) == 7 and "eval/math500/per_problem" in logged

    # compare reads the suite: the mean and every benchmark's scores
    rows = compare([str(run_dir)], str(tmp_path / "compare"))["rows"]
    assert rows[0]["eval avg@2"] == pytest.approx(mean) and rows[0]["eval math500 avg@2"] == pytest.approx(1 / 3)
