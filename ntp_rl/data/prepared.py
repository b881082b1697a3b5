"""Corpora tokenized once into token shards on disk, read by position (`ntp-rl prepare`, `data=prepared`).

The format is the one OLMo and nanoGPT read: raw arrays of token ids (numpy memmaps) in the
smallest unsigned type that holds the vocabulary, each document followed by EOS, beside a
manifest.json. Any tool reads a shard with `np.memmap(path, dtype=manifest["dtype"])`.

    <dir>/manifest.json         what was prepared from what, and every finished shard
    <dir>/tokenizer/            the tokenizer the ids belong to
    <dir>/val.bin               the first data.val_docs documents, for validation
    <dir>/train-00000.bin ...   the rest, prepare.docs_per_shard documents a shard
    <dir>/unigram_counts.bin    token counts over the training shards (the unigram baseline)

shard_writer.py writes them; this module holds the format and reads it.

Training reads windows of seq_len + 1 tokens cut from each shard (a shard's last partial window
is dropped). The order of windows is a seeded pseudo-random permutation per epoch computed for
any position on its own (`WindowOrder`), so a run starts, resumes and splits across processes
by arithmetic alone: no replay, no index in memory, and every process reads only its own rows.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ntp_rl.data.packing import PretrainData, human_count, pack_windows
from ntp_rl.errors import DataError
from ntp_rl.seeding import mix_seed

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
UNIGRAM_COUNTS = "unigram_counts.bin"  # int64, one count per token id


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every id: 2 bytes a token up to 65,536 ids."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenizer_digest(tokenizer: Any) -> str:
    """What the ids mean: a hash of the tokenizer's full definition (vocabulary, merges, special tokens)."""
    if getattr(tokenizer, "is_fast", False):
        text = tokenizer.backend_tokenizer.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def vocab_size_of(tokenizer: Any) -> int:
    """Ids up to the largest the tokenizer hands out (some exceed len(tokenizer))."""
    return max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)


