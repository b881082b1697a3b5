"""`ntp-rl prepare` and data=prepared: shards written once and whole, windows read by position."""

import errno
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY, TWO_CPU_PROCESSES, run_cli
from ntp_rl.config.schema import DataConfig, DataSource
from ntp_rl.data import build_pretrain_data
from ntp_rl.data import prepared, shard_writer
from ntp_rl.data.corpus import sample_documents
from ntp_rl.data.prepared import PreparedSequences, WindowOrder, read_manifest
from ntp_rl.data.shard_writer import prepare_corpus
from ntp_rl.data.tokenizer import load_tokenizer, train_embedded_tokenizer
from ntp_rl.errors import ConfigError, DataError, UserError
from ntp_rl.tracking import read_metrics

VAL_DOCS = 20


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return sample_documents("pretrain", 0, 2, 300)


@pytest.fixture(scope="module")
def tokenizer_dir(docs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    train_embedded_tokenizer(docs, 128).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(docs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def source(path, **overrides) -> DataConfig:
    return replace(DataConfig(source=DataSource.hf, path=str(path), val_docs=VAL_DOCS), **overrides)


def prepare(corpus, tokenizer_dir, out_dir, workers=1, docs_per_shard=50, **overrides):
    return prepare_corpus(source(corpus, **overrides), out_dir, workers, docs_per_shard,
                          load_tokenizer(str(tokenizer_dir)), str(tokenizer_dir), say=lambda line: None)


def ids_of(tokenizer, texts) -> list[int]:
    out = []
    for text in texts:
        out += tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    return out


def shard_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix == ".bin"}


@pytest.mark.parametrize("streaming", [False, True], ids=["loaded", "streamed"])
def test_shards_hold_the_documents_in_order_each_followed_by_eos(streaming, corpus, tokenizer_dir, docs, tmp_path):
    report = prepare(corpus, tokenizer_dir, tmp_path / "web", streaming=streaming)
    manifest = read_manifest(tmp_path / "web")
    tokenizer = load_tokenizer(str(tmp_path / "web" / "tokenizer"))
    assert manifest["complete"] and manifest["dtype"] == "uint16"  # a 128-token vocabulary fits two bytes
    full, rest = divmod(len(docs) - VAL_DOCS, 50)
    assert [s["docs"] for s in manifest["shards"]] == [50] * full + ([rest] if rest else [])
    val = np.fromfile(tmp_path / "web" / "val.bin", dtype=np.uint16)
    assert val.tolist() == ids_of(tokenizer, docs[:VAL_DOCS])
    train = np.concatenate([np.fromfile(tmp_path / "web" / s["file"], dtype=np.uint16) for s in manifest["shards"]])
    assert train.tolist() == ids_of(tokenizer, docs[VAL_DOCS:])
    assert manifest["train_tokens"] == len(train) == report.tokenized_now - len(val)
    counts = np.fromfile(tmp_path / "web" / prepared.UNIGRAM_COUNTS, dtype=np.int64)
    assert counts.tolist() == np.bincount(train, minlength=len(counts)).tolist()
    assert manifest["tokenizer"]["sha256"] == prepared.tokenizer_digest(load_tokenizer(str(tokenizer_dir)))
    assert not [p for p in (tmp_path / "web").iterdir() if p.name.startswith(".") and p.name != ".prepare.lock"]


def test_two_workers_write_the_same_shards_as_one(corpus, tokenizer_dir, tmp_path):
    prepare(corpus, tokenizer_dir, tmp_path / "one", workers=1)
    prepare(corpus, tokenizer_dir, tmp_path / "two", workers=2)
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "two")
    one, two = read_manifest(tmp_path / "one"), read_manifest(tmp_path / "two")
    assert one["shards"] == two["shards"]


def test_a_killed_prepare_leaves_only_whole_shards_and_continues(corpus, tokenizer_dir, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    prepare(corpus, tokenizer_dir, straight)
    killed = tmp_path / "killed"
    real = shard_writer._write_shard

    def dies_in_shard_3(path, tokens, dtype):
        if path.name == "train-00003.bin":
            path.with_name(f".{path.name}.tmp").write_bytes(b"half")  # as a kill mid-write leaves it
            raise KeyboardInterrupt
        real(path, tokens, dtype)

    monkeypatch.setattr(shard_writer, "_write_shard", dies_in_shard_3)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tokenizer_dir, killed)
    manifest = read_manifest(killed)
    assert not manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    assert not (killed / "train-00003.bin").exists()
    with pytest.raises(DataError, match="has not finished; run the same `ntp-rl prepare`"):
        build_pretrain_data(DataConfig(source=DataSource.prepared, path=str(killed), seq_len=16), cache_dir=tmp_path,
                            seed=0)

    monkeypatch.setattr(shard_writer, "_write_shard", real)
    tokenized = []
    monkeypatch.setattr(shard_writer, "_tokenize_shard",
                        lambda *args, real=shard_writer._tokenize_shard: tokenized.append(args[1]) or real(*args))
    prepare(corpus, tokenizer_dir, killed)
    assert tokenized == list(range(3, len(read_manifest(straight)["shards"]))), "finished shards are not tokenized again"
    assert shard_files(killed) == shard_files(straight)
    assert read_manifest(killed) == read_manifest(straight)


