"""`ntp-rl <stage> [hydra overrides]`: pick the stage, let Hydra compose its config, run it.

Hydra owns the command line after the stage name, so its flags (-m, --cfg job, --info,
--help) keep working. Before handing over, every job the command would run is composed
once here, so a bad override costs one clear line and exit code 2 instead of a traceback,
even in the middle of a sweep.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ntp_rl.errors import TrainingDiverged, UserError, first_line
from ntp_rl.overrides import check_parsable, quote_path_values
from ntp_rl.stages import STAGES

if TYPE_CHECKING:
    from ntp_rl.sweeps import SweepPlan

PROG = "ntp-rl"

# docs/many-gpus.md shows this same line (a test checks it): --multi_gpu is how accelerate is told to
# start several processes when it sees no GPU; on GPUs it is harmless.
MULTI_PROCESS_EXAMPLE = "accelerate launch --multi_gpu --num_processes 2 -m ntp_rl pretrain"

HYDRA_INFO_FLAGS = {"-h", "--help", "--hydra-help", "-i", "--info", "-sc", "--shell-completion", "--version"}


def usage() -> str:
    lines = [
        f"usage: {PROG} <stage> [key=value ...] [hydra flags: -m, --cfg job, --info, --help]",
        "",
        "stages:",
    ]
    for name, stage in STAGES.items():
        lines.append(f"  {name:<9} {stage.summary}")
    lines += [
        "",
        "examples:",
        f"  {PROG} pretrain                          # the tiny default, CPU, a few minutes",
        f"  {PROG} pretrain loss=precision           # presets: ce precision diversity tail_penalty head_reward",
        f"  {PROG} pretrain -m loss.beta=-0.25,0,0.5 # a sweep: one run per value",
        f"  {PROG} pretrain --cfg job                # print the composed config",
        f"  {PROG} pipeline loss=precision           # pretrain -> eval -> rl -> eval",
        f"  {PROG} experiment=paper_small            # the paper's five settings x seeds, then compare",
        f"  {PROG} rl init_from=outputs/pretrain/<run> # GRPO on the embedded task; task=chain_sum|gsm8k|...",
        f"  {MULTI_PROCESS_EXAMPLE}",
        f"  {PROG} eval model=outputs/pretrain/<run> # Avg@n, Cons@n, pass@k, entropy (eval=paper: n=128)",
    ]
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    if argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, rest = argv[0], argv[1:]
    if stage.startswith("experiment="):  # `ntp-rl experiment=paper_small`: an experiment is a pipeline sweep
        asked = {"-m", "--multirun", "-c", "--cfg", *HYDRA_INFO_FLAGS}.intersection(argv)  # else it runs the sweep
        stage, rest = "pipeline", argv if asked else ["-m", *argv]
    if stage not in STAGES:
        fail(f"unknown stage '{stage}'; choose one of: {', '.join(STAGES)}")
    if STAGES[stage].schema is not None and {"-h", "--help"} & set(rest):
        from ntp_rl.stage_help import stage_help

        print(stage_help(stage))
        return
    if STAGES[stage].schema is None:  # compare: plain arguments, no config to compose
        try:
            return STAGES[stage].main(rest)
        except UserError as exc:
            fail(str(exc), exc.exit_code)
    rest = quote_path_values(expand_model_paths(rest))
    checked = CheckedCommand()
    try:
        check_parsable(rest)
        if not HYDRA_INFO_FLAGS.intersection(rest):
            checked = check_command_line(stage, rest)
    except UserError as exc:
        fail(str(exc), exc.exit_code)
    from ntp_rl import stopping

    stopping.install()
    try:
        run_with_hydra(stage, rest, checked)
    except KeyboardInterrupt as exc:
        if isinstance(exc, stopping.Stopped) and checked.plan is not None and checked.plan.local_jobs:
            from ntp_rl.sweeps import stop_local_jobs

            stop_local_jobs()
        interrupted(stage, exc, sweep=checked.plan is not None)


def interrupted(stage: str, exc: KeyboardInterrupt, sweep: bool = False) -> None:
    """Ctrl-C or SIGTERM: the run is already marked interrupted in run.json (after a checkpoint, for SIGTERM
    in a training loop); say so and how to go on, and exit as shells do (130 for Ctrl-C, 143 for SIGTERM)."""
    from ntp_rl.rundir import INTERRUPTED, shown_path
    from ntp_rl.stopping import Stopped
    from ntp_rl.sweeps import RememberSweepDir

    where = f"{shown_path(INTERRUPTED[-1])} is marked interrupted; " if INTERRUPTED else ""
    how = {"pipeline": "run the same command again to resume it",
           "eval": "eval runs are not resumed: run the command again"}.get(
        stage, "run the same command with resume=auto to continue from its last checkpoint")
    if sweep and stage not in ("pipeline", "eval") and RememberSweepDir.sweep_dir is not None:
        how = (f"run the same command with resume=auto to continue the sweep in "
               f"{shown_path(RememberSweepDir.sweep_dir)} (finished points are skipped)")
    what = f"stopped by {exc.signame}" if isinstance(exc, Stopped) else "interrupted"
    print(f"{PROG}: {what}; {where}{how}", file=sys.stderr)
    raise SystemExit(exc.exit_code if isinstance(exc, Stopped) else 130)


def expand_model_paths(args: list[str]) -> list[str]:
    """`model=<directory or org/name>` means `model=hf model.name_or_path=<it>`.

    `model` is a config group (presets), so Hydra alone would refuse a path there; this
    lets `ntp-rl eval model=outputs/pretrain/<run>` say what it means. A bare word stays a
    preset name, so a typo (`model=tinyy`) is told the presets instead of searched on the hub.
    """
    expanded = []
    for arg in args:
        key, eq, value = arg.partition("=")
        # A run directory's name may hold commas; otherwise a comma is a sweep over presets.
        if key == "model" and eq and (Path(value).exists() or ("," not in value and "/" in value)):
            expanded += ["model=hf", f"model.name_or_path={value}"]
        else:
            expanded.append(arg)
    return expanded


def run_with_hydra(stage: str, hydra_args: list[str], checked: "CheckedCommand") -> None:
    import hydra

    from ntp_rl.config.compose import conf_dir, register_schemas
    from ntp_rl.sweeps import RememberSweepDir, finish_sweep, sweep_command

    register_schemas()
    RememberSweepDir.sweep_dir = None  # set by Hydra when this command's sweep starts
    RememberSweepDir.command = sweep_command(stage, checked.overrides) if checked.plan is not None else None
    if checked.plan is not None and checked.first.get("resume") == "auto":
        hydra_args = [*hydra_args, *_continued_sweep(stage, checked, hydra_args)]
    fresh = None
    if checked.plan is not None and not any(a.startswith("hydra.sweep.dir=") for a in hydra_args):
        fresh, hydra_args = _fresh_sweep_dir(checked.plan, hydra_args)
    task = _stage_task(stage, checked.plan)
    sys.argv = [f"{PROG} {stage}", *hydra_args]
    code = 0
    if checked.plan is not None:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises what stops a sweep, and it is said here in one line
    try:
        hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=stage)(task)()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception as exc:  # noqa: BLE001 -- a sweep's launcher (no srun, sbatch refused, a job killed)
        if checked.plan is None:
            raise
        print(f"{PROG}: error: {first_line(exc)}", file=sys.stderr)
        code = 1
    if checked.plan is not None:
        code = finish_sweep(stage, checked.plan, checked.first, checked.overrides) or code
    if fresh is not None:
        with contextlib.suppress(OSError):  # removed only while empty: Hydra stopped before the sweep started
            fresh.rmdir()
    if code:
        raise SystemExit(code)


def _continued_sweep(stage: str, checked: "CheckedCommand", hydra_args: list[str]) -> list[str]:
    """`-m ... resume=auto`: the newest sweep of the same command runs again in its own directory, where each
    point finds its run (finished ones are skipped, the others resume); none found, a new sweep starts."""
    from ntp_rl.overrides import hydra_quote
    from ntp_rl.rundir import shown_path
    from ntp_rl.sweeps import sweep_to_continue

    if any(a.startswith("hydra.sweep.dir=") for a in hydra_args):
        return []
    found = sweep_to_continue(stage, checked.first.out_dir, checked.overrides)
    if found is None:
        print("note: resume=auto found no earlier sweep of this command; a new sweep starts")
        return []
    print(f"resume=auto: continuing the sweep in {shown_path(found)}")
    return [f"hydra.sweep.dir={hydra_quote(str(found))}"]


def _fresh_sweep_dir(plan: "SweepPlan", hydra_args: list[str]) -> tuple[Path, list[str]]:
    """A new sweep's directory, created here and by no other command: two sweeps started in the same second
    would otherwise share `<stage>-<time>/`, and each would read the other's point records and command."""
    from ntp_rl.overrides import hydra_quote
    from ntp_rl.rundir import make_fresh

    composed = Path(plan.sweep_dir)
    fresh = make_fresh(composed.parent, composed.name)
    return fresh, [*hydra_args, f"hydra.sweep.dir={hydra_quote(str(fresh))}"]


