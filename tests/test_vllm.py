"""vLLM as the sampling engine, checked against transformers on a tiny checkpoint trained here (fp32, CPU):
the same greedy completions, the same per-token log-probs, the same accuracy within sampling noise,
reproducible samples, weight sync from the trainer, and one engine per process under `accelerate launch`."""

import builtins
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, TWO_CPU_PROCESSES
from ntp_rl.config.compose import compose
from ntp_rl.errors import ConfigError, UserError
from ntp_rl.evaluation import score_problem
from ntp_rl.generation import HFGenerator, Sampling
from ntp_rl.stages import run_stage
from ntp_rl.tasks import build_task
from rl_helpers import assert_same_steps, one_thread, pretrain_small_policy  # noqa: F401 (one_thread: a fixture, as in test_rl)

# fp32, so that the comparisons with transformers are exact to ~1e-6; a step budget of 256 tokens
# chunks the prefill of long prompts, as large batches do.
CONFIG = dict(dtype="float32", enforce_eager=True, max_model_len=256, max_num_batched_tokens=256)
TASK = ["task.difficulty=1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shared_cache) -> Path:
    """A pre-trained tiny policy that writes "#### <number>" answers; head_dim 32, the smallest vLLM's CPU attention takes."""
    out = tmp_path_factory.mktemp("vllm_policy")
    pretrain_small_policy(out, shared_cache, "model.head_dim=32")
    (path,) = (out / "run" / "checkpoints").iterdir()
    # Sampling settings such as a released checkpoint carries: the engine must ignore them all.
    generation_config = json.loads((path / "generation_config.json").read_text())
    generation_config.update(HOSTILE_SAMPLING)
    (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


HOSTILE_SAMPLING = {"do_sample": True, "temperature": 0.3, "top_k": 3, "top_p": 0.5, "repetition_penalty": 1.5}


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def model(checkpoint):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    # transformers' generate would apply them (HFGenerator passes temperature and top-p only),
    # so the reference side gets neutral settings back.
    neutral = {k: v for k, v in model.generation_config.to_dict().items() if k not in HOSTILE_SAMPLING}
    model.generation_config = GenerationConfig(**neutral)
    return model


@pytest.fixture(scope="module")
def task():
    return build_task(compose("rl", TASK).task)


@pytest.fixture(scope="module")
def engine_teardown():
    yield
    from ntp_rl.vllm_engine import shutdown_engine

    shutdown_engine()


@pytest.fixture
def engine(checkpoint, tokenizer, task, engine_teardown):
    """The process's engine on the checkpoint: started once, restarted only after a test replaced it."""
    from ntp_rl.vllm_engine import VLLMConfig, VLLMGenerator

    return VLLMGenerator(checkpoint, tokenizer, task.stop_strings, VLLMConfig(**CONFIG))


def prompts(task, n: int) -> list[str]:
    return [p.prompt for p in task.problems("test", n)]


def reference_logprobs(model, tokenizer, prompt: str, response: list[int], temperature: float = 1.0,
                       top_p: float = 1.0) -> torch.Tensor:
    """log-probs of the response's tokens under transformers, after temperature and a brute-force top-p."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response])).logits[0, len(prompt_ids) - 1:-1].double()
    logp = torch.log_softmax(logits / temperature, -1)
    if top_p < 1:  # keep the most likely tokens until their mass reaches top_p, then renormalise
        for row in logp:
            order = row.argsort(descending=True)
            mass_before = torch.cumsum(row[order].exp(), 0) - row[order].exp()
            row[order[mass_before >= top_p]] = -math.inf
            row -= torch.logsumexp(row, 0)
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0].float()


def fields(results):
    return [[(c.prompt_index, c.token_ids, c.text, c.truncated) for c in cs] for cs in results]


needs_vllm = pytest.mark.vllm  # every test but the one about vLLM missing


# ---------------------------------------------------------------------------
# The same distribution as transformers


@needs_vllm
@pytest.mark.parametrize("stops, max_new", [(None, 48), ((" = ",), 48), (("####",), 48), (("1 ", "2."), 48), (None, 6)])
def test_greedy_completions_equal_transformers(engine, model, tokenizer, task, stops, max_new):
    from ntp_rl.vllm_engine import VLLMGenerator

    stops = task.stop_strings if stops is None else stops
    vllm = VLLMGenerator(engine.engine.model_path, tokenizer, stops, engine.config)
    hf = HFGenerator(model, tokenizer, stops, batch_size=64)
    greedy = Sampling(temperature=0.0, max_new_tokens=max_new)
    ours, theirs = vllm.generate(prompts(task, 24), 2, greedy, 0), hf.generate(prompts(task, 24), 2, greedy, 0)
    assert fields(ours) == fields(theirs)  # n > 1 included, which vLLM itself refuses with greedy decoding
    texts = [cs[0].text for cs in ours]
    if stops != task.stop_strings:  # the stop strings really cut the completions
        assert all(not any(s in t for s in stops) for t in texts)
        assert sum(cs[0].truncated for cs in ours) < len(ours)
        assert any(len(tokenizer.decode(cs[0].token_ids, skip_special_tokens=True)) > len(cs[0].text) for cs in ours)
    if max_new == 6:
        assert all(cs[0].truncated and len(cs[0].token_ids) == 6 for cs in ours)


@needs_vllm
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 1.0), (1.2, 0.8)])
def test_sampled_tokens_logprobs_equal_transformers(engine, model, tokenizer, task, temperature, top_p):
    """The engine reports the log-prob of each sampled token under the distribution it sampled from."""
    batch = prompts(task, 8)
    results = engine.generate(batch, 4, Sampling(temperature=temperature, top_p=top_p, max_new_tokens=32), seed=3)
    worst, count = 0.0, 0
    for prompt, completions in zip(batch, results):
        for c in completions:
            assert len(c.logprobs) == len(c.token_ids)
            expected = reference_logprobs(model, tokenizer, prompt, c.token_ids, temperature, top_p)
            worst = max(worst, (expected - torch.tensor(c.logprobs)).abs().max().item())
            count += len(c.token_ids)
    assert count > 100
    assert worst < 1e-4


def _paired_z(a: torch.Tensor, b: torch.Tensor) -> float:
    """z statistic of the mean per-problem difference (problems are independent, samples within one are not)."""
    d = (a - b).double()
    return (d.mean() / (d.std() / math.sqrt(len(d)))).item()


@needs_vllm
def test_sampled_accuracy_and_length_agree_with_transformers(engine, model, tokenizer, task):
    # 64 problems x 16 samples each way. Under the null (the same distribution) the paired z is
    # ~N(0, 1): |z| > 4 has probability 6e-5. Mean length is the sharper statistic here: sampling
    # at temperature 0.8 instead of 1 gives z ~ 5 on it, top-p 0.9 ~ 14 (measured with these seeds).
    problems = task.problems("test", 64)
    hf = HFGenerator(model, tokenizer, task.stop_strings, batch_size=256)
    sampling = Sampling(temperature=1.0, max_new_tokens=32)
    per_engine = []
    for generator in (engine, hf):
        results = generator.generate([p.prompt for p in problems], 16, sampling, seed=1)
        scored = [score_problem(task, p, cs, [1]) for p, cs in zip(problems, results)]
        per_engine.append((torch.tensor([r.correct / r.n for r in scored]), torch.tensor([r.mean_length for r in scored])))
    (acc_v, len_v), (acc_h, len_h) = per_engine
    assert acc_v.mean() > 0 and acc_h.mean() > 0, "the policy must solve some problems for accuracy to say anything"
    assert abs(_paired_z(acc_v, acc_h)) < 4, (acc_v.mean(), acc_h.mean())
    assert abs(_paired_z(len_v, len_h)) < 4, (len_v.mean(), len_h.mean())


# ---------------------------------------------------------------------------
# Reproducibility


@needs_vllm
def test_the_same_seed_gives_the_same_samples(engine, task):
    # Prompts of ~170 tokens: longer than a KV block (128 on CPU), so that an earlier call leaves
    # cached prefixes, and than a step's token budget, so that prefills are chunked.
    short = prompts(task, 30)
    batch = ["\n\n".join(short[i:i + 5]) for i in range(0, 30, 5)]
    sampling = Sampling(temperature=1.0, max_new_tokens=24)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = engine.generate(batch, 4, sampling, seed=7)
    assert torch.equal(torch.rand(3), expected_draw), "generate must leave the caller's RNG as it was"
    engine.generate(batch[:3], 2, sampling, seed=99)  # whatever ran in between
    assert fields(engine.generate(batch, 4, sampling, seed=7)) == fields(first)
    assert fields(engine.generate(batch, 4, sampling, seed=8)) != fields(first)
    samples = [c.token_ids for cs in first for c in cs]
    assert len({tuple(s) for s in samples}) > len(samples) // 2, "n samples of a prompt must differ"


# ---------------------------------------------------------------------------
# Weight sync


@needs_vllm
def test_loaded_weights_are_the_ones_the_engine_samples_with(engine, model, tokenizer, task):
    import copy

    batch = prompts(task, 6)
    responses = [cs[0].token_ids for cs in engine.generate(batch, 1, Sampling(temperature=1.0, max_new_tokens=24), 5)]

    def trainer_logprobs(m):
        return torch.cat([reference_logprobs(m, tokenizer, p, r) for p, r in zip(batch, responses)])

    def engine_logprobs():
        return torch.tensor([x for row in engine.score(batch, responses) for x in row])

    before = engine_logprobs()
    assert (before - trainer_logprobs(model)).abs().max() < 1e-4
    perturbed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in perturbed.parameters():  # the tied embeddings / LM head included
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    try:
        engine.load_weights(perturbed.named_parameters())
        after = engine_logprobs()
        assert (after - trainer_logprobs(perturbed)).abs().max() < 1e-4
        assert (after - before).abs().max() > 0.05, "the perturbation must show"
        # The samples change too: nothing stale is cached.
        again = engine.generate(batch, 1, Sampling(temperature=0.0, max_new_tokens=24), 5)
        hf = HFGenerator(perturbed, tokenizer, task.stop_strings).generate(batch, 1, Sampling(0.0, 1.0, 24), 5)
        assert fields(again) == fields(hf)
    finally:
        engine.load_weights(model.named_parameters())
    assert torch.equal(engine_logprobs(), before), "loading the original weights restores the engine exactly"


# ---------------------------------------------------------------------------
# Errors a user can make


@pytest.mark.parametrize("failure", [ImportError("No module named 'vllm'"),
                                     RuntimeError("operator torchvision::nms does not exist")])
def test_without_a_working_vllm_the_error_is_one_line_saying_how_to_install(monkeypatch, tmp_path, failure):
    from ntp_rl.vllm_engine import VLLMGenerator

    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise failure
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(UserError) as info:
        VLLMGenerator(tmp_path, tokenizer=None)
    message = str(info.value)
    assert "\n" not in message and "pip install" in message and "vllm" in message.lower()


@needs_vllm
def test_a_head_size_the_cpu_attention_lacks_is_a_config_error(tokenizer, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ntp_rl.vllm_engine import VLLMConfig, VLLMGenerator

    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=32, eos_token_id=tokenizer.eos_token_id)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.head_dim=16"):
        VLLMGenerator(tmp_path, tokenizer, (), VLLMConfig(**CONFIG))
    with pytest.raises(UserError, match="vLLM could not start on /no/such/checkpoint"):
        VLLMGenerator("/no/such/checkpoint", tokenizer, (), VLLMConfig(**CONFIG))


@needs_vllm
def test_a_prompt_and_response_longer_than_the_engine_takes_is_a_config_error(engine, task):
    with pytest.raises(ConfigError, match="vllm.max_model_len"):
        engine.generate(prompts(task, 2), 1, Sampling(temperature=1.0, max_new_tokens=CONFIG["max_model_len"]), 0)


# ---------------------------------------------------------------------------
# Several processes


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_accelerate_processes_sample_their_own_prompts(engine, checkpoint, task, tmp_path, tensor_parallel_size):
    """`accelerate launch` with 2 CPU processes (gloo). With tensor_parallel_size=1 each process
    starts its own engine inside the process group Accelerate made and gets exactly what one
    process gets for the same call; with 2 they drive one engine together, which samples their
    pooled prompts with the first process's seed. The trainer's process group works afterwards."""
    out = tmp_path / "ranks.json"
    config = {**CONFIG, "tensor_parallel_size": tensor_parallel_size}
    cmd = [*TWO_CPU_PROCESSES, str(REPO / "tests" / "vllm_two_processes.py"),
           str(checkpoint), json.dumps(config), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert ranks["all_reduce"] == 3.0
    batch, sampling = prompts(task, 8), Sampling(temperature=1.0, max_new_tokens=24)
    if tensor_parallel_size == 1:
        expected = [engine.generate(batch[r * 4:(r + 1) * 4], 2, sampling, seed=100 + r) for r in (0, 1)]
    else:
        pooled = engine.generate(batch, 2, sampling, seed=100)
        expected = [pooled[:4], pooled[4:]]
    for rank, got in enumerate(ranks["completions"]):
        assert got == [[[c.token_ids, c.text] for c in cs] for cs in expected[rank]], rank


# ---------------------------------------------------------------------------
# The stages with generator=vllm

# The engine settings of CONFIG as overrides: the stages then reuse this module's engine. The dtype is
# left to its default, the trainer's precision: fp32 on CPU, CONFIG's.
ENGINE_OVERRIDES = ["generator=vllm", *(f"generator.vllm.{k}={str(v).lower() if isinstance(v, bool) else v}"
                                         for k, v in CONFIG.items() if k != "dtype")]
RL_ARGS = [*TASK, "rl.max_steps=3", "rl.prompts_per_step=4", "rl.num_mini_batches=2", "rl.num_generations=4",
           "rl.micro_batch_size=8", "rl.sampling.max_new_tokens=24", "rl.sampling.batch_size=16", "rl.train_problems=64",
           "rl.eval_problems=8", "rl.eval_samples=4", "rl.eval_ks=[1,4]", "rl.eval_every=3", "rl.save_every=3",
           "rl.eval_sampling.max_new_tokens=24", "optim.lr=1e-3", "logger.wandb.mode=disabled",
           "logger.progress_bar=false", *ENGINE_OVERRIDES]


@needs_vllm
def test_rl_samples_with_the_policys_current_weights(engine, checkpoint, model, tokenizer, task, tmp_path):
    """After a few RL steps the engine's log-probs of fixed completions are the trained policy's, not the
    initial ones: the weights reach the engine at every step (TRL once shipped a stale-weights bug)."""
    from transformers import AutoModelForCausalLM

    from ntp_rl.tracking import read_metrics

    batch = prompts(task, 6)
    responses = [cs[0].token_ids for cs in engine.generate(batch, 1, Sampling(temperature=1.0, max_new_tokens=24), 11)]
    args = [f"init_from={checkpoint}", f"out_dir={tmp_path}", *RL_ARGS]
    try:
        result = run_stage("rl", compose("rl", args), overrides=args)
        trained = AutoModelForCausalLM.from_pretrained(result["checkpoint"], dtype=torch.float32).eval()
        # The run's engine is this module's engine (same checkpoint and settings); its final held-out
        # check made it take the weights of the last update.
        now = torch.tensor([x for row in engine.score(batch, responses) for x in row])
        expected = torch.cat([reference_logprobs(trained, tokenizer, p, r) for p, r in zip(batch, responses)])
        initial = torch.cat([reference_logprobs(model, tokenizer, p, r) for p, r in zip(batch, responses)])
        assert (now - expected).abs().max() < 1e-4
        assert (expected - initial).abs().max() > 1e-3, "three steps must move the policy for the check to mean anything"
    finally:
        engine.load_weights(model.named_parameters())  # the other tests expect the checkpoint's weights
    run_dir = Path(result["checkpoint"]).parents[1]
    steps = [row for row in read_metrics(run_dir) if "reward" in row]
    assert len(steps) == 3
    # No generator.vllm.dtype: the engine computes in the trainer's precision (fp32 here), and says so in run.json
    # (with sleep mode, which a CPU has not); the engine's log-probs of its samples are then the trainer's, at every
    # step (vLLM's "auto": up to 0.15 off).
    assert json.loads((run_dir / "run.json").read_text())["generator"] == {"name": "vllm", "dtype": "float32",
                                                                           "sleep_mode": False}
    assert all(row["sampling/sampling_logp_difference/max"] < 1e-4 for row in steps)


@needs_vllm
def test_truncated_importance_sampling_weights_each_tokens_loss(engine, checkpoint, model, tmp_path):
    args = [f"init_from={checkpoint}", f"out_dir={tmp_path}", *RL_ARGS, "rl.max_steps=1", "rl.tis_cap=2.0",
            "rl.eval_every=100"]
    try:
        run_stage("rl", compose("rl", args), overrides=args)
    finally:
        engine.load_weights(model.named_parameters())
    from ntp_rl.tracking import read_metrics

    (run_dir,) = [p.parent for p in tmp_path.rglob("run.json")]
    (row,) = [r for r in read_metrics(run_dir) if "reward" in r]
    # engine and trainer agree in fp32: every weight is ~1, none reaches the cap
    assert row["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
    assert row["sampling/importance_sampling_ratio/clipped_frac"] == 0.0


@needs_vllm
def test_eval_with_vllm_gives_what_eval_with_transformers_gives_greedily(checkpoint, engine, tmp_path, shared_cache):
    common = [f"model={checkpoint}", *TASK, "sampling.temperature=0", "eval.n=2", "eval.ks=[1,2]", "eval.num_problems=12",
              "sampling.max_new_tokens=24", "diagnostics.enabled=false", "logger.wandb.mode=disabled",
              "logger.progress_bar=false"]
    from ntp_rl.cli import expand_model_paths

    records = {}
    for name, extra in (("hf", []), ("vllm", ENGINE_OVERRIDES)):
        args = expand_model_paths([*common, f"out_dir={tmp_path / name}", *extra])
        records[name] = run_stage("eval", compose("eval", args), overrides=args)
    assert records["vllm"]["summary"] == records["hf"]["summary"]
    rows = {name: (tmp_path / name).rglob("problems.csv").__next__().read_text() for name in records}
    assert rows["vllm"] == rows["hf"]


def test_importance_weights_are_the_probability_ratio_capped():
    from ntp_rl.metrics import Sums
    from ntp_rl.rl.rollout import RolloutBatch
    from ntp_rl.stages.rl_update import STEP_MAXIMA, STEP_SUMS, truncated_importance_weights

    old = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    engine_logp = torch.tensor([[0.0, -2.0, -1.0, -3.0]])  # ratios 1, e, 1/e, e^2.5 (masked out below)
    mask = torch.tensor([[True, True, True, False]])
    micro = RolloutBatch(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.long), mask, torch.ones(1),
                         rollout_logp=engine_logp)
    sums = Sums(STEP_SUMS, maxima=STEP_MAXIMA)
    weights = truncated_importance_weights(sums, old, micro, cap=2.0)
    assert weights[0].tolist() == pytest.approx([1.0, 2.0, math.exp(-1), 2.0])
    assert sums["is_clipped"].item() == 1  # e > 2, among the three tokens that count
    assert sums["is_ratio"].item() == pytest.approx(1.0 + 2.0 + math.exp(-1))
    assert sums.maxima[STEP_MAXIMA.index("is_ratio_max")].item() == pytest.approx(math.e)


@needs_vllm
@pytest.mark.slow
def test_rl_on_two_processes_with_an_engine_each_matches_one_process(engine, checkpoint, model, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m ntp_rl rl generator=vllm` on CPU: each process
    samples its share with its own engine; with the same samples, the update is the one-process update."""
    # Two generate calls per round (2 prompts x 4 samples each), so each process makes exactly the calls
    # the single process makes for its half of the prompts; the held-out checks likewise.
    common = [f"init_from={checkpoint}", *RL_ARGS, "rl.prompts_per_generate_call=2", "rl.eval_sampling.batch_size=8"]
    one = tmp_path / "one"
    try:
        run_stage("rl", compose("rl", [*common, f"run_dir={one}"]), overrides=common)
    finally:
        engine.load_weights(model.named_parameters())
    two = tmp_path / "two"
    cmd = [*TWO_CPU_PROCESSES, "-m", "ntp_rl", "rl", *common, f"run_dir={two}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    assert_same_steps(one, two, {1, 2, 3})
