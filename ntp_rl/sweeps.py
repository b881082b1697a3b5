"""Sweeps (`-m`) through Hydra's plugins, and what ntp-rl adds around them.

Hydra's sweeper picks the points (the basic grid, or Optuna's search with hydra/sweeper=search)
and its launcher runs them: in this process (basic), as local processes (hydra/launcher=local)
or as SLURM jobs (hydra/launcher=slurm), both through hydra-submitit-launcher. ntp-rl adds:
- every point is composed and validated before any is submitted (cli.check_command_line,
  with the points of `sweep_points`);
- each job sets up its process (`prepare_job`): its share of the CPU threads, and, for a job
  of several tasks, the distributed environment Accelerate reads, taken from submitit;
- each point leaves a record in the sweep directory (`record_point`), so that the end of the
  sweep (`finish_sweep`) names the points that failed, whichever process or machine ran them,
  and compares a pipeline sweep's lineages.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.experimental.callback import Callback

from ntp_rl.errors import TrainingDiverged, UserError, first_line
from ntp_rl.io import write_json_atomic
from ntp_rl.rundir import shown_path
from ntp_rl.stopping import Stopped

POINTS_DIR = "points"  # in the sweep directory: one <job number>.json per point that ran


def sweep_points(overrides: Sequence[str]) -> list[list[str]]:
    """`["loss=ce,precision", "seed=0,1"]` -> the four override lists of the cross product.

    A search range (`interval(-0.5,0.5)`, which Optuna samples) gives its two ends: a search
    is checked at the corners of the space it may visit.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import IntervalSweep

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception as exc:  # Hydra's grammar errors
        raise UserError(first_line(exc)) from None
    axes = []
    for override in parsed:
        key = override.get_key_element()
        value = override.value()
        if isinstance(value, IntervalSweep):
            axes.append([f"{key}={value.start}", f"{key}={value.end}"])
        elif override.is_sweep_override():
            axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
        else:
            axes.append([f"{key}={override.get_value_element_as_str()}"])
    return [list(point) for point in itertools.product(*axes)]


