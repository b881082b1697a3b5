"""Pre-training text from any `datasets` source (hub name, local directory or files), and the
loader the tasks share for hub / local datasets."""

from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ntp_rl.data.packing import (TOKENIZE_BATCH, PackedSequences, PretrainData, StreamingSequences, human_count,
                                 pack_windows, tokenize_documents, unigram_nll)
from ntp_rl.errors import ConfigError, DataError, first_line

_STREAM_SHUFFLE_TOKENS = 2**20  # streaming: tokens held in the shuffle buffer
_STREAM_UNIGRAM_TOKENS = 2**20  # streaming: train tokens the unigram baseline is fit on

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}


def build_hf_data(cfg: Any, seed: int, tokenizer: PreTrainedTokenizerBase) -> PretrainData:
    path, field = cfg.path, _text_field(cfg)
    ds = _load_dataset(cfg)
    _check_text_field(ds, field, path)
    window = cfg.seq_len + 1
    val_part, train_part = _split_val_train(ds, cfg.val_docs, cfg.max_train_docs, path)
    rows = TextRows(field, path)
    val = pack_windows(tokenize_documents(tokenizer, rows.texts(val_part)), cfg.seq_len)
    if len(val) == 0:
        raise DataError(
            f"data.path={path}: the validation documents (the first data.val_docs={cfg.val_docs}) have fewer "
            f"than seq_len+1 = {window} tokens; raise data.val_docs or lower data.seq_len"
        )
    train_name = f"data.path={path}: the training documents (after the first data.val_docs={cfg.val_docs})"

    if cfg.streaming:
        train = StreamingSequences(
            lambda: TextRows(field, path).texts(train_part, first_row=cfg.val_docs),
            tokenizer,
            cfg.seq_len,
            seed=seed,
            shuffle_windows=max(1, _STREAM_SHUFFLE_TOKENS // window),
            name=train_name,
        )
        # The unigram baseline is fit on a prefix of the stream: all of it may not fit in memory.
        train_sample = _token_prefix(tokenize_documents(tokenizer, rows.texts(train_part, first_row=cfg.val_docs)),
                                     _STREAM_UNIGRAM_TOKENS)
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

    windows = pack_windows(tokenize_documents(tokenizer, rows.texts(train_part, first_row=len(val_part))), cfg.seq_len)
    if len(windows) == 0:
        raise DataError(f"{train_name} have fewer than seq_len+1 = {window} tokens; add documents or lower data.seq_len")
    return PretrainData(
        tokenizer=tokenizer,
        train=PackedSequences(windows, seed),
        val=val,
        unigram_nll=unigram_nll(windows, val, len(tokenizer)),
        num_train_tokens=windows.numel(),
        description=(
            f"{path}: {len(train_part) - rows.skipped_train} docs, {human_count(windows.numel())} tokens in "
            f"{len(windows)} windows, vocab {len(tokenizer)}"
        ),
        skipped_rows=rows.skipped,
    )


def too_few_documents(path: str, docs: int, val_docs: int) -> DataError:
    """A corpus with no document left to train on after the validation ones: what is true, and what will work
    (a smaller data.val_docs only when there are two documents or more)."""
    if docs < 2:
        fix = (f"data.val_docs is at least 1, so a corpus of {docs} document(s) cannot be split: add documents "
               "(2 or more: one held out, the rest trained on)")
    else:
        fix = f"set data.val_docs to at most {docs - 1} (e.g. data.val_docs={max(1, docs // 10)}) or add documents"
    return DataError(f"data.path={path}: has {docs} document(s) with text, not more than data.val_docs={val_docs} "
                     f"(the first data.val_docs are held out for validation, the rest trained on); {fix}")


def _split_val_train(ds: Any, val_docs: int, max_train_docs: int | None, path: str) -> tuple[Any, Any]:
    """The first val_docs documents, and up to max_train_docs of the rest."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        train = ds.skip(val_docs)
        return ds.take(val_docs), train if max_train_docs is None else train.take(max_train_docs)
    if len(ds) <= val_docs:
        raise too_few_documents(path, len(ds), val_docs)
    cut = val_docs
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


class TextRows:
    """The text of each row. A row whose field is null or empty is skipped and counted (the run
    says how many); a row whose field holds something else than text is refused, naming it."""

    def __init__(self, field: str, path: str):
        self.field, self.path = field, path
        self.skipped = 0
        self.skipped_train = 0  # of which after the validation documents

    def texts(self, ds: Any, first_row: int = 0) -> Iterator[str]:
        row = first_row
        for batch in ds.select_columns([self.field]).iter(batch_size=TOKENIZE_BATCH):
            for text in batch[self.field]:
                if isinstance(text, str) and text:
                    yield text
                elif text is None or text == "":
                    self.skipped += 1
                    self.skipped_train += first_row > 0
                else:
                    raise ConfigError("data.text_field", f"row {row} of data.path={self.path} holds "
                                      f"{type(text).__name__} {str(text)[:40]}, not text", self.field)
                row += 1
