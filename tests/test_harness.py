"""`ntp-rl eval harness.tasks=[...]`: lm-evaluation-harness on a checkpoint, offline, on a task YAML of
our own over local files, with a model whose choice is known (tests/test_eval.py's save_model): after
the question it continues with " yes" and nothing else, so the harness's accuracy is known exactly."""

import json

import pytest

from ntp_rl.config.compose import compose
from test_eval import save_model

pytestmark = pytest.mark.harness

ROWS = [  # the model answers "yes": right on 3 of 4
    {"question": "Is two even?", "choices": ["yes", "no"], "label": 0},
    {"question": "Is four even?", "choices": ["no", "yes"], "label": 1},
    {"question": "Is six even?", "choices": ["yes", "no"], "label": 0},
    {"question": "Is nine even?", "choices": ["yes", "no"], "label": 1},
]


def write_task(root):
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_yes.yaml").write_text(
        "task: tiny_yes\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'rows.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    return root / "tasks"


def yes_model(path, texts):
    from ntp_rl.data.tokenizer import train_embedded_tokenizer

    tokenizer = train_embedded_tokenizer([*texts, " yes", " no"] * 4, 96)
    ids = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    ends = {ids(r["question"])[-1] for r in ROWS}
    assert len(ends) == 1
    context = ROWS[0]["question"]
    yes = ids(context + " yes")[len(ids(context)):]  # the continuation as the harness cuts it
    chain = [ends.pop(), *yes]
    assert len(set(chain)) == len(chain)
    return save_model(path, tokenizer, {a: [b] for a, b in zip(chain, chain[1:])})


def test_the_harness_runs_a_local_task_on_the_checkpoint_offline(tmp_path, monkeypatch):
    from accelerate import Accelerator

    from ntp_rl.stages import run_stage

    class FakeRun:
        summary: dict = {}

        def log(self, payload, step=None):
            pass

    monkeypatch.setattr(Accelerator, "init_trackers", lambda self, project, config=None, init_kwargs=None: None)
    monkeypatch.setattr(Accelerator, "get_tracker", lambda self, name, unwrap=False: FakeRun())
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None: None)
    monkeypatch.setattr(Accelerator, "end_training", lambda self: None)
    tasks = write_task(tmp_path)
    model_dir = yes_model(tmp_path / "model", [r["question"] for r in ROWS])
    overrides = [f"model.name_or_path={model_dir}", f"out_dir={tmp_path / 'outputs'}", "logger.wandb.mode=offline",
                 "logger.progress_bar=false", "harness.tasks=[tiny_yes]", f"harness.include_path={tasks}",
                 "harness.batch_size=2"]
    record = run_stage("eval", compose("eval", overrides), overrides=overrides)
    assert record["harness"]["tiny_yes"]["acc"] == pytest.approx(0.75)
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").rglob("results.json")]
    written = json.loads((run_dir / "harness.json").read_text())
    assert written["results"]["tiny_yes"]["acc,none"] == pytest.approx(0.75)
    assert json.loads((run_dir / "results.json").read_text())["harness"] == record["harness"]
    assert FakeRun.summary["harness/tiny_yes/acc"] == pytest.approx(0.75)


def test_harness_mistakes_cost_one_line(tmp_path, monkeypatch):
    import importlib.util

    from conftest import run_cli
    from ntp_rl.config.validate import validate_eval
    from ntp_rl.errors import UserError

    result = run_cli("eval", "model=Qwen/Qwen3-0.6B", "harness.tasks=[tiny_yes]", "harness.include_path=/no/such/dir")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "ntp-rl: error: harness.include_path=/no/such/dir: no such directory"
    cfg = compose("eval", ["model=hf", "model.name_or_path=x", "harness.tasks=[hellaswag]"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UserError, match=r'^harness.tasks needs lm-evaluation-harness, an optional extra: '
                                        r'pip install -e "\.\[harness\]"$'):
        validate_eval(cfg)
