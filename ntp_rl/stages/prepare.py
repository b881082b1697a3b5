"""`ntp-rl prepare`: tokenize a corpus once into token shards (ntp_rl/data/prepared.py).

No run directory and no W&B run: what it makes is data, in prepare.out_dir, described by its
manifest. Killed and run again with the same command, it continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ntp_rl.data.packing import human_count
from ntp_rl.data.shard_writer import prepare_corpus
from ntp_rl.data.tokenizer import load_tokenizer


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    out_dir = Path(cfg.prepare.out_dir).expanduser()
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    print(f"ntp-rl prepare -> {out_dir}: {cfg.data.path} with tokenizer {cfg.data.tokenizer}, "
          f"{cfg.prepare.workers} worker(s)", flush=True)
    report = prepare_corpus(cfg.data, out_dir, cfg.prepare.workers, cfg.prepare.docs_per_shard, tokenizer,
                            cfg.data.tokenizer, say=lambda line: print(line, flush=True))
    manifest = report.manifest
    if report.tokenized_now:
        print(f"done: {human_count(manifest['train_tokens'])} training tokens ({manifest['train_docs']} documents) in "
              f"{len(manifest['shards'])} shards, {manifest['val']['tokens']} validation tokens, {manifest['dtype']}; "
              f"{report.tokens_per_sec:,.0f} tokens/s\n  train with: ntp-rl pretrain data=prepared data.path={out_dir}",
              flush=True)
    return manifest