def _stage_task(stage: str, plan: Optional["SweepPlan"]) -> Callable:
    def task(cfg):  # Hydra calls this once per job (once per sweep point with -m), in the job's process
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from ntp_rl.config.compose import settle_names
        from ntp_rl.stages import run_validated

        hydra_cfg = HydraConfig.get()
        settle_names(cfg)
        overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("hydra")]
        if hydra_cfg.mode != RunMode.MULTIRUN or plan is None:
            try:
                return run_validated(stage, cfg, overrides=overrides)  # check_command_line validated it
            except (UserError, TrainingDiverged) as exc:
                fail(str(exc), exc.exit_code)
        from ntp_rl.sweeps import run_point

        return run_point(stage, cfg, overrides, plan, hydra_cfg)

    return task


# ---------------------------------------------------------------------------
# Checking a command line before Hydra runs it


@dataclass
class CheckedCommand:
    plan: Optional["SweepPlan"] = None  # set for a sweep (-m)
    first: Any = None  # the first job's config
    overrides: list[str] = field(default_factory=list)


def check_command_line(stage: str, hydra_args: list[str]) -> CheckedCommand:
    """Compose and validate every job of the command (each point of a sweep, the two ends of a
    search's ranges) before the first one runs or is submitted, so a bad value costs one line.

    This is the one validation of a command-line run: Hydra's jobs then run without another.
    The points are the command line's sweeps together with the config's `hydra.sweeper.params`
    (an experiment's), as Hydra's sweepers combine them: the command line wins.
    """
    from hydra._internal.utils import get_args_parser

    from ntp_rl.sweeps import check_launcher, check_search, plan_from_hydra, require_search_extra, sweep_points

    try:
        args = get_args_parser().parse_args(hydra_args)
    except SystemExit:
        raise UserError(f"cannot parse the command line: {' '.join(hydra_args)}") from None
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    if not args.multirun:
        cfg = _composed(stage, overrides)
        STAGES[stage].validate(cfg)
        return CheckedCommand(first=cfg, overrides=overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    try:
        fixed = [o.input_line for o in parser.parse_overrides(args.overrides) if not o.is_sweep_override()]
    except Exception as exc:  # Hydra's grammar errors
        raise UserError(first_line(exc)) from None
    require_search_extra(fixed)
    hydra_cfg = _composed(stage, fixed, hydra=True).hydra  # the sweeper, its params and the launcher
    check_launcher(hydra_cfg)
    given = {o.split("=", 1)[0] for o in overrides}
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.get("params") or {}).items() if k not in given]
    jobs = sweep_points([*params, *overrides])
    first = None
    for job in jobs:
        cfg = _composed(stage, job)
        STAGES[stage].validate(cfg)
        first = first or cfg
    swept = [o.key_or_group for o in parser.parse_overrides([*params, *overrides]) if o.is_sweep_override()]
    plan = plan_from_hydra(hydra_cfg, swept, len(jobs))
    check_search(stage, plan, hydra_cfg, first)
    return CheckedCommand(plan=plan, first=first, overrides=overrides)