def test_prepare_again_is_a_no_op_and_other_settings_are_refused(corpus, tokenizer_dir, tmp_path):
    prepare(corpus, tokenizer_dir, tmp_path / "web")
    assert prepare(corpus, tokenizer_dir, tmp_path / "web").tokenized_now == 0
    with pytest.raises(UserError, match=r"prepare.out_dir=.*other settings \(val_docs\)"):
        prepare(corpus, tokenizer_dir, tmp_path / "web", val_docs=10)


def test_a_full_disk_is_one_line_and_no_shard_is_left_looking_whole(corpus, tokenizer_dir, tmp_path, monkeypatch):
    real_replace = shard_writer.os.replace

    def disk_full(src, dst):
        if Path(dst).name == "train-00001.bin":
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(shard_writer.os, "replace", disk_full)
    with pytest.raises(UserError) as caught:
        prepare(corpus, tokenizer_dir, tmp_path / "web")
    message = str(caught.value)
    assert "\n" not in message and "no space left" in message and "train-00001.bin" in message
    assert not (tmp_path / "web" / "train-00001.bin").exists()
    assert not (tmp_path / "web" / ".train-00001.bin.tmp").exists()
    assert [s["index"] for s in read_manifest(tmp_path / "web")["shards"]] == [0]


def test_bad_corpora_are_named_in_one_line(corpus, tokenizer_dir, tmp_path):
    with pytest.raises(ConfigError, match="data.text_field"):
        prepare(corpus, tokenizer_dir, tmp_path / "a", text_field="body")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        prepare(empty, tokenizer_dir, tmp_path / "b")
    with pytest.raises(DataError, match="not more than data.val_docs"):
        prepare(corpus, tokenizer_dir, tmp_path / "c", val_docs=1000)


