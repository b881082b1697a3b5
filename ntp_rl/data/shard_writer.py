"""`ntp-rl prepare`: a corpus tokenized once into the token shards `prepared.py` describes and reads.

A shard is written beside its final name and renamed into place, and only then entered in the
manifest, so a killed `prepare` leaves no half-written shard that looks complete; run again, it
tokenizes only the shards the manifest lacks.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ntp_rl.data.packing import human_count, tokenize_documents
from ntp_rl.data.prepared import (FORMAT_VERSION, MANIFEST, TOKENIZER_DIR, UNIGRAM_COUNTS, read_manifest,
                                  token_dtype, tokenizer_digest, vocab_size_of)
from ntp_rl.errors import UserError
from ntp_rl.io import write_json_atomic


@dataclass
class PrepareReport:
    manifest: dict
    tokenized_now: int  # tokens tokenized by this call (0 when everything was already there)
    seconds: float

    @property
    def tokens_per_sec(self) -> float:
        return self.tokenized_now / max(self.seconds, 1e-9)


def prepare_corpus(data_cfg: Any, out_dir: Path, workers: int, docs_per_shard: int, tokenizer: Any,
                   tokenizer_name: str, say: Callable[[str], None] = print) -> PrepareReport:
    """Tokenize `data_cfg`'s source into shards under out_dir, continuing a previous, unfinished call."""
    from ntp_rl.data.hf import TextRows, _check_text_field, _load_dataset, _text_field

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(out_dir):
        source = {"path": data_cfg.path, "name": data_cfg.name, "split": data_cfg.split,
                  "text_field": _text_field(data_cfg), "val_docs": int(data_cfg.val_docs),
                  "max_train_docs": data_cfg.max_train_docs, "docs_per_shard": docs_per_shard}
        vocab = vocab_size_of(tokenizer)
        manifest = _start_manifest(out_dir, source, tokenizer, tokenizer_name, vocab)
        if manifest.get("complete"):
            say(f"{out_dir}: already prepared ({human_count(manifest['train_tokens'])} training tokens); nothing to do")
            return PrepareReport(manifest, 0, 0.0)
        ds = _load_dataset(data_cfg)
        _check_text_field(ds, source["text_field"], data_cfg.path)
        rows = TextRows(source["text_field"], data_cfg.path)
        texts = rows.texts(ds)
        if data_cfg.max_train_docs is not None:
            texts = itertools.islice(texts, int(data_cfg.val_docs) + int(data_cfg.max_train_docs))
        started = time.perf_counter()
        tokenized = _write_val(out_dir, manifest, texts, int(data_cfg.val_docs), tokenizer, data_cfg.path)
        tokenized += _write_train(out_dir, manifest, texts, workers, docs_per_shard, vocab, say)
        _finish_manifest(out_dir, manifest, vocab, data_cfg.path)
        return PrepareReport(manifest, tokenized, time.perf_counter() - started)


