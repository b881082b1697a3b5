"""The data layer: tokenizer, packing, and both data sources (the corpus itself: test_corpus.py)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import PreTrainedTokenizerFast

from ntp_rl.config.schema import DataConfig, DataSource, SolutionOrder
from ntp_rl.data.corpus import LEVELS, sample_documents
from ntp_rl.data import build_pretrain_data
from ntp_rl.data.packing import PackedSequences, StreamingSequences, pack_windows, tokenize_documents
from ntp_rl.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_embedded_tokenizer
from ntp_rl.errors import ConfigError, DataError
from ntp_rl.io import build_directory_atomically


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    # Local files loaded without streaming are converted to Arrow in the datasets cache.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return [d for level in LEVELS for d in sample_documents("pretrain", 0, level, 400)]


@pytest.fixture(scope="module")
def tokenizer(docs) -> PreTrainedTokenizerFast:
    return train_embedded_tokenizer(docs, 256)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The reference packing input: each document's ids then EOS, one by one."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return ids


# ---------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_round_trips_and_splits_digits(tokenizer, docs):
    for doc in docs[::7]:
        assert tokenizer.decode(tokenizer.encode(doc, add_special_tokens=False)) == doc
    vocab = tokenizer.get_vocab()
    assert all(d in vocab for d in "0123456789")
    digit_tokens = [t for t in vocab if any(c.isdigit() for c in t)]
    assert sorted(digit_tokens) == list("0123456789")
    assert len(tokenizer.encode("90210", add_special_tokens=False)) == 5
    assert len(tokenizer) <= 256


def test_tokenizer_specials_and_determinism(tokenizer, docs):
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.bos_token is None
    assert tokenizer.padding_side == "right"
    assert tokenizer.encode("Question:")[0] != tokenizer.eos_token_id  # nothing prepended
    assert train_embedded_tokenizer(docs, 256).get_vocab() == tokenizer.get_vocab()


def test_load_tokenizer(tokenizer, tokenizer_dir, tmp_path):
    loaded = load_tokenizer(str(tokenizer_dir))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.eos_token == EOS_TOKEN and loaded.pad_token == PAD_TOKEN

    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_tokenizer(str(missing))

    no_eos = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer)
    no_eos.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(DataError, match="no EOS token"):
        load_tokenizer(str(tmp_path / "no-eos"))

    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=EOS_TOKEN)
    no_pad.save_pretrained(tmp_path / "no-pad")
    assert load_tokenizer(str(tmp_path / "no-pad")).pad_token == EOS_TOKEN


# ---------------------------------------------------------------------------
# Packing and sequence sources


def test_windows_are_consecutive_slices_of_the_eos_joined_stream(tokenizer, docs):
    texts = docs[:300]
    stream = token_stream(tokenizer, texts)
    windows = pack_windows(tokenize_documents(tokenizer, texts), seq_len=31)
    assert windows.shape == (len(stream) // 32, 32) and windows.dtype == torch.long
    assert windows.flatten().tolist() == stream[: windows.numel()]


def test_packed_sequences_seek_equals_uninterrupted_take():
    windows = torch.arange(10 * 5).view(10, 5)
    straight = PackedSequences(windows, seed=3)
    taken = torch.cat([straight.take(n) for n in (3, 0, 4, 9, 1, 8)])  # 25 windows: 2.5 epochs
    assert straight.position == 25 and taken.shape == (25, 5)
    for start in (0, 7, 10, 13, 24):
        resumed = PackedSequences(windows, seed=3)
        resumed.seek(start)
        assert torch.equal(resumed.take(25 - start), taken[start:])
    # Every epoch is a permutation of all windows, in a new order.
    epochs = [taken[i * 10 : (i + 1) * 10] for i in range(2)]
    for epoch in epochs:
        assert sorted(epoch[:, 0].tolist()) == windows[:, 0].tolist()
    assert not torch.equal(epochs[0], epochs[1])
    other = PackedSequences(windows, seed=4)
    assert not torch.equal(other.take(10), epochs[0])


def test_streaming_sequences_pack_like_memory_and_seek(tokenizer, docs):
    texts = docs[:60]
    windows = pack_windows(tokenize_documents(tokenizer, texts), seq_len=31)
    plain = StreamingSequences(lambda: iter(texts), tokenizer, 31)
    first = plain.take(len(windows))
    assert torch.equal(first, windows)
    # The second pass continues the token stream across the boundary.
    stream = token_stream(tokenizer, texts) * 3
    after = plain.take(len(windows))
    assert after.flatten().tolist() == stream[first.numel() : first.numel() + after.numel()]

    shuffled = StreamingSequences(lambda: iter(texts), tokenizer, 31, seed=1, shuffle_windows=16)
    taken = torch.cat([shuffled.take(n) for n in (5, 20, 30)])
    assert not torch.equal(taken[: len(windows)], windows[: len(taken)])
    for start in (0, 17, 40):
        resumed = StreamingSequences(lambda: iter(texts), tokenizer, 31, seed=1, shuffle_windows=16)
        resumed.take(3)
        resumed.seek(start)  # backwards and forwards
        assert torch.equal(resumed.take(55 - start), taken[start:])
        assert resumed.position == 55


def test_streaming_sequences_reject_a_source_shorter_than_one_window(tokenizer):
    tiny = StreamingSequences(lambda: iter(["1 + 1"]), tokenizer, 64, name="tiny source")
    with pytest.raises(DataError, match="tiny source has fewer than seq_len\\+1"):
        tiny.take(1)


# ---------------------------------------------------------------------------
# build_pretrain_data


def small_embedded(**overrides) -> DataConfig:
    return replace(DataConfig(num_train_docs=2000, num_val_docs=100, vocab_size=256, seq_len=64), **overrides)


def test_embedded_data_is_built_once_and_cached(tmp_path):
    cfg = small_embedded()
    data = build_pretrain_data(cfg, cache_dir=tmp_path, seed=0)
    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].startswith("embedded-")  # no temp dirs left behind
    assert data.train.seq_len == 64 and data.val.shape[1] == 65
    assert data.num_train_tokens == data.train.num_windows * 65
    assert "2000 docs" in data.description and f"vocab {len(data.tokenizer)}" in data.description

    # Validation is the held-out test split, packed the same way.
    val_docs = sample_documents("test", cfg.seed, cfg.difficulty, cfg.num_val_docs)
    assert data.val.flatten().tolist() == token_stream(data.tokenizer, val_docs)[: data.val.numel()]

    stamp = (tmp_path / entries[0] / "train.pt").stat().st_mtime_ns
    again = build_pretrain_data(OmegaConf.structured(cfg), cache_dir=tmp_path, seed=0)
    assert (tmp_path / entries[0] / "train.pt").stat().st_mtime_ns == stamp
    assert torch.equal(again.train.take(8), data.train.take(8))
    assert torch.equal(again.val, data.val)
    assert again.tokenizer.get_vocab() == data.tokenizer.get_vocab()


def test_solution_order_any_builds_its_own_cache(tmp_path):
    given = build_pretrain_data(small_embedded(), cache_dir=tmp_path, seed=0)
    reordered = build_pretrain_data(small_embedded(solution_order=SolutionOrder.any), cache_dir=tmp_path, seed=0)
    assert len(list(tmp_path.iterdir())) == 2
    assert "solutions in any order" in reordered.description and "any order" not in given.description
    assert not torch.equal(reordered.val, given.val)


def test_a_copy_of_the_corpus_tokenizer_reuses_the_cache_another_tokenizer_does_not(tmp_path, tokenizer_dir):
    cache = tmp_path / "cache"
    data = build_pretrain_data(small_embedded(), cache_dir=cache, seed=0)
    checkpoint = tmp_path / "checkpoint"  # what a pretrain checkpoint carries: the same tokenizer, elsewhere
    data.tokenizer.save_pretrained(checkpoint)
    again = build_pretrain_data(small_embedded(), cache_dir=cache, seed=0, tokenizer_name_or_path=str(checkpoint))
    assert len(list(cache.iterdir())) == 1
    assert torch.equal(again.val, data.val)

    other = build_pretrain_data(small_embedded(), cache_dir=cache, seed=0, tokenizer_name_or_path=str(tokenizer_dir))
    assert len(list(cache.iterdir())) == 2
    assert other.tokenizer.get_vocab() != data.tokenizer.get_vocab()


def test_embedded_seeds_the_run_orders_the_corpus_seed_generates(tmp_path):
    base = build_pretrain_data(small_embedded(), cache_dir=tmp_path, seed=0)
    reordered = build_pretrain_data(small_embedded(), cache_dir=tmp_path, seed=1)
    assert torch.equal(base.train.windows, reordered.train.windows)
    assert not torch.equal(base.train.take(16), reordered.train.take(16))
    other_corpus = build_pretrain_data(small_embedded(seed=1), cache_dir=tmp_path, seed=0)
    assert not torch.equal(other_corpus.val, base.val)


def test_unigram_baseline_is_a_real_cross_entropy(tmp_path):
    data = build_pretrain_data(small_embedded(), cache_dir=tmp_path, seed=0)
    vocab = len(data.tokenizer)
    # Better than uniform (the corpus is far from random), but the same order of magnitude.
    assert math.isfinite(data.unigram_nll)
    assert 0.3 * math.log(vocab) < data.unigram_nll < math.log(vocab)


def test_cache_race_keeps_the_first_copy(tmp_path):
    target = tmp_path / "embedded-x"

    def write(marker):
        return lambda out: (out / "who").write_text(marker)

    build_directory_atomically(target, write("first"))
    build_directory_atomically(target, write("second"))  # lost the race: keeps theirs, cleans up
    assert (target / "who").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["embedded-x"]


def write_docs(path: Path, texts: list[str]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    else:  # .txt: one document per line
        path.write_text("".join(t.replace("\n", " ") + "\n" for t in texts))
    return path


def hf_config(path, **overrides) -> DataConfig:
    return replace(DataConfig(source=DataSource.hf, path=str(path), seq_len=32, val_docs=20), **overrides)


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".txt"])
def test_hf_source_from_local_files(suffix, streaming, tmp_path, tokenizer_dir, docs):
    texts = docs[:200]
    if suffix == ".txt":
        texts = [t.replace("\n", " ") for t in texts]
    path = write_docs(tmp_path / f"docs{suffix}", texts)
    cfg = hf_config(path, streaming=streaming)
    data = build_pretrain_data(cfg, cache_dir=tmp_path / "cache", seed=0, tokenizer_name_or_path=str(tokenizer_dir))
    tok = data.tokenizer
    val_stream = token_stream(tok, texts[:20])
    assert data.val.flatten().tolist() == val_stream[: data.val.numel()]
    train_stream = token_stream(tok, texts[20:])
    assert math.isfinite(data.unigram_nll) and data.unigram_nll > 0

    if not streaming:
        assert data.num_train_tokens == data.train.num_windows * 33
        assert data.train.windows.flatten().tolist() == train_stream[: data.num_train_tokens]
        return
    assert data.num_train_tokens is None and "streaming" in data.description
    # Shuffled, but every window is still a slice of the (repeating) training stream.
    joined = "," + ",".join(map(str, train_stream * 3)) + ","
    taken = data.train.take(6)
    assert taken.shape == (6, 33)
    for window in taken.tolist():
        assert "," + ",".join(map(str, window)) + "," in joined
    data.train.seek(2)
    assert torch.equal(data.train.take(4), taken[2:])


def test_rows_without_text_are_left_out_and_counted(tmp_path, tokenizer_dir, docs):
    """A null or empty text field is not a document: counted (the run says how many), not trained on."""
    rows = [{"text": None if i % 10 == 3 else "" if i % 10 == 7 else t} for i, t in enumerate(docs[:100])]
    path = tmp_path / "holes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_pretrain_data(hf_config(path), cache_dir=tmp_path, seed=0, tokenizer_name_or_path=str(tokenizer_dir))
    assert data.skipped_rows == 20
    assert data.description.startswith(f"{path}: 64 docs,")  # 80 training rows, 16 of them without text
    kept = [r["text"] for r in rows[20:] if r["text"]]
    assert data.train.windows.flatten().tolist() == token_stream(data.tokenizer, kept)[: data.num_train_tokens]


def test_hf_max_train_docs_and_glob(tmp_path, tokenizer_dir, docs):
    write_docs(tmp_path / "a.jsonl", docs[:100])
    write_docs(tmp_path / "b.jsonl", docs[100:200])
    cfg = hf_config(tmp_path / "*.jsonl", max_train_docs=50)
    data = build_pretrain_data(cfg, cache_dir=tmp_path, seed=0, tokenizer_name_or_path=str(tokenizer_dir))
    assert data.train.windows.flatten().tolist() == token_stream(data.tokenizer, docs[20:70])[: data.num_train_tokens]


def test_hf_tokenizer_from_data_config(tmp_path, tokenizer_dir, docs):
    path = write_docs(tmp_path / "docs.jsonl", docs[:100])
    data = build_pretrain_data(hf_config(path, tokenizer=str(tokenizer_dir)), cache_dir=tmp_path, seed=0)
    assert data.tokenizer.eos_token == EOS_TOKEN


# ---------------------------------------------------------------------------
# Errors a user can cause


def build_hf(cfg, tmp_path, tokenizer_dir):
    return build_pretrain_data(cfg, cache_dir=tmp_path / "cache", seed=0, tokenizer_name_or_path=str(tokenizer_dir))


def test_missing_path_is_named(tmp_path, tokenizer_dir):
    missing = tmp_path / "nowhere" / "*.jsonl"
    with pytest.raises(DataError, match=re.escape(f"data.path={missing}: no such file")):
        build_hf(hf_config(missing), tmp_path, tokenizer_dir)
    with pytest.raises(DataError, match=re.escape(f"data.path={tmp_path / 'no-dir'}")):
        build_hf(hf_config(tmp_path / "no-dir"), tmp_path, tokenizer_dir)


def test_unknown_hub_dataset_offline_is_named(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match="data.path=no-such-org/no-such-dataset"):
        build_hf(hf_config("no-such-org/no-such-dataset"), tmp_path, tokenizer_dir)


@pytest.mark.parametrize("streaming", [False, True])
def test_missing_text_field_names_the_columns(streaming, tmp_path, tokenizer_dir, docs):
    path = write_docs(tmp_path / "docs.jsonl", docs[:50])
    with pytest.raises(ConfigError, match=r"data.text_field=body: .*docs.jsonl.*columns: text, id"):
        build_hf(hf_config(path, text_field="body", streaming=streaming), tmp_path, tokenizer_dir)


@pytest.mark.parametrize("suffix", [".jsonl", ".txt", ".parquet"])
def test_empty_file_is_named(suffix, tmp_path, tokenizer_dir):
    path = tmp_path / f"empty{suffix}"
    path.touch()
    with pytest.raises(DataError, match=re.escape(f"data.path={path}: is empty")):
        build_hf(hf_config(path), tmp_path, tokenizer_dir)


@pytest.mark.parametrize("streaming", [False, True])
def test_too_few_tokens_are_named(streaming, tmp_path, tokenizer_dir, docs):
    path = write_docs(tmp_path / "docs.jsonl", docs[:30])
    with pytest.raises(DataError, match=r"validation documents .* fewer than seq_len\+1 = 4097"):
        build_hf(hf_config(path, seq_len=4096, streaming=streaming), tmp_path, tokenizer_dir)
    with pytest.raises(DataError, match=r"training documents .* fewer than seq_len\+1 = 33"):
        build_hf(hf_config(path, val_docs=29, streaming=streaming), tmp_path, tokenizer_dir)


def test_missing_tokenizer_is_named(tmp_path, docs):
    path = write_docs(tmp_path / "docs.jsonl", docs[:50])
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_pretrain_data(hf_config(path), cache_dir=tmp_path, seed=0)
    missing = tmp_path / "no-tokenizer"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        build_pretrain_data(hf_config(path, tokenizer=str(missing)), cache_dir=tmp_path, seed=0)


def test_embedded_corpus_too_small_for_a_window(tmp_path):
    with pytest.raises(ConfigError, match="data.num_val_docs"):
        build_pretrain_data(small_embedded(num_val_docs=2, seq_len=512), cache_dir=tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []  # the half-built cache is gone
