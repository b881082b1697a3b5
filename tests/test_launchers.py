"""Sweeps through Hydra's launcher plugins (hydra-submitit-launcher) and its Optuna sweeper.

Local processes (hydra/launcher=local) run for real here; SLURM is tested up to the sbatch
script submitit writes, with a stand-in `sbatch` on PATH that keeps the script and refuses.
"""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from ntp_rl.cli import check_command_line
from ntp_rl.errors import UserError
from ntp_rl.sweeps import SweepPlan, sweep_points
from test_pipeline import PIPE, info
from test_pretrain import pretrain, train_rows


@pytest.fixture
def pipe(tmp_path, shared_cache):
    return [*PIPE, "rl.max_steps=2", f"out_dir={tmp_path / 'outputs'}", f"data.cache_dir={shared_cache}"]


def sweep_dir(root: Path, stage: str) -> Path:
    (found,) = (root / "sweeps").glob(f"{stage}-*")
    return found


def points(root: Path, stage: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((sweep_dir(root, stage) / "points").glob("*.json"))]


def job_logs(root: Path, stage: str) -> str:
    return "".join(p.read_text() for p in (sweep_dir(root, stage) / ".submitit").rglob("*_0_log.out"))


def test_sweep_points_follow_hydras_grammar():
    assert sweep_points(["loss=ce,precision", "seed=0,1", "x=1"]) == [
        ["loss=ce", "seed=0", "x=1"], ["loss=ce", "seed=1", "x=1"],
        ["loss=precision", "seed=0", "x=1"], ["loss=precision", "seed=1", "x=1"]]
    # a search range is checked at both ends
    assert sweep_points(["loss.beta=interval(-0.5,0.5)", "loss.k=choice(10,50)"]) == [
        ["loss.beta=-0.5", "loss.k=10"], ["loss.beta=-0.5", "loss.k=50"],
        ["loss.beta=0.5", "loss.k=10"], ["loss.beta=0.5", "loss.k=50"]]


def test_an_experiments_points_come_from_its_sweeper_params_and_the_command_line_wins():
    checked = check_command_line("pipeline", ["-m", "experiment=paper_small"])
    assert checked.plan.num_points == 15 and checked.plan.swept_keys == ["loss", "seed"]
    assert checked.plan.at_once == 2  # two lineages at a time, as local processes
    checked = check_command_line("pipeline", ["-m", "experiment=paper_small", "seed=4"])
    assert checked.plan.num_points == 5 and checked.first.seed == 4


def test_the_cores_are_shared_out_between_the_processes_that_run_at_once():
    assert SweepPlan(at_once=2).threads_per_task(cores=16) == 8
    assert SweepPlan(at_once=2, tasks_per_point=2).threads_per_task(cores=16) == 4
    assert SweepPlan(at_once=15).threads_per_task(cores=2) == 1
    plan = check_command_line("pretrain", ["-m", "hydra/launcher=local", "hydra.sweeper.max_batch_size=3",
                                           "seed=0,1,2,3,4"]).plan
    assert (plan.at_once, plan.num_points) == (3, 5)


def test_a_bad_point_stops_the_sweep_before_anything_is_submitted(tmp_path):
    result = run_cli("pretrain", "-m", "hydra/launcher=local", "loss.k=10,0", f"out_dir={tmp_path}")
    assert result.returncode == 2 and result.stderr.strip() == "ntp-rl: error: loss.k=0: must be >= 1"
    assert not list(tmp_path.iterdir())


@pytest.mark.search
def test_a_search_must_optimise_its_objective_the_right_way():
    with pytest.raises(UserError, match="hydra.sweeper.direction: minimize would search for the worst rl_pass@1"):
        check_command_line("pipeline", ["-m", "hydra/sweeper=optuna", "loss.beta=interval(-0.5,0.5)"])
    with pytest.raises(UserError, match="run it with `ntp-rl pipeline`"):
        check_command_line("pretrain", ["-m", "hydra/sweeper=search", "loss.beta=interval(-0.5,0.5)"])
    with pytest.raises(UserError, match="objective=rl_pass@3: must be a value this lineage reports"):
        check_command_line("pipeline", ["-m", "hydra/sweeper=search", "objective=rl_pass@3", "seed=0,1"])
    with pytest.raises(UserError, match="objective=rl_pass@1: must be a value this lineage reports; choose one of: "
                                        "pretrain_nll, pretrain_entropy$"):
        check_command_line("pipeline", ["-m", "hydra/sweeper=search", "stages=[pretrain]", "seed=0,1"])
    assert check_command_line("pipeline", ["stages=[pretrain]"]).first.objective == "rl_pass@1"  # a grid needs none


