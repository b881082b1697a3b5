"""What a sharded checkpoint's Hugging Face export costs: the old way (the whole model gathered onto rank 0,
then save_pretrained) against ntp_rl/export.py's (a layer group at a time), on 2 CPU processes over gloo.

    python scripts/bench_export.py                          # model=tiny with Qwen3's 151,936-token vocabulary
    python scripts/bench_export.py --vocab 512 --repeats 3

Prints each way's median time and the most bytes of whole tensors rank 0 held at once.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def gathered(out: Path, lm: torch.nn.Module, is_main: bool) -> int:
    from ntp_rl import sharding
    from ntp_rl.export import exported_names

    full = sharding.full_state_dict(lm)
    if not is_main:
        return 0
    keep = set(exported_names(lm))
    lm.save_pretrained(out, state_dict={k: v for k, v in full.items() if k in keep})
    return sum(v.nbytes for v in full.values())


def streamed(out: Path, lm: torch.nn.Module, is_main: bool) -> int:
    from ntp_rl.export import write_streamed

    report = write_streamed(out, lm, is_main)
    return report.peak_held_bytes if report is not None else 0


def work(rank: int, port: int, args: argparse.Namespace, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from ntp_rl import sharding
    from ntp_rl.config.compose import compose
    from ntp_rl.models import build_model

    torch.manual_seed(0)
    cfg = compose("pretrain", [f"model={args.model}"])
    lm = build_model(cfg.model, vocab_size=args.vocab, pad_token_id=0, eos_token_id=1)
    sharding.shard(lm, lm, torch.device("cpu"), bf16=False)
    times: dict[str, list[float]] = {"gathered": [], "streamed": []}
    held: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, write in (("gathered", gathered), ("streamed", streamed)):
            out = Path(root) / name
            if rank == 0:
                shutil.rmtree(out, ignore_errors=True)
            dist.barrier()
            start = time.perf_counter()
            held[name] = write(out, lm, rank == 0)
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        size = sum(p.stat().st_size for p in (Path(root) / "streamed").glob("*.safetensors"))
        print(f"model={args.model}, vocab {args.vocab}: {size / 1e6:.1f} MB of weights, 2 processes (gloo), "
              f"median of {args.repeats}")
        base = statistics.median(times["gathered"])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            print(f"{name:<9} {median:.3f} s  {median / base:.2f}x gathered time  "
                  f"{held[name] / 1e6:.1f} MB held at once on rank 0")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as probe:  # a free port for the process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as root:
        mp.spawn(work, args=(port, args, root), nprocs=2)


if __name__ == "__main__":
    main()