@dataclass
class SweepPlan:
    """What the CLI learned about a `-m` command while checking it, carried into every job."""

    swept_keys: list[str] = field(default_factory=list)
    num_points: int = 0  # grid points, or trials of a search
    at_once: int = 1  # points running at the same time (the sweeper's batch)
    tasks_per_point: int = 1  # processes of each point on one machine (tasks_per_node)
    search: bool = False  # an Optuna sweeper: each job returns its objective
    sweep_dir: str = ""  # hydra.sweep.dir as composed (outputs/sweeps/<stage>-<time>); the CLI claims it
    local_jobs: bool = False  # hydra/launcher=local: the points are child processes of this one

    def threads_per_task(self, cores: Optional[int] = None) -> int:
        """The machine's cores shared out between the processes of the points running at once."""
        return max(1, (cores or os.cpu_count() or 1) // max(1, self.at_once * self.tasks_per_point))


def plan_from_hydra(hydra_cfg: Any, swept_keys: list[str], num_points: int) -> SweepPlan:
    sweeper, launcher = hydra_cfg.sweeper, hydra_cfg.launcher
    search = "n_trials" in sweeper
    total = int(sweeper.n_trials) if search else num_points
    batch = sweeper.get("n_jobs") if search else sweeper.get("max_batch_size")
    return SweepPlan(swept_keys=swept_keys, num_points=total, at_once=min(int(batch or total), total),
                     tasks_per_point=int(launcher.get("tasks_per_node") or 1),
                     search=search, sweep_dir=str(hydra_cfg.sweep.dir),
                     local_jobs=str(launcher.get("_target_", "")).endswith(".LocalLauncher"))


def require_search_extra(overrides: list[str]) -> None:
    """Without the extra, Hydra would only say that it cannot find the sweeper's config."""
    import importlib.util

    sweeper = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra/sweeper=")), "basic")
    if sweeper in ("search", "optuna") and importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is None:
        raise UserError(f"hydra/sweeper={sweeper} needs the [search] extra: pip install -e \".[search]\"")


def check_launcher(hydra_cfg: Any) -> None:
    """hydra/launcher=slurm submits with sbatch: without it nothing could be submitted, so say so before anything."""
    import shutil

    if str(hydra_cfg.launcher.get("_target_", "")).endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        raise UserError("hydra/launcher=slurm: this machine has no SLURM (no sbatch on PATH), so no job can be "
                        "submitted; run the command on the cluster's login node, or run the points here as local "
                        "processes with hydra/launcher=local")


def check_search(stage: str, plan: SweepPlan, hydra_cfg: Any, cfg: Any) -> None:
    """A search optimises a pipeline's `objective`, all of which are better higher except the NLL."""
    if not plan.search:
        return
    from ntp_rl.config.validate import check_objective

    if stage != "pipeline":
        raise UserError("hydra/sweeper: a search optimises a lineage's `objective`; run it with `ntp-rl pipeline`")
    check_objective(cfg)
    wanted = "minimize" if cfg.objective.endswith("_nll") else "maximize"
    direction = str(getattr(hydra_cfg.sweeper.direction, "name", hydra_cfg.sweeper.direction)).lower()
    if direction != wanted:
        raise UserError(f"hydra.sweeper.direction: {direction} would search for the worst {cfg.objective}; "
                        f"set hydra.sweeper.direction={wanted} (hydra/sweeper=search does)")


# ---------------------------------------------------------------------------
# In each job


def prepare_job(plan: SweepPlan, launcher_cfg: Any) -> None:
    """Set up the process of a job that submitit started, before torch or Accelerate start work.

    A job of several tasks (tasks_per_node > 1, or nodes > 1) runs this function in each task:
    submitit knows the ranks and the first node, and exports them as torch.distributed's env://
    variables, so Accelerate forms one process group (NCCL on GPUs, gloo on CPUs) -- submitit's
    way, with srun starting the tasks instead of torchrun.
    """
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    if not executor:
        return  # the basic launcher: the points run one after another in this process
    import submitit
    import torch

    from ntp_rl import stopping

    env = submitit.JobEnvironment()
    stopping.install()
    stopping.install_requeue(env._usr_sig())  # submitit's pre-emption / time-out signal: checkpoint, then requeue
    if env.num_tasks > 1:
        # The tasks see every GPU of their node; Accelerate picks cuda:<LOCAL_RANK> itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    cpus = launcher_cfg.get("cpus_per_task")
    # SLURM gives each task its cores; locally the machine's cores are shared out between the
    # processes of the points that run at once, as small models on CPUs use them best.
    threads = int(cpus) if cpus else (int(os.environ.get("SLURM_CPUS_PER_TASK", 0)) or plan.threads_per_task())
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    print(f"ntp-rl: {executor} job {env.job_id}, task {env.global_rank} of {env.num_tasks}: {threads} thread(s), "
          f"pid {os.getpid()}", flush=True)


def stop_local_jobs(timeout_s: float = 300.0) -> None:
    """SIGTERM to a local sweep's `ntp-rl` reaches it alone (Ctrl-C reaches the terminal's whole process group),
    so its jobs would train on, orphaned. It is passed on, and the jobs are waited for while each saves a
    checkpoint and marks its run interrupted: once `ntp-rl` has exited, the same command resumes them all."""
    import psutil

    # The jobs' controllers (submitit.local._local) pass SIGTERM on to their tasks, the points' processes.
    jobs = psutil.Process().children()
    if not jobs:
        return
    print(f"ntp-rl: passing SIGTERM to the sweep's {len(jobs)} running local job(s); waiting while they save "
          f"a checkpoint and stop", file=sys.stderr, flush=True)
    for job in jobs:
        with contextlib.suppress(psutil.NoSuchProcess):
            job.terminate()
    _, running = psutil.wait_procs(jobs, timeout=timeout_s)
    if running:
        print(f"ntp-rl: {len(running)} local job(s) still running after {timeout_s:.0f} s: pid(s) "
              f"{' '.join(str(p.pid) for p in running)}", file=sys.stderr)


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def record_point(sweep_dir: Path, num: int, overrides: Sequence[str], **fields: Any) -> None:
    """The point's outcome, for the end of the sweep (written by the job's first process only)."""
    if is_rank_zero():
        (sweep_dir / POINTS_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(sweep_dir / POINTS_DIR / f"{num}.json", {"num": num, "overrides": list(overrides), **fields})


def objective_value(stage: str, cfg: Any, result: Any) -> float:
    """What a search optimises: the lineage summary's value named by `objective` (a search runs
    pipelines only, and check_objective made sure the summary holds it)."""
    assert stage == "pipeline"
    return float(result["summary"][cfg.objective])


def run_point(stage: str, cfg: Any, overrides: list[str], plan: SweepPlan, hydra_cfg: Any) -> Any:
    """One point of a sweep: whatever goes wrong is recorded for the end of the sweep, and
    raised to a search's sweeper only, so one point that diverges (a beta too far out) does not
    cost the others."""
    import traceback

    from ntp_rl.rundir import run_name
    from ntp_rl.stages import run_validated

    prepare_job(plan, hydra_cfg.launcher)
    # A sweep's runs sit side by side in the sweep directory, named by what they swept. (Not a
    # pipeline's: its lineage directory is named by its settings, so that a re-run finds the
    # stages that already finished.)
    if cfg.run_dir is None and stage != "pipeline":
        cfg.run_dir = hydra_cfg.runtime.output_dir
    if cfg.logger.wandb.name is None:
        swept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in plan.swept_keys]
        cfg.logger.wandb.name = run_name(stage, swept)
    sweep_dir, num = Path(str(hydra_cfg.sweep.dir)), int(hydra_cfg.job.num)
    if cfg.resume is None and read_point(sweep_dir, num).get("status") == "interrupted":
        cfg.resume = "auto"  # a job requeued after pre-emption or time-out continues the run it started
    try:
        result = run_validated(stage, cfg, overrides=overrides)  # check_command_line validated it
    except Stopped as stop:  # SIGTERM or submitit's signal: the run saved a checkpoint and is marked interrupted
        record_point(sweep_dir, num, overrides, status="interrupted", error=f"stopped by {stop.signame}",
                     exit_code=stop.exit_code)
        if stop.then is not None:
            stop.then()  # submitit checkpoints the job and requeues it; the requeued job resumes the run
        raise
    except Exception as exc:  # noqa: BLE001 -- a bug in one point is reported with the others at the end
        known = isinstance(exc, (UserError, TrainingDiverged))
        if not known:
            traceback.print_exc()  # a bug: its traceback goes to the job's log
        code = exc.exit_code if known else 1
        print(f"ntp-rl: error: {' '.join(overrides)}: {first_line(exc)}", file=sys.stderr)
        record_point(sweep_dir, num, overrides, status="failed", error=first_line(exc), exit_code=code)
        if plan.search:
            raise  # Optuna marks the trial failed and goes on (hydra/sweeper=search: max_failure_rate)
        return None
    value = objective_value(stage, cfg, result) if plan.search else None
    where = result.get("lineage") if isinstance(result, dict) else None  # a pipeline's; other stages' run_dir
    record_point(sweep_dir, num, overrides, status="finished", run_dir=where or str(cfg.run_dir), objective=value)
    return value if plan.search else result


# ---------------------------------------------------------------------------
# In the process that ran `ntp-rl ... -m`


COMMAND_FILE = "command.json"  # in the sweep directory: the stage and overrides that started it


class RememberSweepDir(Callback):
    """Hydra tells its callbacks the sweep directory it made; the CLI reads the points' records there, and
    leaves the command there, so that the same command with resume=auto finds the sweep again."""

    sweep_dir: Optional[Path] = None
    command: Optional[dict] = None  # set by the CLI before the sweep starts

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        RememberSweepDir.sweep_dir = Path(str(config.hydra.sweep.dir))
        if RememberSweepDir.command is not None:
            RememberSweepDir.sweep_dir.mkdir(parents=True, exist_ok=True)
            if not (RememberSweepDir.sweep_dir / COMMAND_FILE).exists():
                write_json_atomic(RememberSweepDir.sweep_dir / COMMAND_FILE, RememberSweepDir.command)


def sweep_command(stage: str, overrides: Sequence[str]) -> dict:
    """What identifies a sweep's command: its stage and overrides, less the ones that only say to resume it."""
    kept = sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("resume", "hydra.sweep.dir"))
    return {"stage": stage, "overrides": kept}