def test_a_search_without_its_extra_says_how_to_install_it(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_optuna") else find_spec(name, *a))
    with pytest.raises(UserError, match=r'hydra/sweeper=search needs the \[search\] extra: pip install -e "\.\[search\]"'):
        check_command_line("pipeline", ["-m", "hydra/sweeper=search", "loss.beta=interval(-0.5,0.5)"])


def test_a_failed_point_is_named_at_the_end_and_the_others_finish(tiny, tmp_path):
    # loss.k above the vocabulary is found only once the tokenizer exists, inside the job: a point
    # that passed every check before the sweep and failed while it ran.
    result = run_cli("pretrain", "-m", "loss.k=5,100000", "loss=tail_penalty", *tiny, "train.max_steps=2")
    assert result.returncode == 2, result.stderr[-3000:]  # the failed point's own exit code
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ntp-rl: error: point 1 (loss.k=100000") and "must be in 1..128" in last, result.stderr
    records = points(tmp_path / "outputs", "pretrain")
    assert [r["status"] for r in records] == ["finished", "failed"]
    assert "sweep: 1 of 2 point(s) finished" in result.stdout


def test_a_sweep_started_in_a_second_another_sweep_took_gets_a_directory_of_its_own(tiny, tmp_path):
    # Another sweep of the same stage holds <stage>-<time>/ for every second this one may start in: each
    # sweep would read the other's point records (and resume=auto its command) from a shared directory.
    import time

    outputs = tmp_path / "outputs"
    start = time.time()
    taken = [outputs / "sweeps" / time.strftime("pretrain-%Y%m%d-%H%M%S", time.localtime(start + s))
             for s in range(-5, 120)]
    foreign = {"num": 0, "overrides": ["seed=9"], "status": "finished", "run_dir": "elsewhere"}
    for path in taken:
        (path / "points").mkdir(parents=True)
        (path / "points" / "0.json").write_text(json.dumps(foreign))
    result = run_cli("pretrain", "-m", "seed=1", *tiny, "train.max_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    (ours,) = [p for p in (outputs / "sweeps").iterdir() if (p / "command.json").exists()]
    assert ours.name.endswith("-1") and ours.with_name(ours.name[:-2]) in taken
    assert result.stdout.strip().splitlines()[-1].endswith(f"records in {ours}")
    (record,) = [json.loads(p.read_text()) for p in (ours / "points").glob("*.json")]
    assert record["overrides"][0] == "seed=1" and record["status"] == "finished"
    assert all(json.loads((p / "points" / "0.json").read_text()) == foreign for p in taken)


@pytest.mark.slow
def test_two_pipeline_points_run_as_local_processes_and_a_rerun_skips_them(pipe, tmp_path):
    args = ["pipeline", "-m", "hydra/launcher=local", "loss=ce,precision", *pipe]
    result = run_cli(*args, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs = tmp_path / "outputs"
    lineages = sorted((outputs / "pipeline").iterdir())
    assert [p.name.split(",")[0] for p in lineages] == ["pipeline-loss=ce", "pipeline-loss=precision"]
    assert all(info(p)["status"] == "finished" for p in lineages)
    assert {r["run_dir"] for r in points(outputs, "pipeline")} == {str(p) for p in lineages}
    table = (sweep_dir(outputs, "pipeline") / "compare" / "compare.md").read_text()
    assert "| loss=ce |" in table and "| loss=precision |" in table  # compare found the lineages
    logs = job_logs(outputs, "pipeline")
    assert logs.count("ntp-rl pipeline pipeline-loss=") == 2  # each point ran in a process of its own
    # both points at once on this machine's cores: each process takes its share
    assert all(json.loads((p / "pretrain" / "run.json").read_text())["world_size"] == 1 for p in lineages)

    for old in (outputs / "sweeps").iterdir():
        old.rename(tmp_path / old.name)  # keep the first sweep's logs out of the second's
    again = run_cli(*args, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert job_logs(outputs, "pipeline").count("already finished") == 8


def test_a_job_of_two_tasks_trains_as_one_two_process_run(tiny, tmp_path):
    one = tmp_path / "one"
    pretrain([*tiny, "train.micro_batch_size=8", "train.log_every=1", f"run_dir={one}"])
    two = tmp_path / "two"
    result = run_cli("pretrain", "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", *tiny,
                     "train.micro_batch_size=4", "train.log_every=1", f"run_dir={two}", "seed=0", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads((two / "run.json").read_text())
    assert run["status"] == "finished" and run["world_size"] == 2
    threads = max(1, (os.cpu_count() or 1) // 2)  # the machine's cores shared between the two processes
    assert f"task 0 of 2: {threads} thread(s)" in job_logs(tmp_path / "outputs", "pretrain")
    a, b = train_rows(one), train_rows(two)
    for step in range(1, 7):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-3), step


def test_the_slurm_job_script_asks_for_the_gpus_and_nodes_and_runs_each_task(tmp_path):
    """Submitting through the ready config, up to sbatch: a stand-in keeps the script it is given."""
    bin_dir, kept = tmp_path / "bin", tmp_path / "kept.sh"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text(f"#!/bin/sh\ncp \"$1\" {kept}\necho 'sbatch: error: no cluster here' >&2\nexit 1\n")
    srun = bin_dir / "srun"  # submitit looks for it before it submits
    srun.write_text("#!/bin/sh\nexit 1\n")
    for tool in (sbatch, srun):
        tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    result = run_cli("pipeline", "-m", "hydra/launcher=slurm", "loss=ce,precision", f"out_dir={tmp_path / 'out'}",
                     "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=4", "hydra.launcher.nodes=2",
                     "hydra.launcher.timeout_min=90", "+hydra.launcher.additional_parameters.qos=high",
                     "hydra.launcher.setup=['module load cuda']",
                     env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})
    assert result.returncode != 0  # nothing was submitted, and the CLI says so
    assert "ntp-rl: error: sbatch: error: no cluster here" in result.stderr
    assert ("2 point(s) left no result: no job was started, so there are no job logs; the error above says why"
            in result.stderr), "not a log directory that does not exist"
    script = kept.read_text()
    for line in ("#SBATCH --gpus-per-node=4", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --qos=high", "#SBATCH --array=0-1",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --job-name=ntp-rl-pipeline", "\nmodule load cuda\n"):
        assert line in script, (line, script)
    # srun starts one process per task; each runs its sweep point through submitit with this Python
    assert f"srun --unbuffered --output {tmp_path / 'out'}" in script
    assert f"{sys.executable} -u -m submitit.core._submit" in script


def test_the_slurm_launcher_without_slurm_says_so_before_anything(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no sbatch, as on a laptop
    with pytest.raises(UserError) as refused:
        check_command_line("pretrain", ["-m", "hydra/launcher=slurm", "seed=0,1", f"out_dir={tmp_path / 'out'}"])
    assert str(refused.value) == (
        "hydra/launcher=slurm: this machine has no SLURM (no sbatch on PATH), so no job can be submitted; run the "
        "command on the cluster's login node, or run the points here as local processes with hydra/launcher=local")
    assert not (tmp_path / "out").exists()


@pytest.mark.search
def test_a_search_of_three_trials_makes_three_lineages(pipe, tmp_path):
    # Without RL the trials take half the time; the objective is then the base model's Avg@4.
    result = run_cli("pipeline", "-m", "hydra/sweeper=search", "hydra.sweeper.n_trials=3",
                     "loss.beta=interval(-0.3,0.3)", "stages=[pretrain,eval_base]", "objective=base_avg@4", *pipe,
                     timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outputs = tmp_path / "outputs"
    records = points(outputs, "pipeline")
    assert len(records) == 3 and all(r["status"] == "finished" for r in records)
    betas = [float(next(o for o in r["overrides"] if o.startswith("loss.beta=")).split("=")[1]) for r in records]
    assert len(set(betas)) == 3 and all(-0.3 <= b <= 0.3 for b in betas)
    for record in records:  # each trial is a lineage; its objective is its summary's base_avg@4
        summary = json.loads((Path(record["run_dir"]) / "results.json").read_text())["summary"]
        assert record["objective"] == summary["base_avg@4"]
    best = (sweep_dir(outputs, "pipeline") / "optimization_results.yaml").read_text()
    assert f"best_value: {max(r['objective'] for r in records)}" in best
    assert (sweep_dir(outputs, "pipeline") / "compare" / "compare.md").exists()


@pytest.mark.slow
def test_a_pipeline_job_of_two_tasks_is_one_process_group(tiny, tmp_path):
    """The pipeline makes Accelerate's state before its stages do: on CPUs, as a gloo group too."""
    result = run_cli("pipeline", "-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "stages=[pretrain]",
                     *tiny, "train.max_steps=2", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (lineage,) = (tmp_path / "outputs" / "pipeline").iterdir()
    assert json.loads((lineage / "pretrain" / "run.json").read_text())["world_size"] == 2


@pytest.mark.search
def test_a_search_can_keep_its_study_in_a_database(tmp_path):
    """hydra.sweeper.storage=sqlite:///...: optuna 2.x (all the sweeper takes) needs SQLAlchemy 1.x for it."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.tell(study.ask(), 0.25)
    assert optuna.load_study(storage=storage, study_name="s").best_value == 0.25