def _composed(stage: str, overrides: list[str], hydra: bool = False) -> Any:
    from ntp_rl.config.compose import compose

    try:
        return compose(stage, overrides, hydra=hydra)
    except Exception as exc:
        raise UserError(explain_compose_error(exc, stage)) from None


def explain_compose_error(exc: BaseException, stage: str) -> str:
    """Turn Hydra / OmegaConf composition errors into one line naming the key."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = exc
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = exc.missing_cfg_file.partition("/")
        options = exc.options or []
        if options:
            return f"{group}={option}: unknown {group} preset; choose one of: {', '.join(sorted(options))}"
        return f"{exc.missing_cfg_file}: no such config"
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key and "not in" in str(cause):
        parent_key, _, name = cause.full_key.rpartition(".")
        return f"{cause.full_key}: unknown key; {_known_keys_hint(stage, parent_key, name)}"
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        message = first_line(cause).split("\n")[0]
        return f"{cause.full_key}: {message}"
    return first_line(exc)


def _known_keys_hint(stage: str, parent_key: str, name: str) -> str:
    """List the keys that do exist where the unknown one was given, closest first."""
    import difflib

    from omegaconf import OmegaConf

    node = OmegaConf.structured(STAGES[stage].schema)
    for part in filter(None, parent_key.split(".")):
        node = node.get(part) if part in node else None
        if node is None or not OmegaConf.is_config(node):
            return "see `--cfg job` for the keys"
    keys = [k for k in node.keys()]
    if not keys:  # a free-form mapping, such as a pipeline's `sweep`
        return f"'{parent_key}' starts empty: add entries with +{parent_key}.{name}=..."
    close = difflib.get_close_matches(name, keys, n=1)
    where = f"'{parent_key}'" if parent_key else "the top level"
    suggestion = f"did you mean '{close[0]}'? " if close else ""
    return f"{suggestion}keys in {where}: {', '.join(keys)}"


if __name__ == "__main__":  # pragma: no cover
    main()