def sweep_to_continue(stage: str, out_dir: str, overrides: Sequence[str]) -> Optional[Path]:
    """The newest sweep of the same command, which `-m ... resume=auto` continues: its points that finished
    are skipped (each says so), the others resume from their last checkpoint or start again."""
    wanted = sweep_command(stage, overrides)
    for record in sorted(Path(out_dir).glob(f"sweeps/{stage}-*/{COMMAND_FILE}"), reverse=True):
        try:
            if json.loads(record.read_text()) == wanted:
                return record.parent
        except (OSError, ValueError):
            continue
    return None


def read_point(sweep_dir: Path, num: int) -> dict:
    try:
        return json.loads((sweep_dir / POINTS_DIR / f"{num}.json").read_text())
    except (OSError, ValueError):
        return {}


def read_points(sweep_dir: Path) -> list[dict]:
    records = []
    for path in sorted((sweep_dir / POINTS_DIR).glob("*.json"), key=lambda p: int(p.stem)):
        records.append(json.loads(path.read_text()))
    return records


def finish_sweep(stage: str, plan: SweepPlan, first_cfg: Any, overrides: Sequence[str]) -> int:
    """Name every failed or missing point in one line each, compare a pipeline sweep's lineages;
    the exit code of the whole sweep."""
    sweep_dir = RememberSweepDir.sweep_dir
    if sweep_dir is None:  # Hydra stopped before the sweep started; it said why
        return 1
    records = read_points(sweep_dir)
    failed = [r for r in records if r["status"] != "finished"]
    for record in failed:
        print(f"ntp-rl: error: point {record['num']} ({' '.join(record['overrides'])}): {record['error']}",
              file=sys.stderr)
    missing = plan.num_points - len(records)
    logs = sweep_dir / ".submitit"
    if missing > 0 and any(logs.rglob("*_log.*")):
        print(f"ntp-rl: error: {missing} point(s) left no result (a job that was killed or never ran); "
              f"their logs are under {shown_path(logs)}", file=sys.stderr)
    elif missing > 0:  # the launcher stopped before any job started (no sbatch, a refused submission): said above
        print(f"ntp-rl: error: {missing} point(s) left no result: no job was started, so there are no job logs; "
              f"the error above says why", file=sys.stderr)
    if stage == "pipeline":
        compare_lineages([r["run_dir"] for r in records if r["status"] == "finished"], first_cfg, overrides,
                         sweep_dir)
    print(f"sweep: {len(records) - len(failed)} of {plan.num_points} point(s) finished; records in {shown_path(sweep_dir)}")
    if failed or missing > 0:
        return max([r.get("exit_code", 1) for r in failed] or [1])
    return 0