class _exclusive:
    """One `prepare` writes a directory at a time: a second one is refused, not interleaved."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".prepare.lock"

    def __enter__(self) -> None:
        self.handle = open(self.path, "w")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.close()
            raise UserError(f"prepare.out_dir={self.path.parent}: another `ntp-rl prepare` is writing it; wait for it "
                            "to finish, or choose another prepare.out_dir") from None

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()


def _start_manifest(out_dir: Path, source: dict, tokenizer: Any, tokenizer_name: str, vocab: int) -> dict:
    """The manifest of an unfinished (or finished) call with the same inputs, else a new one."""
    digest = tokenizer_digest(tokenizer)
    path = out_dir / MANIFEST
    if path.exists():
        manifest = read_manifest(out_dir)
        had = {"source": manifest["source"], "tokenizer": manifest["tokenizer"]["sha256"]}
        if had != {"source": source, "tokenizer": digest}:
            changed = [k for k in source if manifest["source"].get(k) != source[k]]
            changed += ["data.tokenizer"] if manifest["tokenizer"]["sha256"] != digest else []
            raise UserError(f"prepare.out_dir={out_dir}: holds a corpus prepared with other settings "
                            f"({', '.join(changed)}); choose another prepare.out_dir, or delete it to start over")
        return manifest
    _save_tokenizer(out_dir, tokenizer)
    manifest = {"format": FORMAT_VERSION, "complete": False, "source": source,
                "tokenizer": {"name": tokenizer_name, "sha256": digest, "vocab_size": vocab,
                              "eos_token_id": tokenizer.eos_token_id},
                "dtype": token_dtype(vocab).name, "val": None, "shards": []}
    write_json_atomic(path, manifest)
    return manifest


def _save_tokenizer(out_dir: Path, tokenizer: Any) -> None:
    from ntp_rl.io import build_directory_atomically

    target = out_dir / TOKENIZER_DIR
    if not target.is_dir():
        build_directory_atomically(target, tokenizer.save_pretrained, what="the tokenizer")


def _take(items: Iterator[str], n: int) -> list[str]:
    return list(itertools.islice(items, n))


def _write_val(out_dir: Path, manifest: dict, texts: Iterator[str], val_docs: int, tokenizer: Any, path: str) -> int:
    docs = _take(texts, val_docs)  # always read: the training documents start after them
    if manifest["val"] is not None:
        return 0
    if len(docs) < val_docs:
        from ntp_rl.data.hf import too_few_documents

        raise too_few_documents(path, len(docs), val_docs)
    tokens = np.concatenate(list(tokenize_documents(tokenizer, docs)))
    _write_shard(out_dir / "val.bin", tokens, np.dtype(manifest["dtype"]))
    manifest["val"] = {"file": "val.bin", "tokens": int(len(tokens)), "docs": len(docs)}
    write_json_atomic(out_dir / MANIFEST, manifest)
    return len(tokens)


def _write_train(out_dir: Path, manifest: dict, texts: Iterator[str], workers: int, docs_per_shard: int,
                 vocab: int, say: Callable[[str], None]) -> int:
    """Shard k holds training documents k * docs_per_shard onwards; shards already in the manifest are skipped
    (their documents are read past, not tokenized). Results are entered in shard order."""
    from tqdm import tqdm

    done = {shard["index"] for shard in manifest["shards"]}
    dtype = np.dtype(manifest["dtype"])
    tokenized = 0
    bar = tqdm(desc="prepare", unit="tok", unit_scale=True, disable=not sys.stderr.isatty(), mininterval=1.0)
    started, last_said = time.perf_counter(), time.perf_counter()

    def enter(result: dict) -> None:
        nonlocal tokenized, last_said
        manifest["shards"].append(result)
        manifest["shards"].sort(key=lambda s: s["index"])
        write_json_atomic(out_dir / MANIFEST, manifest)
        tokenized += result["tokens"]
        bar.update(result["tokens"])
        if not bar.disable:
            return
        now = time.perf_counter()
        if now - last_said >= 10.0:  # plain progress lines off a terminal
            say(f"  prepare: {len(manifest['shards'])} shards, {human_count(tokenized)} tokens this call "
                f"({tokenized / (now - started):,.0f} tokens/s)")
            last_said = now

    jobs = ((index, docs) for index, docs in enumerate(iter(lambda: _take(texts, docs_per_shard), [])) if index not in done)
    try:
        if workers <= 1:
            _init_worker(str(out_dir / TOKENIZER_DIR))
            for index, docs in jobs:
                enter(_tokenize_shard(str(out_dir), index, docs, dtype.name, vocab))
        else:
            import multiprocessing

            # fork where there is one: a spawned worker spends seconds importing torch and transformers. The
            # tokenizers library turns its own thread pool off in a forked child, so a fork cannot deadlock in it.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker,
                                     initargs=(str(out_dir / TOKENIZER_DIR),)) as pool:
                pending = []
                for index, docs in jobs:
                    pending.append(pool.submit(_tokenize_shard, str(out_dir), index, docs, dtype.name, vocab))
                    if len(pending) >= 2 * workers:  # bounded: a streamed corpus is never held in memory
                        enter(pending.pop(0).result())
                for future in pending:
                    enter(future.result())
    finally:
        bar.close()
    return tokenized


_worker_tokenizer: Any = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    from ntp_rl.data.tokenizer import load_tokenizer

    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _tokenize_shard(out_dir: str, index: int, docs: list[str], dtype: str, vocab: int) -> dict:
    tokens = np.concatenate(list(tokenize_documents(_worker_tokenizer, docs)))
    name = f"train-{index:05d}.bin"
    # The shard's token counts go first: a shard under its name always has them beside it.
    _write_shard(Path(out_dir) / _counts_file(name), np.bincount(tokens, minlength=vocab), np.dtype(np.int64))
    _write_shard(Path(out_dir) / name, tokens, np.dtype(dtype))
    return {"index": index, "file": name, "tokens": int(len(tokens)), "docs": len(docs)}


def _counts_file(shard: str) -> str:
    return f".{shard}.counts"


def _write_shard(path: Path, tokens: np.ndarray, dtype: np.dtype) -> None:
    """Beside its final name, flushed to disk, then renamed: a file under its name is always whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            tokens.astype(dtype).tofile(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise UserError(f"prepare.out_dir={path.parent}: no space left on the device while writing {path.name}; "
                            "free some space and run the same command again (finished shards are kept)") from None
        raise


def _finish_manifest(out_dir: Path, manifest: dict, vocab: int, path: str) -> None:
    if not manifest["shards"]:
        from ntp_rl.data.hf import too_few_documents

        val_docs = manifest["source"]["val_docs"]
        raise too_few_documents(path, val_docs, val_docs)
    counts = np.zeros(vocab, dtype=np.int64)
    for shard in manifest["shards"]:
        counts += np.fromfile(out_dir / _counts_file(shard["file"]), dtype=np.int64)
    _write_shard(out_dir / UNIGRAM_COUNTS, counts, np.dtype(np.int64))
    manifest["train_tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["train_docs"] = sum(s["docs"] for s in manifest["shards"])
    manifest["complete"] = True
    write_json_atomic(out_dir / MANIFEST, manifest)
    for shard in manifest["shards"]:
        (out_dir / _counts_file(shard["file"])).unlink(missing_ok=True)
