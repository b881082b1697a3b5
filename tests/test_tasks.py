"""Tasks: rewards for right, wrong and malformed answers of every kind, offline, and their one-line errors."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import REPO
from ntp_rl.config.schema import TaskConfig
from ntp_rl.errors import ConfigError, DataError
from ntp_rl.tasks import build_task, is_correct, reward


def task_config(preset: str = "embedded", **keys):
    """What `task=<preset>` gives a stage's config, with some keys changed."""
    cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(REPO / "conf" / "task" / f"{preset}.yaml"))
    for key, value in keys.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def assert_scores(task, problem, right, wrong, malformed):
    for completion, expected in ((right, 1.0), (wrong, 0.0), (malformed, 0.0)):
        assert reward(task, completion, problem) == expected, completion
        assert is_correct(task, completion, problem) is bool(expected)
    assert task.extract_answer(malformed) is None
    # The format bonus goes to any answer that can be read, right or wrong.
    assert reward(task, right, problem, 0.1) == pytest.approx(1.1)
    assert reward(task, wrong, problem, 0.1) == pytest.approx(0.1)
    assert reward(task, malformed, problem, 0.1) == 0.0


def test_embedded_rewards():
    task = build_task(task_config())
    problem = task.problems("train", 1)[0]
    wrong = str(int(problem.answer) + 1)
    assert_scores(task, problem, f" 1 + 2 = 3. #### {problem.answer}", f" #### {wrong}", " I do not know")
    assert problem.prompt.startswith("Question: ") and problem.prompt.endswith("\nAnswer:")


def test_the_embedded_validation_split_shares_no_problem_with_train_or_test():
    # What RL is tuned on (rl.eval_split=validation) must be neither trained on nor the reported test.
    task = build_task(task_config())
    questions = {split: {p.meta["question"] for p in task.problems(split, 600)} for split in ("train", "validation", "test")}
    assert len(questions["validation"]) > 500
    assert not questions["validation"] & questions["train"] and not questions["validation"] & questions["test"]
    assert not questions["train"] & questions["test"]


def test_embedded_prompt_template():
    task = build_task(task_config(prompt_template="Q: {question}\nA:"))
    problem = task.problems("test", 1)[0]
    assert problem.prompt == f"Q: {problem.meta['question']}\nA:"


# ---------------------------------------------------------------------------
# reasoning-gym


@pytest.mark.parametrize("name", ["chain_sum", "basic_arithmetic", "gsm_symbolic", "countdown"])
def test_reasoning_gym_presets_generate_offline_and_score(name):
    task = build_task(task_config(name))
    train, test = task.problems("train", 4), task.problems("test", 4)
    assert [p.prompt for p in train] == [p.prompt for p in task.problems("train", 4)], "same seed, same problems"
    assert [p.prompt for p in train] != [p.prompt for p in test], "the splits use different seeds"
    problem = train[0]
    assert "<answer>" in problem.prompt and problem.prompt.endswith("Answer:")
    assert_scores(task, problem, f" thinking... <answer>{problem.answer}</answer>", " <answer>-123456789</answer>",
                  f" the answer is {problem.answer}")
    assert task.extract_answer(" <answer></answer>") is None


def test_reasoning_gym_dataset_kwargs_reach_the_generator():
    task = build_task(task_config(kind="reasoning_gym", dataset="chain_sum",
                                  dataset_kwargs={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}))
    for problem in task.problems("train", 20):
        terms = problem.meta["entry"]["metadata"]["num_terms"]
        assert terms == 2 and abs(int(problem.answer)) <= 18


def test_reasoning_gym_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"task.dataset=nope: unknown reasoning-gym dataset; choose one of: .*chain_sum"):
        build_task(task_config(kind="reasoning_gym", dataset="nope"))
    with pytest.raises(ConfigError, match=r"^task.dataset: is required"):
        build_task(task_config(kind="reasoning_gym"))
    with pytest.raises(ConfigError, match=r"task.dataset_kwargs=.*bogus"):
        build_task(task_config(kind="reasoning_gym", dataset="chain_sum", dataset_kwargs={"bogus": 1}))