def read_manifest(directory: Path, key: str = "prepare.out_dir") -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{key}={directory}: no prepared corpus there (no {MANIFEST}); make one with `ntp-rl prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{key}={directory}: {MANIFEST} cannot be read ({exc})") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{key}={directory}: prepared in format {manifest.get('format')}, this ntp-rl reads "
                        f"{FORMAT_VERSION}; prepare it again")
    return manifest


class WindowOrder:
    """A pseudo-random permutation of range(n) per (seed, epoch), evaluated at any position in O(1).

    A 4-round Feistel network over the smallest even power of two >= n, walked until it lands
    inside range(n) (a bijection on the larger domain restricted by cycle walking stays one on
    range(n); at most 4x the domain, so a few steps on average). Nothing of size n is ever built.
    """

    ROUNDS = 4

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("an order needs at least one window")
        self.n = n
        self.seed = seed
        self.half = max(1, math.ceil(math.log2(max(n, 2)) / 2))
        self.mask = np.uint64((1 << self.half) - 1)

    def __call__(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        keys = [np.uint64(mix_seed("window-order", self.seed, epoch, r) & (2**64 - 1)) for r in range(self.ROUNDS)]
        out = self._encrypt(positions.astype(np.uint64), keys)
        outside = out >= self.n
        while outside.any():
            out[outside] = self._encrypt(out[outside], keys)
            outside = out >= self.n
        return out.astype(np.int64)

    def _encrypt(self, x: np.ndarray, keys: list[np.uint64]) -> np.ndarray:
        half = np.uint64(self.half)
        left, right = x >> half, x & self.mask
        for key in keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << half) | right


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit moves every output bit (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class PreparedSequences:
    """Training windows of a prepared corpus in a seeded order; `take(n, rows)` reads only the rows asked for."""

    def __init__(self, directory: Path, manifest: dict, seq_len: int, seed: int):
        self.seq_len = seq_len
        self.width = seq_len + 1
        dtype = np.dtype(manifest["dtype"])
        self.shards = [np.memmap(Path(directory) / s["file"], dtype=dtype, mode="r") for s in manifest["shards"]]
        per_shard = np.array([len(shard) // self.width for shard in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(per_shard)])
        self.num_windows = int(self.starts[-1])
        self.order = WindowOrder(self.num_windows, seed) if self.num_windows else None
        self.position = 0

    def window_ids(self, positions: np.ndarray) -> np.ndarray:
        """The corpus windows at these training positions."""
        epochs, offsets = np.divmod(positions.astype(np.int64), self.num_windows)
        out = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            out[where] = self.order(int(epoch), offsets[where])
        return out

    def read(self, positions: np.ndarray) -> torch.Tensor:
        """The windows at these training positions, [len(positions), seq_len + 1]; the position does not move."""
        ids = self.window_ids(positions)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        out = np.empty((len(ids), self.width), dtype=np.int64)
        for row, (window, shard) in enumerate(zip(ids, shard_of)):
            start = (window - self.starts[shard]) * self.width
            out[row] = self.shards[shard][start:start + self.width]
        return torch.from_numpy(out)

    def take(self, n: int, rows: Optional[slice] = None) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"cannot take {n} windows")
        positions = np.arange(self.position, self.position + n, dtype=np.int64)
        self.position += n
        return self.read(positions if rows is None else positions[rows])

    def seek(self, position: int) -> None:
        if position < 0:
            raise ValueError(f"cannot seek to position {position}")
        self.position = position


class MixedSequences:
    """Several prepared corpora drawn in fixed proportions (`data.sources`), deterministically.

    Positions come in blocks of BLOCK; each block holds every source's share of it (weights rounded
    by largest remainder, so each block's proportions match the weights to 1/BLOCK) in an order
    shuffled per block and seed. How many windows a source gave before any position is then
    arithmetic, so a mixture seeks in constant time too; each source keeps its own epochs and order.
    """

    BLOCK = 1000

    def __init__(self, names: list[str], sources: list[PreparedSequences], weights: list[float], seed: int):
        self.names, self.sources = names, sources
        self.seq_len = sources[0].seq_len
        self.width = self.seq_len + 1
        self.seed = seed
        shares = np.array(weights, dtype=np.float64) / sum(weights) * self.BLOCK
        per_block = np.floor(shares).astype(np.int64)
        for index in np.argsort(-(shares - per_block), kind="stable")[: self.BLOCK - int(per_block.sum())]:
            per_block[index] += 1
        self.per_block = per_block
        self.labels = np.repeat(np.arange(len(sources)), per_block)
        self.position = 0
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The block's source at each offset, and how many of the block's positions before it are that source's."""
        if self._cached is None or self._cached[0] != block:
            rng = np.random.default_rng(mix_seed("mixture", self.seed, block))
            labels = rng.permutation(self.labels)
            rank = np.empty(self.BLOCK, dtype=np.int64)
            for source in range(len(self.sources)):
                where = labels == source
                rank[where] = np.arange(int(where.sum()))
            self._cached = (block, labels, rank)
        return self._cached[1], self._cached[2]

    def locate(self, position: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For positions position .. position + n - 1: the source, and the position within that source."""
        blocks, offsets = np.divmod(np.arange(position, position + n, dtype=np.int64), self.BLOCK)
        which = np.empty(n, dtype=np.int64)
        inner = np.empty(n, dtype=np.int64)
        for block in np.unique(blocks):
            where = blocks == block
            labels, rank = self._block(int(block))
            which[where] = labels[offsets[where]]
            inner[where] = block * self.per_block[which[where]] + rank[offsets[where]]
        return which, inner

    def take(self, n: int, rows: Optional[slice] = None) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"cannot take {n} windows")
        which, inner = self.locate(self.position, n)
        self.position += n
        if rows is not None:
            which, inner = which[rows], inner[rows]
        out = torch.empty((len(which), self.width), dtype=torch.long)
        for source in np.unique(which):
            where = which == source
            out[torch.from_numpy(where)] = self.sources[source].read(inner[where])
        return out

    def seek(self, position: int) -> None:
        if position < 0:
            raise ValueError(f"cannot seek to position {position}")
        self.position = position

    def tokens_by_source(self) -> dict[str, int]:
        """Tokens each source has given so far (over all processes): what the run logs as data/<name>_tokens."""
        block, offset = divmod(self.position, self.BLOCK)
        labels, _ = self._block(block)
        seen = block * self.per_block + np.bincount(labels[:offset], minlength=len(self.sources))
        return {name: int(count) * self.width for name, count in zip(self.names, seen)}


@dataclass
class _Corpus:
    directory: Path
    manifest: dict


def _open_corpus(directory: Path, key: str, tokenizer_name: Optional[str], tokenizer: Any = None) -> _Corpus:
    """A finished prepared corpus, checked against the tokenizer the run uses."""
    from ntp_rl.data.tokenizer import load_tokenizer

    manifest = read_manifest(directory, key=key)
    if not manifest.get("complete"):
        raise DataError(f"{key}={directory}: its preparation has not finished; run the same `ntp-rl prepare` "
                        "command again to complete it")
    if tokenizer_name is not None or tokenizer is not None:
        wanted = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_name)
        if tokenizer_digest(wanted) != manifest["tokenizer"]["sha256"]:
            shown = tokenizer_name or "the first source's"
            raise DataError(f"{key}={directory}: was prepared with the tokenizer {manifest['tokenizer']['name']}, "
                            f"which differs from this run's ({shown}); prepare the corpus with "
                            f"data.tokenizer={tokenizer_name or '<that tokenizer>'}, or train with the tokenizer it "
                            "was made with")
    return _Corpus(directory, manifest)


def _windows(corpus: _Corpus, key: str, seq_len: int, seed: int) -> PreparedSequences:
    train = PreparedSequences(corpus.directory, corpus.manifest, seq_len, seed)
    if train.num_windows == 0:
        raise DataError(f"{key}={corpus.directory}: no shard holds seq_len+1 = {seq_len + 1} tokens; lower "
                        "data.seq_len or prepare with a larger prepare.docs_per_shard")
    return train


def build_prepared_data(cfg: Any, seed: int, tokenizer_name: Optional[str]) -> PretrainData:
    """data=prepared: the corpus `ntp-rl prepare` wrote at data.path (or the mixture data.sources), with the
    tokenizer it was made with. A mixture validates on its first source."""
    from ntp_rl.data.tokenizer import load_tokenizer

    specs = [(str(s.path), float(s.weight)) for s in cfg.sources] if cfg.sources else [(str(cfg.path), 1.0)]
    keys = [f"data.sources[{i}].path" for i in range(len(specs))] if cfg.sources else ["data.path"]
    first = _open_corpus(Path(specs[0][0]), keys[0], tokenizer_name)
    tokenizer = load_tokenizer(str(first.directory / TOKENIZER_DIR))
    corpora = [first] + [_open_corpus(Path(path), key, tokenizer_name, tokenizer if tokenizer_name is None else None)
                         for (path, _), key in zip(specs[1:], keys[1:])]
    windows = [_windows(c, key, cfg.seq_len, mix_seed("source", seed, i) if cfg.sources else seed)
               for i, (c, key) in enumerate(zip(corpora, keys))]
    directory, manifest = first.directory, first.manifest
    if cfg.sources:
        names = _source_names([path for path, _ in specs])
        train: Any = MixedSequences(names, windows, [w for _, w in specs], seed)
        order_key = "mixture:" + hashlib.sha256(json.dumps(
            [[data_order_key(c.manifest, cfg.seq_len), w] for c, (_, w) in zip(corpora, specs)]).encode()).hexdigest()[:16]
        description = "mixture of " + ", ".join(f"{name} ({w:g})" for name, (_, w) in zip(names, specs)) + \
            f"; validation on {names[0]}"
    else:
        train = windows[0]
        order_key = data_order_key(manifest, cfg.seq_len)
        description = (f"{directory} (prepared from {manifest['source']['path']}): "
                       f"{human_count(manifest['train_tokens'])} tokens in {len(manifest['shards'])} shards, "
                       f"{train.num_windows} windows, vocab {len(tokenizer)}")
    dtype = np.dtype(manifest["dtype"])
    val_tokens = np.fromfile(directory / manifest["val"]["file"], dtype=dtype).astype(np.int64)
    val = pack_windows([val_tokens], cfg.seq_len)
    if len(val) == 0:
        raise DataError(f"{keys[0]}={directory}: its validation documents have fewer than seq_len+1 = "
                        f"{cfg.seq_len + 1} tokens; prepare with a larger data.val_docs or lower data.seq_len")
    counts = torch.from_numpy(np.fromfile(directory / UNIGRAM_COUNTS, dtype=np.int64)).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return PretrainData(
        tokenizer=tokenizer, train=train, val=val,
        unigram_nll=float(-log_probs[val.flatten()].mean()),
        num_train_tokens=sum(w.num_windows for w in windows) * (cfg.seq_len + 1),
        description=description,
        order_key=order_key,
    )


def _source_names(paths: list[str]) -> list[str]:
    """Each source's name in the logs: its directory's name, numbered where two share one."""
    names = [Path(path).name or f"source{i}" for i, path in enumerate(paths)]
    return [name if names.count(name) == 1 else f"{name}{i}" for i, name in enumerate(names)]


def data_order_key(manifest: dict, seq_len: int) -> str:
    """What the order of training windows depends on besides the seed: the corpus and the window size."""
    shards = [(s["file"], s["tokens"]) for s in manifest["shards"]]
    digest = hashlib.sha256(json.dumps([manifest["tokenizer"]["sha256"], shards, seq_len]).encode()).hexdigest()[:16]
    return f"prepared:{digest}"
