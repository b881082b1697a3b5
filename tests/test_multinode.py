"""Two "nodes" on this machine: `accelerate launch --config_file scripts/accelerate/multinode.yaml` run twice, with
--machine_rank 0 and 1, one process each over gloo, as two machines would run it."""

import json
import socket
import subprocess
import sys

import pytest

from conftest import REPO
from test_pretrain import pretrain, run_dirs, train_rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_train_as_one_process_does(tiny, tmp_path):
    one = tmp_path / "one"
    pretrain([*tiny, "train.micro_batch_size=8", "train.log_every=1", f"run_dir={one}"])

    config = (REPO / "scripts" / "accelerate" / "multinode.yaml").read_text()
    local = tmp_path / "two_nodes.yaml"
    local.write_text(config.replace("num_processes: 16", "num_processes: 2").replace("use_cpu: false", "use_cpu: true")
                     .replace("mixed_precision: bf16", "mixed_precision: 'no'").replace("gpu_ids: all\n", ""))
    two = tmp_path / "two"
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(local),
                               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", str(port), "-m", "ntp_rl", "pretrain", *tiny,
                               "train.micro_batch_size=4", "train.log_every=1", f"run_dir={two}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-3000:]
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "finished" and info["environment"]["distributed"] == {"kind": "ddp", "world_size": 2}
    assert len(run_dirs(tmp_path)) == 2, "the second node must not create a run directory of its own"
    a, b = train_rows(one), train_rows(two)
    for step in range(1, 7):
        assert b[step]["train/loss"] == pytest.approx(a[step]["train/loss"], rel=1e-4), step
        assert b[step]["train/grad_norm"] == pytest.approx(a[step]["train/grad_norm"], rel=1e-3), step
