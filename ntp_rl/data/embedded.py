"""The embedded corpus, generated, tokenized, packed and cached on disk.

The cache is keyed by everything that shapes it (corpus settings, sequence length, and the
tokenizer by content), and built beside its final place and renamed into it, so a reader
sees a whole cache or none, and concurrent runs never corrupt one another's.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from ntp_rl.config.schema import SolutionOrder
from ntp_rl.data.corpus import sample_documents
from ntp_rl.data.packing import PackedSequences, PretrainData, human_count, pack_windows, tokenize_documents, unigram_nll
from ntp_rl.data.tokenizer import load_tokenizer, train_embedded_tokenizer
from ntp_rl.errors import ConfigError
from ntp_rl.io import build_directory_atomically

# Bump when anything that shapes the embedded cache changes (corpus, tokenizer, packing),
# so old caches are rebuilt instead of silently reused.
FORMAT_VERSION = 1


def _embedded_cache_dir(cfg: Any, cache_dir: Path, tokenizer_name: str | None) -> tuple[Path, dict]:
    """Where the corpus tokenized by `tokenizer_name` (None: its own trained tokenizer) is cached.

    A checkpoint's tokenizer is usually a copy of the corpus's own, so a tokenizer directory
    counts by its content, not its path: every eval of every checkpoint of a study then reads
    the cache that pre-training built instead of tokenizing the corpus again.
    """
    order = _solution_order(cfg)

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
            # only when set, so that caches built before the key existed are still found
            **({"solution_order": order} if order != SolutionOrder.given.value else {}),
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


def _solution_order(cfg: Any) -> str:
    return SolutionOrder(cfg.solution_order).value


def _tokenizer_fingerprint(name: str) -> str | None:
    """A hash of a tokenizer directory's tokenizer.json (vocabulary, merges, special tokens); None for hub names."""
    file = Path(name) / "tokenizer.json"
    if not file.is_file():
        return None
    return "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()[:16]


def build_embedded_data(cfg: Any, cache_dir: Path, seed: int, tokenizer_name: str | None) -> PretrainData:
    target, settings = _embedded_cache_dir(cfg, cache_dir, tokenizer_name)
    if settings["tokenizer"] is None:
        tokenizer_name = None  # the cache's own tokenizer, the same one by content
    if not target.is_dir():
        build_directory_atomically(target, lambda tmp: _write_embedded(cfg, settings, tmp, tokenizer_name),
                                   what="the corpus cache")
    tokenizer = load_tokenizer(tokenizer_name or str(target / "tokenizer"))
    train = torch.load(target / "train.pt", weights_only=True)
    val = torch.load(target / "val.pt", weights_only=True)
    description = (
        f"embedded corpus (difficulty {cfg.difficulty}{', solutions in any order' if _solution_order(cfg) == 'any' else ''}): "
        f"{cfg.num_train_docs} docs, "
        f"{human_count(train.numel())} tokens in {len(train)} windows, vocab {len(tokenizer)}"
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
    order = _solution_order(cfg)
    train_docs = sample_documents("pretrain", cfg.seed, cfg.difficulty, cfg.num_train_docs, order)
    # Validation comes from the held-out test split: no pre-training document shares its arithmetic.
    val_docs = sample_documents("test", cfg.seed, cfg.difficulty, cfg.num_val_docs, order)
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
