"""Data: the embedded procedural corpus, tokenizers, and packed pre-training sequences.

    corpus.py     the procedural arithmetic problems (pre-training text, RL and test problems)
    tokenizer.py  the locally trained BPE, or any HF tokenizer
    packing.py    tokenizing, packing into windows, resumable training order
    embedded.py   the embedded corpus, tokenized and cached on disk
    hf.py         text from any `datasets` source; the dataset loader tasks share
    prepared.py   corpora tokenized once into token shards: the format, read by position
    shard_writer.py  `ntp-rl prepare`: writing those shards, resumably, with worker processes
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ntp_rl.config.schema import DataSource
from ntp_rl.data.packing import PretrainData
from ntp_rl.errors import ConfigError


def build_pretrain_data(data_cfg: Any, *, cache_dir: Path, seed: int,
                        tokenizer_name_or_path: str | None = None) -> PretrainData:
    """Tokenizer, training windows, validation windows and the unigram baseline.

    `seed` is the run's seed and only orders the training windows; the embedded
    corpus itself comes from `data_cfg.seed`. A tokenizer named here (the model's)
    wins over `data_cfg.tokenizer`.
    """
    tokenizer_name = tokenizer_name_or_path or data_cfg.tokenizer
    if data_cfg.source is DataSource.embedded:
        from ntp_rl.data.embedded import build_embedded_data

        return build_embedded_data(data_cfg, Path(cache_dir), seed, tokenizer_name)
    if data_cfg.source is DataSource.prepared:
        from ntp_rl.data.prepared import build_prepared_data

        return build_prepared_data(data_cfg, seed, tokenizer_name)
    if not tokenizer_name:
        raise ConfigError(
            "data.tokenizer",
            "is required with data.source=hf unless the model brings its own (model.arch=hf); "
            "give a tokenizer name or directory",
        )
    from ntp_rl.data.hf import build_hf_data
    from ntp_rl.data.tokenizer import load_tokenizer

    return build_hf_data(data_cfg, seed, load_tokenizer(tokenizer_name))