def test_the_cli_prepares_and_refuses_a_missing_tokenizer(corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "web"
    missing = run_cli("prepare", f"data.path={corpus}", f"prepare.out_dir={out}")
    assert missing.returncode == 2 and missing.stderr.startswith("ntp-rl: error: data.tokenizer")
    ok = run_cli("prepare", f"data.path={corpus}", f"data.tokenizer={tokenizer_dir}", f"prepare.out_dir={out}",
                 "data.val_docs=20", "prepare.docs_per_shard=100")
    assert ok.returncode == 0, ok.stderr
    assert "train with: ntp-rl pretrain data=prepared" in ok.stdout
    assert read_manifest(out)["complete"]


# ---------------------------------------------------------------------------
# Reading


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_window_order_is_a_permutation_per_epoch_and_seed(n):
    order = WindowOrder(n, seed=3)
    everything = np.arange(n)
    first = order(0, everything)
    assert sorted(first.tolist()) == everything.tolist()
    assert order(0, everything[n // 2:]).tolist() == first[n // 2:].tolist(), "any position on its own"
    if n >= 7:
        assert first.tolist() != order(1, everything).tolist(), "each epoch reshuffles"
        assert first.tolist() != WindowOrder(n, seed=4)(0, everything).tolist(), "each seed orders differently"
        assert sorted(order(1, everything).tolist()) == everything.tolist()


def prepared_data(directory, seq_len=16, seed=0, tokenizer=None):
    cfg = DataConfig(source=DataSource.prepared, path=str(directory), seq_len=seq_len)
    return build_pretrain_data(cfg, cache_dir=directory, seed=seed, tokenizer_name_or_path=tokenizer)


def test_windows_are_shard_slices_read_by_position_and_rank(corpus, tokenizer_dir, tmp_path):
    prepare(corpus, tokenizer_dir, tmp_path / "web")
    data = prepared_data(tmp_path / "web")
    train = data.train
    manifest = read_manifest(tmp_path / "web")
    shards = [np.fromfile(tmp_path / "web" / s["file"], dtype=np.uint16).astype(np.int64) for s in manifest["shards"]]
    expected = [shard[i * 17:(i + 1) * 17].tolist() for shard in shards for i in range(len(shard) // 17)]
    assert train.num_windows == len(expected)
    epoch = train.take(train.num_windows)
    assert sorted(epoch.tolist()) == sorted(expected), "one epoch is every window once"
    assert torch.equal(train.take(5), torch.tensor([expected[i] for i in WindowOrder(len(expected), 0)(1, np.arange(5))]))

    train.seek(37)
    batch = train.take(8)
    for rank in range(2):  # each process reads its own rows of the same global batch
        train.seek(37)
        assert torch.equal(train.take(8, rows=slice(rank * 4, rank * 4 + 4)), batch[rank * 4:rank * 4 + 4])
    assert train.position == 45
    assert data.val.flatten().tolist() == np.fromfile(tmp_path / "web" / "val.bin", dtype=np.uint16)[:data.val.numel()].tolist()
    assert 0 < data.unigram_nll < np.log(128) + 1 and data.order_key.startswith("prepared:")
    assert prepared_data(tmp_path / "web", seq_len=8).order_key != data.order_key


def test_training_with_another_tokenizer_is_refused(corpus, tokenizer_dir, docs, tmp_path):
    prepare(corpus, tokenizer_dir, tmp_path / "web")
    other = tmp_path / "other-tokenizer"
    train_embedded_tokenizer(docs, 100).save_pretrained(other)
    with pytest.raises(DataError, match="was prepared with the tokenizer .* which differs from this run's"):
        prepared_data(tmp_path / "web", tokenizer=str(other))
    assert prepared_data(tmp_path / "web", tokenizer=str(tokenizer_dir)).train.num_windows > 0


# ---------------------------------------------------------------------------
# Pre-training on it


@pytest.fixture
def web(corpus, tokenizer_dir, tmp_path) -> Path:
    prepare(corpus, tokenizer_dir, tmp_path / "web")
    return tmp_path / "web"


def pretrain_args(web: Path, tmp_path: Path, *extra: str) -> list[str]:
    tiny = [a for a in TINY if not a.startswith(("data.num_", "data.vocab_size", "data.seq_len"))]
    return ["pretrain", *tiny, "data=prepared", f"data.path={web}", "data.seq_len=16", f"out_dir={tmp_path / 'outputs'}",
            "train.log_every=1", *extra]


def train_rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train/loss" in r}


@pytest.mark.slow  # four runs of the CLI: about 1.5 minutes on 2 cores
def test_pretrain_resumes_a_killed_run_exactly_and_refuses_other_data(web, tmp_path):
    common = pretrain_args(web, tmp_path, "train.max_steps=6", "train.save_every=2")
    straight = run_cli(*common, f"run_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr
    assert "prepared from" in straight.stdout
    killed = [*common, f"run_dir={tmp_path / 'killed'}"]
    assert run_cli(*killed, env={"NTP_RL_KILL_AT": "step:5"}).returncode == -9
    resumed = run_cli(*killed, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr
    a, b = train_rows(tmp_path / "straight"), train_rows(tmp_path / "killed")
    assert sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        assert a[step]["train/loss"] == b[step]["train/loss"], step  # bit-identical on CPU

    other = [*pretrain_args(web, tmp_path, "train.max_steps=8", "data.seq_len=8"), f"run_dir={tmp_path / 'straight'}",
             "resume=auto"]
    changed = run_cli(*other)
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1 and "data.seq_len" in changed.stderr
    # a change the user says is meant still cannot continue from a data position on other windows
    meant = run_cli(*other, "resume_allow_changes=true")
    assert meant.returncode == 2 and meant.stderr.count("\n") == 1, meant.stderr
    assert "was trained on other data or another data.seq_len" in meant.stderr


@pytest.mark.slow  # two processes over gloo: about a minute on 2 cores
def test_two_processes_train_on_the_same_windows_as_one(web, tmp_path):
    one = tmp_path / "one"
    assert run_cli(*pretrain_args(web, tmp_path, "train.max_steps=3", f"run_dir={one}")).returncode == 0
    two = tmp_path / "two"
    cmd = [*TWO_CPU_PROCESSES, "-m", "ntp_rl",
           *pretrain_args(web, tmp_path, "train.max_steps=3", "train.micro_batch_size=2", f"run_dir={two}")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = train_rows(one), train_rows(two)
    for step in range(1, 4):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step


def test_data_prepared_without_a_manifest_is_one_line(tmp_path):
    result = run_cli("pretrain", "data=prepared", f"data.path={tmp_path}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "data.path" in result.stderr and "ntp-rl prepare" in result.stderr


# ---------------------------------------------------------------------------
# Mixtures


@pytest.fixture
def two_corpora(corpus, tokenizer_dir, tmp_path) -> tuple[Path, Path]:
    other = tmp_path / "hard.jsonl"
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample_documents("pretrain", 1, 4, 120)))
    prepare(corpus, tokenizer_dir, tmp_path / "web")
    prepare(other, tokenizer_dir, tmp_path / "synthetic")
    return tmp_path / "web", tmp_path / "synthetic"


def mixture_config(paths_weights, seq_len=16) -> DataConfig:
    from ntp_rl.config.schema import PreparedSource

    return DataConfig(source=DataSource.prepared, seq_len=seq_len,
                      sources=[PreparedSource(path=str(p), weight=w) for p, w in paths_weights])


def test_a_mixture_draws_each_source_in_its_share_and_in_its_own_order(two_corpora, tmp_path):
    web, synthetic = two_corpora
    data = build_pretrain_data(mixture_config([(web, 0.95), (synthetic, 0.05)]), cache_dir=tmp_path, seed=0)
    train = data.train
    which, inner = train.locate(0, 4321)
    share = np.bincount(which, minlength=2) / len(which)
    assert abs(share[1] - 0.05) < 0.01 and abs(share[0] - 0.95) < 0.01
    for source in range(2):  # each source advances through its own positions one by one, never skipping
        assert inner[which == source].tolist() == list(range(int((which == source).sum())))
    assert train.locate(0, 1000)[0].tolist().count(1) == 50, "every block of 1000 holds the exact share"

    batch = train.take(40)
    singles = {0: data.train.sources[0], 1: data.train.sources[1]}
    for row, source, position in zip(batch, *train.locate(0, 40)):
        assert torch.equal(row, singles[source].read(np.array([position]))[0])
    train.seek(3000)
    later = train.take(12)
    train.seek(3000)
    assert torch.equal(train.take(12, rows=slice(6, 12)), later[6:]), "a process reads only its rows"
    seen = train.tokens_by_source()
    assert sum(seen.values()) == 3012 * 17 and set(seen) == {"web", "synthetic"}
    assert seen["synthetic"] == int((train.locate(0, 3012)[0] == 1).sum()) * 17
    assert data.order_key != build_pretrain_data(mixture_config([(web, 0.9), (synthetic, 0.1)]), cache_dir=tmp_path,
                                                 seed=0).order_key, "a resume with other weights is refused"


def test_mixture_inputs_are_checked_in_one_line(two_corpora, corpus, docs, tmp_path):
    from ntp_rl.config.validate import _check_data

    web, synthetic = two_corpora
    with pytest.raises(ConfigError, match="give one of the two, not both"):
        _check_data(replace(mixture_config([(web, 1.0)]), path=str(web)))
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight"):
        _check_data(mixture_config([(web, 1.0), (synthetic, 0.0)]))
    with pytest.raises(ConfigError, match=r"data.sources\[1\].path"):
        _check_data(mixture_config([(web, 1.0), (tmp_path / "nowhere", 1.0)]))
    with pytest.raises(ConfigError, match="use it with data=prepared"):
        _check_data(replace(mixture_config([(web, 1.0)]), source=DataSource.hf, path="x"))
    other_tokenizer = tmp_path / "other-tokenizer"
    train_embedded_tokenizer(docs, 100).save_pretrained(other_tokenizer)
    prepare(corpus, other_tokenizer, tmp_path / "other")
    with pytest.raises(DataError, match=r"data.sources\[1\].path=.* differs from this run's"):
        build_pretrain_data(mixture_config([(web, 0.5), (tmp_path / "other", 0.5)]), cache_dir=tmp_path, seed=0)


def test_pretrain_logs_each_sources_tokens_and_the_pipeline_takes_a_mixture(two_corpora, tmp_path):
    from ntp_rl.config.compose import compose
    from ntp_rl.stages import STAGES

    web, synthetic = two_corpora
    sources = f"data.sources=[{{path: '{web}', weight: 0.75}}, {{path: '{synthetic}', weight: 0.25}}]"
    args = [a for a in pretrain_args(web, tmp_path, "train.max_steps=2") if not a.startswith("data.path=")]
    result = run_cli(*args, sources, f"run_dir={tmp_path / 'mixed'}")
    assert result.returncode == 0, result.stderr
    last = train_rows(tmp_path / "mixed")[2]
    assert last["data/web_tokens"] + last["data/synthetic_tokens"] == 2 * 8 * 17
    for stage in ("pipeline", "midtrain"):
        extra = ["init_from=/nonexistent"] if stage == "midtrain" else []
        cfg = compose(stage, ["data=prepared", sources, *extra])
        assert [s.weight for s in cfg.data.sources] == [0.75, 0.25]
        if stage == "pipeline":
            STAGES[stage].validate(cfg)
