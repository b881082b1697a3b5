"""Stopping and pre-emption (issue 25, item 5): SIGTERM as Ctrl-C with a checkpoint first, a run killed before its
first checkpoint, an interrupted sweep continued, and a job requeued by submitit after its pre-emption signal."""

import json
from pathlib import Path

import pytest

from conftest import run_cli
from ntp_rl.checkpoint import latest_checkpoint
from ntp_rl.tracking import read_metrics
from test_pretrain import pretrain, train_rows

# Ten steps of 112 windows, a checkpoint every 4: the signal lands at step 6, between two checkpoints.
COMMON = ["train.max_steps=10", "train.save_every=4", "train.log_every=1", "train.batch_size=112",
          "train.micro_batch_size=56"]


def rows_per_step(run_dir: Path) -> dict[tuple[int, str], int]:
    """How many rows of each kind (train / val) metrics.jsonl holds for each step."""
    counts: dict[tuple[int, str], int] = {}
    for row in read_metrics(run_dir):
        kind = "train" if "train/loss" in row else "val"
        counts[(row["step"], kind)] = counts.get((row["step"], kind), 0) + 1
    return counts


def test_sigterm_saves_a_checkpoint_says_one_line_and_resume_continues_exactly(tiny, tmp_path):
    straight = tmp_path / "straight"
    pretrain([*tiny, *COMMON, f"run_dir={straight}"])
    stopped = tmp_path / "stopped"
    args = ["pretrain", *tiny, *COMMON, f"run_dir={stopped}"]
    first = run_cli(*args, env={"NTP_RL_KILL_AT": "step:6:SIGTERM"})
    assert first.returncode == 143, first.stderr  # 128 + SIGTERM, as shells report it
    assert "Traceback" not in first.stderr, first.stderr
    assert first.stderr.strip().splitlines()[-1] == (
        f"ntp-rl: stopped by SIGTERM; {stopped} is marked interrupted; run the same command with resume=auto to "
        "continue from its last checkpoint")
    info = json.loads((stopped / "run.json").read_text())
    assert (info["status"], info["signal"]) == ("interrupted", "SIGTERM")
    assert latest_checkpoint(stopped / "checkpoints").name == "step_00000006", "a checkpoint of the step it stopped at"

    second = run_cli(*args, "resume=auto")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout and "at step 6" in second.stdout
    a, b = train_rows(straight), train_rows(stopped)
    assert sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert a[step]["train/loss"] == b[step]["train/loss"], step  # bit-identical on CPU


def test_a_run_killed_before_its_first_checkpoint_restarts_cleanly(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = ["pretrain", *tiny, "train.save_every=100", f"run_dir={run_dir}"]
    first = run_cli(*args, env={"NTP_RL_KILL_AT": "step:4"})
    assert first.returncode == -9 and latest_checkpoint(run_dir / "checkpoints") is None
    assert rows_per_step(run_dir)[(0, "val")] == 1
    second = run_cli(*args, "resume=auto")
    assert second.returncode == 0, second.stderr
    assert f"resume=auto: {run_dir} has no complete checkpoint yet; its run starts again from step 0" in second.stdout
    counts = rows_per_step(run_dir)
    assert set(counts.values()) == {1}, f"a row repeated: {counts}"
    assert sorted(s for s, kind in counts if kind == "train") == [2, 4, 6]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_an_interrupted_sweep_continues_in_its_own_directory_with_resume_auto(tiny, tmp_path):
    args = ["pretrain", "-m", "seed=0,1", *tiny, *COMMON]
    first = run_cli(*args, env={"NTP_RL_KILL_AT": "step:6:SIGTERM"})
    assert first.returncode == 143, first.stderr
    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()
    shown = first.stderr.strip().splitlines()[-1]
    assert shown.startswith("ntp-rl: stopped by SIGTERM; ") and shown.endswith(
        f"run the same command with resume=auto to continue the sweep in {sweep} (finished points are skipped)"), shown
    assert not (sweep / "1").exists(), "the second point never started"

    second = run_cli(*args, "resume=auto")
    assert second.returncode == 0, second.stderr
    assert f"resume=auto: continuing the sweep in {sweep}" in second.stdout
    assert [p.name for p in (tmp_path / "outputs" / "sweeps").iterdir()] == [sweep.name], "no new sweep"
    assert "resumed from" in second.stdout and "at step 6" in second.stdout  # point 0 goes on from its checkpoint
    for point in ("0", "1"):
        assert json.loads((sweep / point / "run.json").read_text())["status"] == "finished"
        assert sorted(train_rows(sweep / point)) == list(range(1, 11))

    third = run_cli(*args, "resume=auto")
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("already finished") == 2
    assert "sweep: 2 of 2 point(s) finished" in third.stdout


@pytest.mark.slow  # a local job started twice: ~40 s on 2 cores
def test_a_job_signalled_by_submitit_saves_is_requeued_and_resumes(tiny, tmp_path):
    """submitit's pre-emption / time-out signal (SIGUSR2) to a job of hydra/launcher=local, as SLURM sends it before
    a job's time runs out: the run saves a checkpoint, submitit requeues the job, and the requeued job resumes."""
    result = run_cli("pretrain", "-m", "hydra/launcher=local", "seed=0", *tiny, *COMMON,
                     env={"NTP_RL_KILL_AT": "step:6:SIGUSR2"}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "sweeps").iterdir()
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert "Requeued job" in logs, logs[-3000:]
    assert "resumed from" in logs and "at step 6" in logs, logs[-3000:]
    info = json.loads((sweep / "0" / "run.json").read_text())
    assert info["status"] == "finished"
    assert sorted(train_rows(sweep / "0")) == list(range(1, 11))
    assert "sweep: 1 of 1 point(s) finished" in result.stdout


@pytest.mark.slow  # a local job and the ntp-rl that launched it: ~40 s on 2 cores
def test_sigterm_to_a_local_sweep_stops_its_jobs_after_a_checkpoint(tiny, tmp_path):
    """`kill <ntp-rl's pid>` reaches that process alone (Ctrl-C reaches the terminal's whole process group), not the
    jobs of hydra/launcher=local: ntp-rl passes it on and waits while each job saves a checkpoint and stops."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from conftest import REPO

    sweeps = tmp_path / "outputs" / "sweeps"
    driver = subprocess.Popen([sys.executable, "-m", "ntp_rl", "pretrain", "-m", "hydra/launcher=local", "seed=0",
                               *tiny, "train.max_steps=100000", "train.save_every=100000", "train.log_every=1"],
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not any(train_rows(p.parent) for p in sweeps.glob("*/0/metrics.jsonl")):
            assert driver.poll() is None and time.monotonic() < deadline, "the job never started training"
            time.sleep(0.5)
        (task,) = [p for p in psutil.Process(driver.pid).children(recursive=True)
                   if "submitit.core._submit" in " ".join(p.cmdline())]
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=300)
    finally:
        for process in psutil.Process(driver.pid).children(recursive=True) if driver.poll() is None else []:
            process.kill()
        driver.kill()
    assert driver.returncode == 143, err
    assert "passing SIGTERM to the sweep's 1 running local job(s)" in err, err
    assert err.strip().splitlines()[-1].startswith("ntp-rl: stopped by SIGTERM; "), err
    assert not task.is_running(), "the job's process outlived ntp-rl"
    (run,) = sweeps.glob("*/0")
    info = json.loads((run / "run.json").read_text())
    assert (info["status"], info["signal"]) == ("interrupted", "SIGTERM")
    assert latest_checkpoint(run / "checkpoints") is not None, "the job saved a checkpoint before it stopped"
