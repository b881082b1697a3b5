"""Packed pre-training sequences: documents tokenized, each followed by EOS, concatenated and
cut into consecutive windows of seq_len + 1 tokens (a window's first seq_len tokens are the
input, its last seq_len the labels; the remainder that does not fill a window is dropped).

Training order is a pure function of (run seed, position), so a resumed run asks for
`seek(position)` and continues with exactly the windows it would have seen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Protocol

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ntp_rl.errors import DataError
from ntp_rl.seeding import mix_seed

TOKENIZE_BATCH = 1000  # documents per tokenizer call


class SequenceSource(Protocol):
    seq_len: int
    position: int  # windows handed out so far: the resumable data position

    def take(self, n: int, rows: Optional[slice] = None) -> torch.Tensor:
        """The next n windows, LongTensor [n, seq_len + 1], or only `rows` of them (a process's share of a
        global batch); advances position by n."""
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
    skipped_rows: int = 0  # rows without text (null or empty field), left out
    # What the training order depends on besides the seed, saved with each checkpoint so that a resume on other
    # data is refused; None where the order has no such key.
    order_key: str | None = None


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> Iterator[np.ndarray]:
    """Token ids of the texts, each document followed by EOS, one flat array per batch.

    Empty documents are skipped: they would only add runs of EOS.
    """
    eos = tokenizer.eos_token_id
    batch: list[str] = []
    for text in texts:
        if text:
            batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
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

    def take(self, n: int, rows: Optional[slice] = None) -> torch.Tensor:
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
        return self.windows[index if rows is None else index[rows]]

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

    def take(self, n: int, rows: Optional[slice] = None) -> torch.Tensor:
        if n < 0:
            raise ValueError(f"cannot take {n} windows")
        if n == 0:
            return torch.empty(0, self.seq_len + 1, dtype=torch.long)
        batch = torch.stack([next(self._windows) for _ in range(n)])  # a stream is read whole by every process
        self.position += n
        return batch if rows is None else batch[rows]

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




def human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
