"""Run directories are claimed exclusively: two processes never write one run (issue 12, item 2)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY
from ntp_rl import rundir
from ntp_rl.errors import ConfigError


def start_cli(*args: str) -> subprocess.Popen:
    """`ntp-rl` as a terminal would start it. SIGINT's default comes back first: a shell starts background
    commands with SIGINT ignored (`.ci/run &`, `nohup pytest &`), their children inherit that, and Python then
    never turns Ctrl-C into KeyboardInterrupt, so the tests that send it would wait on a run that ignores it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "ntp_rl", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_two_runs_started_in_the_same_second_get_two_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir.time, "strftime", lambda fmt, *a: "20261128-124035")
    first = rundir.claim_fresh(tmp_path / "pretrain", "pretrain-seed=5")
    second = rundir.claim_fresh(tmp_path / "pretrain", "pretrain-seed=5")
    assert (first.name, second.name) == ("20261128-124035-pretrain-seed=5", "20261128-124035-pretrain-seed=5-1")
    for path in (first, second):
        rundir.release(path)
    assert not first.exists() and not second.exists(), "a claimed directory no run started in is removed"


def lock_and_wait(path: str, ready, done) -> None:
    rundir.lock(Path(path), "run_dir")
    ready.set()
    done.wait(30)


def test_a_directory_locked_by_another_process_is_refused(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=lock_and_wait, args=(str(tmp_path), ready, done))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(ConfigError, match="is being written by another ntp-rl process right now"):
            rundir.lock(tmp_path, "run_dir")
    finally:
        done.set()
        holder.join(30)
    rundir.lock(tmp_path, "run_dir")  # free again once the holder is gone
    rundir.release(tmp_path)


@pytest.mark.slow  # two ntp-rl processes: 40-70 s on 2 loaded cores
def test_resume_auto_racing_a_live_run_is_refused(tmp_path, shared_cache):
    """Two real processes: a live pretrain run, and `resume=auto` of the same command while it runs."""
    common = [*TINY, "train.max_steps=100000", "train.save_every=2", f"out_dir={tmp_path}",
              f"data.cache_dir={shared_cache}"]
    live = start_cli("pretrain", *common)
    try:
        wait_for(lambda: any((tmp_path / "pretrain").glob("*/checkpoints/step_*/trainer_state.pt")))
        racer = subprocess.run([sys.executable, "-m", "ntp_rl", "pretrain", *common, "resume=auto"], cwd=REPO,
                               capture_output=True, text=True, timeout=300)
        (run,) = (tmp_path / "pretrain").iterdir()
        assert racer.returncode == 2, racer.stderr
        assert racer.stderr.strip() == (f"ntp-rl: error: resume: {run} is being written by another ntp-rl process "
                                        "right now; wait for it to stop (then resume=auto continues it), or start "
                                        "a separate run")
        assert live.poll() is None, "the live run goes on"
    finally:
        live.send_signal(signal.SIGINT)
        live.communicate(timeout=120)
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"


@pytest.mark.slow  # a real ntp-rl process: ~35 s on 2 loaded cores
def test_ctrl_c_says_one_line_and_exits_130(tmp_path, shared_cache):
    """SIGINT to a real `ntp-rl pretrain`: one line naming the run and how to resume it, exit code 130."""
    common = [*TINY, "train.max_steps=100000", "train.save_every=2", f"out_dir={tmp_path}",
              f"data.cache_dir={shared_cache}"]
    live = start_cli("pretrain", *common)
    wait_for(lambda: any((tmp_path / "pretrain").glob("*/checkpoints/step_*/trainer_state.pt")))
    live.send_signal(signal.SIGINT)
    _, err = live.communicate(timeout=120)
    (run,) = (tmp_path / "pretrain").iterdir()
    assert live.returncode == 130, err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"ntp-rl: interrupted; {run} is marked interrupted; run the same command "
                                            "with resume=auto to continue from its last checkpoint")
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted"


def test_run_json_records_what_the_numbers_depend_on(tmp_path, shared_cache):
    import torch
    import transformers

    from ntp_rl.config.compose import compose
    from ntp_rl.stages import run_stage

    args = [*TINY, "train.max_steps=1", f"out_dir={tmp_path}", f"data.cache_dir={shared_cache}"]
    run_stage("pretrain", compose("pretrain", args), args)
    (run_json,) = tmp_path.rglob("run.json")
    env = json.loads(run_json.read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["transformers"] == transformers.__version__
    assert env["ntp_rl"] == "0.1.0" and env["torch_threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))
    # the same run on a CPU with other vector instructions drifts: the record must say which kernels ran
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu_capability"]


def test_progress_on_a_log_file_is_plain_lines_at_the_log_interval(tmp_path, shared_cache, capsys):
    """stdout/stderr are not terminals here (as in `ntp-rl pretrain > log`): no \\r frames, one line per log step."""
    from ntp_rl.cli import main

    args = [*TINY, "logger.progress_bar=true", "train.max_steps=6", "train.log_every=2", f"out_dir={tmp_path}",
            f"data.cache_dir={shared_cache}"]
    main(["pretrain", *args])
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err
    lines = [line for line in captured.out.splitlines() if line.startswith("pretrain: ")]
    assert [line.split(" |")[0] for line in lines] == ["pretrain: 2/6 it", "pretrain: 4/6 it", "pretrain: 6/6 it"]
    assert all("| loss " in line for line in lines), lines


def test_console_paths_are_relative_to_the_current_directory_when_under_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert rundir.shown_path(tmp_path / "outputs" / "pretrain" / "x") == "outputs/pretrain/x"
    assert rundir.shown_path(Path("outputs/rl/y")) == "outputs/rl/y"
    assert rundir.shown_path(Path("/elsewhere/z")) == "/elsewhere/z"


def test_a_key_the_runs_config_lacks_is_compared_with_its_schema_default(tmp_path):
    """A run saved by an ntp-rl that had no rl.plateau ran without it: continuing it with the rule changes its
    computation and must be named (refused without resume_allow_changes); the key at its default is no change."""
    from omegaconf import OmegaConf

    from ntp_rl.config.compose import compose

    saved = OmegaConf.to_container(compose("rl", ["init_from=x"]), resolve=True, enum_to_str=True)
    del saved["rl"]["plateau"]  # as an older version wrote it
    (tmp_path / rundir.CONFIG_FILE).write_text(OmegaConf.to_yaml(saved))

    assert rundir.config_changes(tmp_path, compose("rl", ["init_from=x"])) == []
    assert rundir.config_changes(tmp_path, compose("rl", ["init_from=x", "rl.plateau.patience=50"])) == [
        {"key": "rl.plateau.patience", "was": None, "now": 50}]
    assert rundir.config_changes(tmp_path, compose("rl", ["init_from=x", "rl.plateau.patience=50", "rl.max_steps=7"])) == [
        {"key": "rl.max_steps", "was": 60, "now": 7}, {"key": "rl.plateau.patience", "was": None, "now": 50}]
