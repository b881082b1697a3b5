"""scripts/sweep.py: one launch per sweep point, under `accelerate launch` with 2 CPU processes."""

import json
import subprocess
import sys

from conftest import REPO
from ntp_rl.launch import sweep_points


def test_sweep_points_follow_hydras_grammar():
    assert sweep_points(["loss=ce,precision", "seed=0,1", "x=1"]) == [
        ["loss=ce", "seed=0", "x=1"], ["loss=ce", "seed=1", "x=1"],
        ["loss=precision", "seed=0", "x=1"], ["loss=precision", "seed=1", "x=1"]]


def test_each_point_is_launched_with_two_processes_and_compared(tiny, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "scripts/sweep.py", "--launcher",
           f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 "
           "--mixed_precision no --dynamo_backend no",
           "--out", str(out), "pretrain", "loss.beta=-0.25,0.5", *tiny, "train.max_steps=2"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for i, beta in enumerate((-0.25, 0.5)):
        info = json.loads((out / str(i) / "run.json").read_text())
        assert info["status"] == "finished" and info["world_size"] == 2
        assert info["name"] == f"pretrain-loss.beta={beta}"
    assert "| loss.beta=-0.25 |" in result.stdout and (out / "compare" / "compare.md").exists()


def test_a_bad_point_stops_the_sweep_before_anything_runs(tmp_path):
    result = subprocess.run([sys.executable, "scripts/sweep.py", "--out", str(tmp_path / "s"), "pretrain",
                             "loss.k=10,0"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and "loss.k=0" in result.stderr
    assert not (tmp_path / "s").exists()
