"""The sampler (ntp_rl/generation.py): a completion's tokens are exactly those sampled, and
sampling is exactly softmax(z / T) with top-p, whatever a checkpoint's generation_config says."""

from pathlib import Path

import pytest
import torch

from ntp_rl.data.tokenizer import EOS_TOKEN, load_tokenizer, train_embedded_tokenizer
from ntp_rl.generation import HFGenerator, Sampling

STOP = "1"
PROMPTS = ["2 + 3 =", "4 + 4 =", "7 + 2 =", "9 + 9 ="]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits_tokenizer(tmp_path: Path, pad_is_eos: bool):
    """A ~20-token tokenizer; with pad_is_eos it has no pad token of its own, and load_tokenizer
    makes EOS the pad, as with Qwen-style base tokenizers."""
    from transformers import PreTrainedTokenizerFast

    texts = [f"{a} + {b} = {a + b}\n" for a in range(10) for b in range(10)]
    trained = train_embedded_tokenizer(texts, vocab_size=24)
    extra = {} if pad_is_eos else {"pad_token": "<|pad|>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=trained.backend_tokenizer, eos_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=False, **extra)
    directory = tmp_path / ("pad_eos" if pad_is_eos else "pad_own")
    fast.save_pretrained(directory)
    tokenizer = load_tokenizer(str(directory))
    assert (tokenizer.pad_token_id == tokenizer.eos_token_id) == pad_is_eos
    return tokenizer


def random_model(vocab_size: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config).eval()


def test_padding_after_a_stop_string_is_not_taken_for_a_sampled_eos(tmp_path):
    tokenizer = digits_tokenizer(tmp_path, pad_is_eos=True)
    eos = tokenizer.eos_token_id
    model = random_model(len(tokenizer))
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=12)
    out = HFGenerator(model, tokenizer, [STOP], batch_size=32).generate(PROMPTS, 8, sampling, seed=0)
    completions = [c for per_prompt in out for c in per_prompt]
    by_stop = [c for c in completions if STOP in tokenizer.decode(c.token_ids)]
    by_eos = [c for c in completions if eos in c.token_ids]
    # The case under test: rows that ended on the stop string while others in the batch went on.
    assert by_stop and max(len(c.token_ids) for c in completions) > min(len(c.token_ids) for c in by_stop)
    assert by_eos, "and rows that really sampled EOS"
    for c in by_stop:
        assert eos not in c.token_ids, f"padding EOS kept after the stop string: {c.token_ids}"
        assert STOP not in tokenizer.decode(c.token_ids[:-1]), "the last token is the one that completed the stop string"
        assert not c.truncated
    for c in by_eos:
        assert c.token_ids.index(eos) == len(c.token_ids) - 1 and not c.truncated
        assert STOP not in tokenizer.decode(c.token_ids[:-1])
    for c in completions:
        if c not in by_stop and c not in by_eos:
            assert c.truncated and len(c.token_ids) == sampling.max_new_tokens

    # The same samples as with a pad token of its own: what padding looks like changes nothing.
    own_pad = digits_tokenizer(tmp_path, pad_is_eos=False)
    again = HFGenerator(model, own_pad, [STOP], batch_size=32).generate(PROMPTS, 8, sampling, seed=0)
    assert [[c.token_ids for c in p] for p in again] == [[c.token_ids for c in p] for p in out]


def save_with_generation_config(model, tokenizer, directory: Path, **settings) -> Path:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(**settings)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_checkpoints_generation_config_does_not_change_sampling(tmp_path):
    """A hub model may ship a repetition penalty, a minimum length, banned words, top-k...: the
    policy loss assumes softmax(z / T), so sampling must ignore them all."""
    from ntp_rl.models import load_pretrained

    tokenizer = digits_tokenizer(tmp_path, pad_is_eos=True)
    model = random_model(len(tokenizer))
    plain = save_with_generation_config(model, tokenizer, tmp_path / "plain")
    eos, one = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("1")
    opinionated = save_with_generation_config(
        model, tokenizer, tmp_path / "opinionated", repetition_penalty=3.0, no_repeat_ngram_size=1, min_new_tokens=6,
        bad_words_ids=[[one]], do_sample=True, top_k=2, temperature=0.3, top_p=0.5, eos_token_id=[eos, one])
    sampling = Sampling(temperature=1.0, top_p=1.0, max_new_tokens=10)
    samples = {}
    for name, directory in (("plain", plain), ("opinionated", opinionated)):
        lm = load_pretrained(str(directory))
        samples[name] = [[c.token_ids for c in p] for p in
                         HFGenerator(lm, tokenizer, batch_size=32).generate(PROMPTS, 8, sampling, seed=3)]
    assert samples["opinionated"] == samples["plain"]


def test_sampling_is_the_full_softmax_without_a_hidden_top_k(tmp_path):
    """transformers' global default top_k=50 must not apply: with a flat distribution over a
    vocabulary larger than 50, more than 50 different first tokens come out."""
    from transformers import PreTrainedTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    texts = [" ".join(a + b for b in letters) for a in letters]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_embedded_tokenizer(texts, vocab_size=160).backend_tokenizer,
                                        eos_token=EOS_TOKEN, pad_token="<|pad|>")
    assert len(tokenizer) > 100
    model = random_model(len(tokenizer))
    with torch.no_grad():  # every next token about equally likely (not exactly: top-k keeps ties)
        model.get_output_embeddings().weight.normal_(0, 0.01)
    out = HFGenerator(model, tokenizer, batch_size=256).generate(["ab cd"], 512, Sampling(1.0, 1.0, 1), seed=0)
    first_tokens = {c.token_ids[0] for c in out[0]}
    assert len(first_tokens) > 60


@pytest.mark.parametrize("gpu, given, expected", [(False, None, False), (True, None, True), (True, "false", False)])
def test_vllm_sleep_mode_is_on_by_default_where_the_engine_shares_a_gpu(monkeypatch, gpu, given, expected):
    """The engine lives in the trainer's process, so on a GPU it shares the trainer's memory: unset, sleep mode is
    on there (the update gets the engine's weights and KV cache back) and off on CPU, which has no sleep mode."""
    from ntp_rl.config.compose import compose
    from ntp_rl.engines import engine_settings
    from ntp_rl.vllm_engine import sleeps

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    given_overrides = [] if given is None else [f"generator.vllm.enable_sleep_mode={given}"]
    generator = compose("rl", ["init_from=x", "generator=vllm", *given_overrides]).generator
    assert sleeps(engine_settings(generator, "no")) is expected