# ---------------------------------------------------------------------------
# GSM8K / MATH-style data scored with math-verify


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def gsm8k_dir(tmp_path):
    rows = [{"question": "Ann has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "What is 1000 + 234?", "answer": "1000 + 234 = 1234\n#### 1,234"}]
    write_jsonl(tmp_path / "gsm" / "train.jsonl", rows)
    write_jsonl(tmp_path / "gsm" / "test.jsonl", rows[::-1])
    return tmp_path / "gsm"


@pytest.fixture
def math_dir(tmp_path):
    rows = [{"problem": "What is half of 1?", "solution": "Half of 1 is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "Solve $x + 1 = 3$.", "solution": "Subtract 1: $x = \\boxed{2}$."},
            {"problem": "No answer here", "solution": "This row has no boxed answer."}]
    write_jsonl(tmp_path / "math" / "train.jsonl", rows)
    write_jsonl(tmp_path / "math" / "test.jsonl", rows)
    return tmp_path / "math"


def test_gsm8k_format(gsm8k_dir):
    task = build_task(task_config("gsm8k", path=str(gsm8k_dir), subset=None))
    train = task.problems("train", 10)
    assert [p.answer for p in train] == ["7", "1234"], "the text after ####, without thousands separators"
    assert [p.answer for p in task.problems("test", 10)] == ["1234", "7"]
    assert train[0].prompt == "Question: Ann has 3 apples and buys 4 more. How many?\nAnswer:"
    assert_scores(task, train[0], " 3 + 4 = 7\n#### 7", " 3 + 5 = 8\n#### 8", " I have no idea")
    assert is_correct(task, " 1000 + 234 = 1234 #### 1,234", train[1])
    assert is_correct(task, " so the answer is $\\boxed{1234}$", train[1]), "\\boxed answers are read too"
    assert not is_correct(task, " #### 7 then Question: what is 1 + 1? Answer: 1234", train[1]), "#### decides"


def test_math_format_and_equivalent_answers(math_dir):
    task = build_task(task_config("math", path=str(math_dir), subset=None))
    problems = task.problems("test", 10)
    assert [p.answer for p in problems] == ["\\frac{1}{2}", "2"], "rows without a reference answer are skipped"
    assert problems[0].prompt == "Problem: What is half of 1?\nSolution:"
    half = problems[0]
    assert_scores(task, half, " The answer is $\\boxed{\\frac{1}{2}}$.", " $\\boxed{\\frac{1}{3}}$", " no idea")
    for same in (" \\boxed{0.5}", " \\boxed{\\frac{2}{4}}", " \\boxed{1/2}", " #### 0.5"):
        assert is_correct(task, same, half), same
    assert is_correct(task, " so $x = 2$", problems[1])


def test_one_file_split_by_slices_and_plain_answers(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"q": f"What is {i} + {i}?", "a": str(2 * i)} for i in range(10)])
    task = build_task(task_config(kind="hf_math", path=str(path), question_field="q", answer_field="a",
                                  answer_format="plain", train_split="train[:80%]", test_split="train[80%:]"))
    assert len(task.problems("train", 100)) == 8
    test = task.problems("test", 100)
    assert [p.answer for p in test] == ["16", "18"]
    assert is_correct(task, " 8 + 8 = 16", test[0]) and not is_correct(task, " 17", test[0])


def test_rows_whose_answer_cannot_be_read_are_counted(tmp_path):
    path = tmp_path / "qa.jsonl"
    write_jsonl(path, [{"q": f"What is {i} + {i}?", "a": "see above" if i % 3 == 0 else f"#### {2 * i}"}
                       for i in range(10)])
    task = build_task(task_config(kind="hf_math", path=str(path), question_field="q", answer_field="a",
                                  answer_format="gsm8k", train_split="train", test_split="train"))
    assert len(task.problems("train", 100)) == 6
    assert task.unread_answers == {"train": 4}


def test_hf_math_errors_name_the_key(tmp_path, gsm8k_dir):
    with pytest.raises(DataError, match=r"^task.path=/no/such/dir: no such file or directory"):
        build_task(task_config(kind="hf_math", path="/no/such/dir"))
    with pytest.raises(DataError, match=r"^task.path=.*missing.jsonl: no such file"):
        build_task(task_config(kind="hf_math", path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match=r"^task.path: is required"):
        build_task(task_config(kind="hf_math"))
    with pytest.raises(ConfigError, match=r"^task.question_field=problem: no such column .* question, answer"):
        build_task(task_config(kind="hf_math", path=str(gsm8k_dir), question_field="problem")).problems("train", 1)
    with pytest.raises(DataError, match=r"task.test_split=validation"):
        build_task(task_config(kind="hf_math", path=str(gsm8k_dir), test_split="validation")).problems("test", 1)


# ---------------------------------------------------------------------------
# Registry


def test_a_plain_task_config_dataclass_builds_every_kind(gsm8k_dir):
    assert build_task(TaskConfig()).problems("test", 1)[0].prompt.startswith("Question: ")
    assert build_task(TaskConfig(kind="reasoning_gym", dataset="chain_sum")).problems("test", 1)
    assert build_task(TaskConfig(kind="hf_math", path=str(gsm8k_dir))).problems("test", 1)


def test_unknown_kind_lists_every_kind():
    with pytest.raises(ConfigError, match="task.kind=bogus: unknown task kind; choose one of: embedded, hf_math, reasoning_gym"):
        build_task(task_config(kind="bogus"))


def test_optional_dependencies_load_only_for_their_tasks():
    code = ("import sys\nfrom omegaconf import OmegaConf\nfrom ntp_rl.tasks import build_task\n"
            "build_task(OmegaConf.create({'kind': 'embedded', 'difficulty': 2, 'seed': 0})).problems('test', 2)\n"
            "print(*(m in sys.modules for m in ('reasoning_gym', 'math_verify', 'datasets')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_every_task_preset_fits_the_schema():
    for path in sorted((REPO / "conf" / "task").glob("*.yaml")):
        cfg = task_config(path.stem)
        assert cfg.name == path.stem and cfg.kind in ("embedded", "reasoning_gym", "hf_math")


def test_a_custom_reward_function_comes_from_an_explicit_import_path(tmp_path, monkeypatch):
    from ntp_rl.config.schema import TaskConfig
    from ntp_rl.errors import ConfigError, UserError
    from ntp_rl.tasks import build_task, reward

    (tmp_path / "my_rewards.py").write_text(
        "def length_bonus(completion, problem):\n    return 0.25 + (1.0 if problem.answer in completion else 0.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    task = build_task(TaskConfig(reward_fn="my_rewards:length_bonus"))
    problem = task.problems("train", 1)[0]
    assert reward(task, f" #### {problem.answer}", problem) == 1.25
    assert reward(task, " #### nothing", problem) == 0.25
    assert task.extract_answer(" #### 7") == "7"  # everything else is the wrapped task's
    (tmp_path / "bad_rewards.py").write_text("def text(completion, problem):\n    return 'yes'\n")
    text_reward = build_task(TaskConfig(reward_fn="bad_rewards:text"))
    with pytest.raises(UserError, match="^task.reward_fn: returned str 'yes', not a number$"):
        reward(text_reward, " #### 7", problem)
    for spec, needle in [("my_rewards", "package.module:function"), ("no_such_module:f", "cannot import"),
                         ("my_rewards:missing", "no function missing"), ("os:system; rm", "package.module")]:
        with pytest.raises(ConfigError, match="task.reward_fn") as exc:
            build_task(TaskConfig(reward_fn=spec))
        assert needle in str(exc.value)


def test_generation_stops_where_the_prompt_template_would_open_the_next_problem():
    from ntp_rl.tasks import template_stop_strings

    assert template_stop_strings("Problem: {question}\nSolution:") == ("\nProblem:",)
    assert template_stop_strings("Solve it.\nQuestion: {question}\nAnswer:") == ("\nQuestion:",)
    assert template_stop_strings("{question}") == ()
