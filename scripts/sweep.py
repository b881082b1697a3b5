#!/usr/bin/env python
"""Run a sweep with one launch per point: the way to sweep on several GPUs (or CPU processes).

    python scripts/sweep.py --launcher "accelerate launch --num_processes 8" pipeline loss=ce,precision seed=0,1
    python scripts/sweep.py --launcher "accelerate launch --multi_gpu --num_processes 2" pretrain loss.beta=-0.25,0,0.5
    python scripts/sweep.py --jobs 2 pipeline loss=ce,precision,diversity      # CPU: two points at a time

Every point is checked before any starts (a bad value costs one line, not a half-run
sweep). Points of `pipeline` land in their lineage directories (outputs/pipeline/<name>,
so re-running the sweep skips what finished); points of other stages land side by side in
--out (default outputs/sweeps/<stage>-<time>). At the end the points' status is printed,
`ntp-rl compare` runs over what the sweep wrote, and the exit code is non-zero if any failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ntp_rl.cli import check_command_line, expand_model_paths, fail  # noqa: E402
from ntp_rl.errors import UserError  # noqa: E402
from ntp_rl.launch import launch_points, sweep_points  # noqa: E402
from ntp_rl.rundir import dir_name, run_name  # noqa: E402
from ntp_rl.stages.pipeline import lineage_name  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launcher", default="", help='e.g. "accelerate launch --num_processes 8" (default: python)')
    parser.add_argument("--jobs", type=int, default=1, help="points run at once (CPU machines; cores are shared out)")
    parser.add_argument("--out", help="where the points of a non-pipeline stage go")
    parser.add_argument("--no-compare", action="store_true", help="skip `ntp-rl compare` at the end")
    parser.add_argument("stage")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.overrides = expand_model_paths(args.overrides)  # model=<run dir> means what it means to ntp-rl

    try:
        swept = check_command_line(args.stage, ["-m", *args.overrides])
        points = sweep_points(args.overrides)
    except UserError as exc:
        fail(str(exc), exc.exit_code)
    out_dir = Path(args.out or f"outputs/sweeps/{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.stage != "pipeline":
        # Quoted: a name like "pretrain-loss.beta=-0.25" holds characters Hydra's grammar reserves.
        points = [[*p, f"run_dir={out_dir / str(i)}",
                   f"logger.wandb.name='{run_name(args.stage, [o for o in p if o.split('=', 1)[0] in swept])}'"]
                  for i, p in enumerate(points)]
    print(f"sweep: {len(points)} point(s) of `{args.stage}`, {args.jobs} at a time, logs in {out_dir / 'logs'}")
    results = launch_points(args.stage, points, launcher=args.launcher, jobs=args.jobs, log_dir=out_dir / "logs")
    for result in results:
        status = "ok" if result.returncode == 0 else f"FAILED ({result.returncode}, see {result.log})"
        print(f"  {' '.join(result.overrides)}: {status} in {result.seconds:.0f}s")

    if not args.no_compare and any(r.returncode == 0 for r in results):
        from ntp_rl.stages.compare import compare

        def lineage(overrides: list[str]) -> str:
            root = next((o.split("=", 1)[1] for o in overrides if o.startswith("out_dir=")), "outputs")
            return str(Path(root) / "pipeline" / dir_name(lineage_name(overrides)))

        targets = [str(out_dir)] if args.stage != "pipeline" else sorted(
            {lineage(r.overrides) for r in results if r.returncode == 0})
        summary = compare(targets, str(out_dir / "compare"))
        print(summary["table"], end="")
    sys.exit(0 if all(r.returncode == 0 for r in results) else 1)


if __name__ == "__main__":
    main()
