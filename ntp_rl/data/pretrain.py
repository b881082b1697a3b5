"""Packed pre-training sequences from the embedded corpus or any `datasets` source.

Documents are tokenized, each followed by EOS, concatenated, and cut into consecutive
windows of seq_len + 1 tokens: a window's first seq_len tokens are the input and its
last seq_len tokens the labels. The remainder that does not fill a window is dropped.

Training order is a pure function of (run seed, position), so a resumed run asks for
`seek(position)` and continues with exactly the windows it would have seen.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ntp_rl.config import DataSource
from ntp_rl.data.corpus import sample_documents
from ntp_rl.data.tokenizer import load_tokenizer, train_embedded_tokenizer
from ntp_rl.errors import ConfigError, DataError, first_line

# Bump when anything that shapes the embedded cache changes (corpus, tokenizer, packing),
# so old caches are rebuilt instead of silently reused.
FORMAT_VERSION = 1

_TOKENIZE_BATCH = 1000  # documents per tokenizer call
_STREAM_SHUFFLE_TOKENS = 2**20  # streaming: tokens held in the shuffle buffer
_STREAM_UNIGRAM_TOKENS = 2**20  # streaming: train tokens the unigram baseline is fit on

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


class SequenceSource(Protocol):
    seq_len: int
    position: int  # windows handed out so far: the resumable data position

    def take(self, n: int) -> torch.Tensor:
        """The next n windows, LongTensor [n, seq_len + 1]; advances position."""
        ...

    def seek(self, position: int) -> None:
        """Continue as if `position` windows had been taken."""
        ...


@dataclass
class PretrainData:
    tokenizer: PreTrainedTokenizerBase
    train: SequenceSource
    val: torch.Tensor  # [num_val_seqs, seq_len + 1], fixed order
    unigram_nll: float  # nats/token of a unigram model fit on train tokens, on the val tokens
    num_train_tokens: int | None  # tokens in the training windows; None when streaming
    description: str


# ---------------------------------------------------------------------------
# Tokenizing and packing


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> Iterator[np.ndarray]:
    """Token ids of the texts, each document followed by EOS, one flat array per batch.

    Empty documents are skipped: they would only add runs of EOS.
    """
    eos = tokenizer.eos_token_id
    batch: list[str] = []
    for text in texts:
        if text:
            batch.append(text)
        if len(batch) == _TOKENIZE_BATCH:
            yield _tokenize_batch(tokenizer, batch, eos)
            batch = []
    if batch:
        yield _tokenize_batch(tokenizer, batch, eos)


def _tokenize_batch(tokenizer: PreTrainedTokenizerBase, texts: list[str], eos: int) -> np.ndarray:
    if tokenizer.is_fast:
        # Straight to the Rust backend: no Python-side wrapping, and encode_batch_fast
        # (tokenizers >= 0.21) also skips offsets; about 2x faster than tokenizer(texts).
        backend = tokenizer.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [e.ids for e in encode(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    total = sum(len(doc) + 1 for doc in ids)
    flat = np.empty(total, dtype=np.int64)
    at = 0
    for doc in ids:
        flat[at : at + len(doc)] = doc
        flat[at + len(doc)] = eos
        at += len(doc) + 1
    return flat


def pack_windows(chunks: Iterable[np.ndarray], seq_len: int) -> torch.Tensor:
    """Concatenate token chunks and cut them into [N, seq_len + 1] windows, dropping the tail."""
    arrays = list(chunks)
    stream = np.concatenate(arrays) if arrays else np.empty(0, dtype=np.int64)
    width = seq_len + 1
    count = len(stream) // width
    return torch.from_numpy(stream[: count * width].reshape(count, width).copy())


def unigram_nll(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of an add-one unigram fit on train, on val.

    The floor a model must beat to show it uses context at all.
    """
    # Some tokenizers hand out ids past len(tokenizer); size the table to cover them all.
    size = max(vocab_size, int(train_tokens.max()) + 1, int(val_tokens.max()) + 1)
    counts = torch.bincount(train_tokens.flatten(), minlength=size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return float(-log_probs[val_tokens.flatten()].mean())


# ---------------------------------------------------------------------------
# Sources of training windows


def mix_seed(*parts: object) -> int:
    """A seed that is a pure function of `parts`, the same in every process (str hash() is salted)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # torch seeds must fit in int64


class PackedSequences:
    """In-memory windows, reshuffled every epoch; order depends only on (seed, position)."""

    def __init__(self, windows: torch.Tensor, seed: int):
        if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
            raise ValueError(f"windows must be a non-empty [N, seq_len + 1] tensor, got shape {tuple(windows.shape)}")
        self.windows = windows
        self.seed = seed
        self.seq_len = windows.shape[1] - 1
        self.position = 0
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, its permutation)

    @property
    def num_windows(self) -> int:
        return self.windows.shape[0]

    def take(self, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"cannot take {n} windows")
        total = self.num_windows
        pieces = []
        start, end = self.position, self.position + n
        while start < end:
            epoch, offset = divmod(start, total)
            stop = min(total, offset + end - start)
            pieces.append(self._permutation(epoch)[offset:stop])
            start += stop - offset
        self.position = end
        index = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
        return self.windows[index]

    def seek(self, position: int) -> None:
        if position < 0:
            raise ValueError(f"cannot seek to position {position}")
        self.position = position

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(mix_seed("packed", self.seed, epoch))
            self._cached = (epoch, torch.randperm(self.num_windows, generator=generator))
        return self._cached[1]


class StreamingSequences:
    """Windows tokenized and packed on the fly from a restartable source of texts.

    `texts()` must return a fresh iterator over the same texts each time: passes
    repeat the data (epochs), and seek replays from the start. A shuffle buffer of
    `shuffle_windows` windows, driven by `seed`, mixes nearby windows.
    """

    def __init__(
        self,
        texts: Callable[[], Iterable[str]],
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        *,
        seed: int = 0,
        shuffle_windows: int = 0,
        name: str = "training data",
    ):
        self.texts = texts
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle_windows = shuffle_windows
        self.name = name
        self.position = 0
        self._windows = self._generate()

    def take(self, n: int) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"cannot take {n} windows")
        if n == 0:
            return torch.empty(0, self.seq_len + 1, dtype=torch.long)
        batch = torch.stack([next(self._windows) for _ in range(n)])
        self.position += n
        return batch

    def seek(self, position: int) -> None:
        if position < 0:
            raise ValueError(f"cannot seek to position {position}")
        if position < self.position:
            self._windows = self._generate()
            self.position = 0
        for _ in range(position - self.position):
            next(self._windows)
        self.position = position

    def _generate(self) -> Iterator[torch.Tensor]:
        windows = self._packed()
        if self.shuffle_windows > 1:
            windows = _shuffle_buffer(windows, self.shuffle_windows, random.Random(mix_seed("stream", self.seed)))
        return windows

    def _packed(self) -> Iterator[torch.Tensor]:
        width = self.seq_len + 1
        pending: list[np.ndarray] = []
        pending_len = 0
        for chunk in self._endless_chunks():
            pending.append(chunk)
            pending_len += len(chunk)
            if pending_len < width:
                continue
            stream = np.concatenate(pending)
            count = len(stream) // width
            for row in torch.from_numpy(stream[: count * width].reshape(count, width).copy()):
                yield row
            rest = stream[count * width :]
            pending, pending_len = [rest], len(rest)

    def _endless_chunks(self) -> Iterator[np.ndarray]:
        while True:
            pass_tokens = 0
            for chunk in tokenize_documents(self.tokenizer, self.texts()):
                pass_tokens += len(chunk)
                yield chunk
            # Without this check an empty source would loop here forever.
            if pass_tokens < self.seq_len + 1:
                raise DataError(
                    f"{self.name} has fewer than seq_len+1 = {self.seq_len + 1} tokens ({pass_tokens}); "
                    "add documents or lower data.seq_len"
                )


def _shuffle_buffer(items: Iterator[torch.Tensor], size: int, rng: random.Random) -> Iterator[torch.Tensor]:
    buffer: list[torch.Tensor] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    # Only reached by a finite source; StreamingSequences' sources are endless.
    rng.shuffle(buffer)
    yield from buffer


# ---------------------------------------------------------------------------
# Building the data a pretraining run needs


def build_pretrain_data(
    data_cfg: Any,
    *,
    cache_dir: Path,
    seed: int,
    tokenizer_name_or_path: str | None = None,
) -> PretrainData:
    """Tokenizer, training windows, validation windows and the unigram baseline.

    `seed` is the run's seed and only orders the training windows; the embedded
    corpus itself comes from `data_cfg.seed`. A tokenizer named here (the model's)
    wins over `data_cfg.tokenizer`.
    """
    tokenizer_name = tokenizer_name_or_path or data_cfg.tokenizer
    source = DataSource(data_cfg.source)
    if source is DataSource.embedded:
        return _build_embedded(data_cfg, Path(cache_dir), seed, tokenizer_name)
    if not tokenizer_name:
        raise ConfigError(
            "data.tokenizer",
            "is required with data.source=hf unless the model brings its own (model.arch=hf); "
            "give a tokenizer name or directory",
        )
    return _build_hf(data_cfg, seed, load_tokenizer(tokenizer_name))


def _embedded_cache_dir(cfg: Any, cache_dir: Path, tokenizer_name: str | None) -> tuple[Path, dict]:
    """Where the corpus tokenized by `tokenizer_name` (None: its own trained tokenizer) is cached.

    A checkpoint's tokenizer is usually a copy of the corpus's own, so a tokenizer directory
    counts by its content, not its path: every eval of every checkpoint of a study then reads
    the cache that pre-training built instead of tokenizing the corpus again.
    """
    def settings_for(tokenizer: str | None) -> dict:
        return {
            "format": FORMAT_VERSION,
            "difficulty": cfg.difficulty,
            "seed": cfg.seed,
            "num_train_docs": cfg.num_train_docs,
            "num_val_docs": cfg.num_val_docs,
            "vocab_size": cfg.vocab_size,
            "seq_len": cfg.seq_len,
            "tokenizer": tokenizer,
        }

    def location(settings: dict) -> Path:
        return cache_dir / f"embedded-{hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}"

    if tokenizer_name is None:
        settings = settings_for(None)
        return location(settings), settings
    fingerprint = _tokenizer_fingerprint(tokenizer_name)
    own = location(settings_for(None))
    if fingerprint is not None and (own / "tokenizer").is_dir() and _tokenizer_fingerprint(str(own / "tokenizer")) == fingerprint:
        return own, settings_for(None)
    settings = settings_for(fingerprint or tokenizer_name)
    return location(settings), settings


def _tokenizer_fingerprint(name: str) -> str | None:
    """A hash of a tokenizer directory's tokenizer.json (vocabulary, merges, special tokens); None for hub names."""
    file = Path(name) / "tokenizer.json"
    if not file.is_file():
        return None
    return "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]


def _build_embedded(cfg: Any, cache_dir: Path, seed: int, tokenizer_name: str | None) -> PretrainData:
    target, settings = _embedded_cache_dir(cfg, cache_dir, tokenizer_name)
    if settings["tokenizer"] is None:
        tokenizer_name = None  # the cache's own tokenizer, the same one by content
    if not target.is_dir():
        _write_atomically(target, lambda tmp: _write_embedded(cfg, settings, tmp, tokenizer_name))
    tokenizer = load_tokenizer(tokenizer_name or str(target / "tokenizer"))
    train = torch.load(target / "train.pt", weights_only=True)
    val = torch.load(target / "val.pt", weights_only=True)
    description = (
        f"embedded corpus (difficulty {cfg.difficulty}): {cfg.num_train_docs} docs, "
        f"{_human(train.numel())} tokens in {len(train)} windows, vocab {len(tokenizer)}"
    )
    return PretrainData(
        tokenizer=tokenizer,
        train=PackedSequences(train, seed),
        val=val,
        unigram_nll=unigram_nll(train, val, len(tokenizer)),
        num_train_tokens=train.numel(),
        description=description,
    )


def _write_embedded(cfg: Any, settings: dict, out: Path, tokenizer_name: str | None) -> None:
    timings = {}
    clock = time.perf_counter()
    train_docs = sample_documents("pretrain", cfg.seed, cfg.difficulty, cfg.num_train_docs)
    # Validation comes from the held-out test split: no pre-training document shares its arithmetic.
    val_docs = sample_documents("test", cfg.seed, cfg.difficulty, cfg.num_val_docs)
    timings["generate_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if tokenizer_name:
        tokenizer = load_tokenizer(tokenizer_name)
    else:
        tokenizer = train_embedded_tokenizer(train_docs, cfg.vocab_size)
        tokenizer.save_pretrained(out / "tokenizer")
    timings["tokenizer_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    train = pack_windows(tokenize_documents(tokenizer, train_docs), cfg.seq_len)
    val = pack_windows(tokenize_documents(tokenizer, val_docs), cfg.seq_len)
    timings["tokenize_s"] = time.perf_counter() - clock
    for name, windows, count_key in (("training", train, "num_train_docs"), ("validation", val, "num_val_docs")):
        if len(windows) == 0:
            raise ConfigError(
                f"data.{count_key}",
                f"the {name} documents have fewer than seq_len+1 = {cfg.seq_len + 1} tokens; "
                "raise it or lower data.seq_len",
                getattr(cfg, count_key),
            )
    torch.save(train, out / "train.pt")
    torch.save(val, out / "val.pt")
    meta = {**settings, "train_windows": len(train), "val_windows": len(val), "vocab": len(tokenizer), **timings}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Build a directory beside `target` and rename it into place.

    Readers see either nothing or a complete cache. When two processes race, the
    first rename wins and the loser throws its copy away.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build_hf(cfg: Any, seed: int, tokenizer: PreTrainedTokenizerBase) -> PretrainData:
    path, field = cfg.path, _text_field(cfg)
    ds = _load_dataset(cfg)
    _check_text_field(ds, field, path)
    window = cfg.seq_len + 1
    val_part, train_part = _split_val_train(ds, cfg.val_docs, cfg.max_train_docs)

    val = pack_windows(tokenize_documents(tokenizer, _texts(val_part, field)), cfg.seq_len)
    if len(val) == 0:
        raise DataError(
            f"data.path={path}: the validation documents (the first data.val_docs={cfg.val_docs}) have fewer "
            f"than seq_len+1 = {window} tokens; raise data.val_docs or lower data.seq_len"
        )
    train_name = f"data.path={path}: the training documents (after the first data.val_docs={cfg.val_docs})"

    if cfg.streaming:
        train = StreamingSequences(
            lambda: _texts(train_part, field),
            tokenizer,
            cfg.seq_len,
            seed=seed,
            shuffle_windows=max(1, _STREAM_SHUFFLE_TOKENS // window),
            name=train_name,
        )
        # The unigram baseline is fit on a prefix of the stream: all of it may not fit in memory.
        train_sample = _token_prefix(tokenize_documents(tokenizer, _texts(train_part, field)), _STREAM_UNIGRAM_TOKENS)
        if len(train_sample) < window:
            raise DataError(f"{train_name} have fewer than seq_len+1 = {window} tokens; add documents or lower data.seq_len")
        return PretrainData(
            tokenizer=tokenizer,
            train=train,
            val=val,
            unigram_nll=unigram_nll(torch.from_numpy(train_sample), val, len(tokenizer)),
            num_train_tokens=None,
            description=f"{path} (streaming): {len(val)} validation windows, vocab {len(tokenizer)}",
        )

    windows = pack_windows(tokenize_documents(tokenizer, _texts(train_part, field)), cfg.seq_len)
    if len(windows) == 0:
        raise DataError(f"{train_name} have fewer than seq_len+1 = {window} tokens; add documents or lower data.seq_len")
    return PretrainData(
        tokenizer=tokenizer,
        train=PackedSequences(windows, seed),
        val=val,
        unigram_nll=unigram_nll(windows, val, len(tokenizer)),
        num_train_tokens=windows.numel(),
        description=(
            f"{path}: {len(train_part)} docs, {_human(windows.numel())} tokens in {len(windows)} windows, "
            f"vocab {len(tokenizer)}"
        ),
    )


def _split_val_train(ds: Any, val_docs: int, max_train_docs: int | None) -> tuple[Any, Any]:
    """The first val_docs documents, and up to max_train_docs of the rest."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        train = ds.skip(val_docs)
        return ds.take(val_docs), train if max_train_docs is None else train.take(max_train_docs)
    cut = min(val_docs, len(ds))
    end = len(ds) if max_train_docs is None else min(len(ds), cut + max_train_docs)
    return ds.select(range(cut)), ds.select(range(cut, end))


def _token_prefix(chunks: Iterable[np.ndarray], budget: int) -> np.ndarray:
    """The first `budget` tokens of a chunked token stream (fewer if it ends sooner)."""
    taken: list[np.ndarray] = []
    count = 0
    for chunk in chunks:
        taken.append(chunk[: budget - count])
        count += len(taken[-1])
        if count >= budget:
            break
    return np.concatenate(taken) if taken else np.empty(0, dtype=np.int64)


def _file_builder(path: str) -> str | None:
    """The `datasets` builder for local files, from their extension; None for a directory or hub name."""
    for suffix, builder in _FILE_BUILDERS.items():
        if path.endswith(suffix):
            return builder
    return None


def _text_field(cfg: Any) -> str:
    # The "text" builder always names its one column "text", whatever the config says.
    return "text" if _file_builder(cfg.path) == "text" else cfg.text_field


def _load_dataset(cfg: Any) -> Any:
    ds = load_hf_dataset(cfg.path, cfg.name, cfg.split, streaming=cfg.streaming,
                         keys={"path": "data.path", "name": "data.name", "split": "data.split"})
    if not cfg.streaming and len(ds) == 0:
        raise DataError(f"data.path={cfg.path}: is empty (no documents)")
    return ds


def load_hf_dataset(path: str, name: str | None, split: str, streaming: bool = False,
                    keys: dict[str, str] | None = None) -> Any:
    """A `datasets` split from a hub name, a local directory, or local files (a glob works).

    `keys` names the config keys that hold path, name and split, for the error messages.
    """
    import datasets  # slow to import; only HF runs need it

    datasets.disable_progress_bars()  # the stages report progress themselves; these bars would interleave
    keys = keys or {"path": "path", "name": "name", "split": "split"}
    builder = _file_builder(path)
    if builder is not None:
        files = sorted(glob.glob(os.path.expanduser(path), recursive=True))
        if not files:
            raise DataError(f"{keys['path']}={path}: no such file")
        if all(os.path.getsize(f) == 0 for f in files):
            raise DataError(f"{keys['path']}={path}: is empty (no documents)")
        args: tuple = (builder,)
        kwargs: dict = {"data_files": files}
    else:
        args, kwargs = (path, name), {}
    try:
        return datasets.load_dataset(*args, split=split, streaming=streaming, **kwargs)
    except (datasets.exceptions.DatasetsError, OSError, ValueError, StopIteration) as exc:
        # Offline and unknown hub names, missing directories, bad splits, unreadable files.
        raise DataError(f"{keys['path']}={path}: cannot load it ({keys['name']}={name}, {keys['split']}={split}): "
                        f"{first_line(exc)}") from exc


def _check_text_field(ds: Any, field: str, path: str) -> None:
    columns = ds.column_names
    if columns is None:  # a stream whose features are only known once read
        first = next(iter(ds), None)
        if first is None:
            raise DataError(f"data.path={path}: is empty (no documents)")
        columns = list(first)
    if field not in columns:
        raise ConfigError("data.text_field", f"no such column in data.path={path}; its columns: {', '.join(columns)}", field)


def _texts(ds: Any, field: str) -> Iterator[str]:
    for batch in ds.select_columns([field]).iter(batch_size=_TOKENIZE_BATCH):
        for text in batch[field]:
            if text:
                yield text


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
