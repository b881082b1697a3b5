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
