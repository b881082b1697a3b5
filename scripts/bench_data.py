"""What prepared data costs: `prepare`'s tokens/s with 1 and 2 workers, the time to fetch a batch at
the start of the corpus and past 90% of it, and the share of a default pre-training step spent
waiting for data.

    python scripts/bench_data.py                       # a 60K-document corpus (about 6M tokens)
    python scripts/bench_data.py --docs 5000 --repeats 3

The corpus is the embedded one written out as JSONL and its tokenizer (512 tokens), so the script
needs no network; a 32K byte-level BPE tokenizes at about the same rate (FINDINGS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ntp_rl.config.compose import compose  # noqa: E402
from ntp_rl.config.schema import DataConfig, DataSource  # noqa: E402
from ntp_rl.data import build_pretrain_data  # noqa: E402
from ntp_rl.data.corpus import sample_documents  # noqa: E402
from ntp_rl.data.shard_writer import prepare_corpus  # noqa: E402
from ntp_rl.data.tokenizer import load_tokenizer, train_embedded_tokenizer  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=60000)
    parser.add_argument("--docs-per-shard", type=int, default=5000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="windows a step (the default pretrain's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = [d for level in (2, 3, 4) for d in sample_documents("pretrain", 0, level, args.docs // 3)]
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        train_embedded_tokenizer(docs[:5000], 512).save_pretrained(tmp / "tokenizer")
        tokenizer = load_tokenizer(str(tmp / "tokenizer"))
        source = DataConfig(source=DataSource.hf, path=str(corpus), val_docs=200)

        print(f"corpus: {len(docs)} documents, {corpus.stat().st_size / 1e6:.1f} MB of JSONL")
        rates = {}
        for workers in (1, 2):
            report = prepare_corpus(source, tmp / f"prepared-{workers}", workers, args.docs_per_shard, tokenizer,
                                    "embedded", say=lambda line: None)
            rates[workers] = report.tokens_per_sec
            print(f"prepare, {workers} worker(s): {report.tokenized_now / 1e6:.2f}M tokens in {report.seconds:.2f} s, "
                  f"{report.tokens_per_sec:,.0f} tokens/s")
        print(f"prepare speed-up, 2 workers over 1: {rates[2] / rates[1]:.2f}x")

        data = build_pretrain_data(DataConfig(source=DataSource.prepared, path=str(tmp / "prepared-1"),
                                              seq_len=args.seq_len), cache_dir=tmp, seed=0)
        train = data.train
        late = int(train.num_windows * 0.95)

        def fetch_at(position: int):
            def fetch():
                train.seek(position)
                train.take(args.batch_size)
            return fetch

        start = median_seconds(fetch_at(0), args.repeats)
        end = median_seconds(fetch_at(late), args.repeats)
        print(f"fetch {args.batch_size} x {args.seq_len + 1} at position 0: {start * 1e3:.3f} ms; at position {late} "
              f"of {train.num_windows} (95%): {end * 1e3:.3f} ms; ratio {end / start:.2f}x")

        # The default pre-training step (model=tiny, batch 16 x 256) against the fetch of its batch.
        from ntp_rl.models import ShapedLossLM, build_model

        cfg = compose("pretrain", [f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch_size}"])
        lm = build_model(cfg.model, len(data.tokenizer), data.tokenizer.pad_token_id, data.tokenizer.eos_token_id)
        model = ShapedLossLM(lm, cfg.loss)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def step():
            batch = train.take(args.batch_size)
            out = model(input_ids=batch[:, :-1], labels=batch[:, 1:])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        step()  # warm-up
        step_time = median_seconds(step, args.repeats)
        wait = median_seconds(fetch_at(late), args.repeats)
        print(f"default tiny pretrain step: {step_time * 1e3:.1f} ms, of which waiting for data {wait * 1e3:.3f} ms: "
              f"data wait {wait / step_time:.2%} of a step")


if __name__ == "__main__":
    main()