def compare_lineages(lineages: list[str], cfg: Any, overrides: Sequence[str], sweep_dir: Path) -> None:
    """An experiment's table and figures in outputs/experiments/<name>; another sweep's in its sweep directory."""
    from ntp_rl.stages.compare import compare
    from ntp_rl.study.wandb_log import WandbOptions

    if not lineages:
        return
    label = next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), None)
    out_dir = Path(cfg.out_dir) / "experiments" / label if label else sweep_dir / "compare"
    wandb = WandbOptions(mode=cfg.logger.wandb.mode.value,
                         project=cfg.logger.wandb.project, entity=cfg.logger.wandb.entity,
                         group=cfg.logger.wandb.group or label or sweep_dir.name)  # the verdict beside its lineages
    hypotheses = cfg.get("hypotheses")
    try:
        summary = compare(sorted(set(lineages)), str(out_dir), wandb=wandb, hypotheses=hypotheses)
    except UserError as exc:
        if not hypotheses:
            raise
        # The verdicts need their baseline among the lineages; a study run a point at a time (or a few
        # points of it) has not got it yet. Its lineages finished all the same: the table still is written.
        print(f"ntp-rl: the verdicts of hypotheses={hypotheses} were not judged ({first_line(exc)}); once the "
              f"lineages they compare have finished: ntp-rl compare <their directories> --hypotheses {hypotheses}",
              file=sys.stderr)
        summary = compare(sorted(set(lineages)), str(out_dir), wandb=wandb)
    print(summary["table"], end="")
    if summary["verdicts"]:
        print("\n" + summary["verdicts"], end="")
    print(f"table and figures in {shown_path(out_dir)}")
