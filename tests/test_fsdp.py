"""FSDP through `accelerate launch --config_file scripts/accelerate/fsdp.yaml`: recorded, and never silently DDP."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO
from ntp_rl.errors import UserError

@pytest.mark.slow  # two launched processes: about 40 s on 2 cores
def test_the_fsdp_config_on_cpu_is_refused_before_anything_is_written(tiny, tmp_path):
    """Accelerate sets an FSDP launch up as DDP on CPU, without a word: the run stops in one line instead."""
    config = (REPO / "scripts" / "accelerate" / "fsdp.yaml").read_text()
    cpu_config = tmp_path / "fsdp_cpu.yaml"
    cpu_config.write_text(config.replace("num_processes: 8", "num_processes: 2").replace("use_cpu: false", "use_cpu: true")
                          .replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config), "-m",
                             "ntp_rl", "pretrain", *tiny, f"run_dir={tmp_path / 'run'}"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("ntp-rl: error:")]
    assert errors and "asked for FSDP (fsdp_version 2) but the run was set up as ddp" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_a_launch_that_asked_for_fsdp_and_got_ddp_is_refused_in_one_line(monkeypatch):
    from accelerate.utils import DistributedType

    from ntp_rl.runtime import check_parallelism, parallelism

    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2, is_fsdp2=False)
    fsdp2 = SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2, is_fsdp2=True)
    assert parallelism(ddp) == {"kind": "ddp", "world_size": 2}
    assert parallelism(fsdp2) == {"kind": "fsdp2", "world_size": 2}
    check_parallelism(ddp)  # nobody asked for FSDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    check_parallelism(fsdp2)
    with pytest.raises(UserError) as caught:
        check_parallelism(ddp)
    message = str(caught.value)
    assert "\n" not in message and "asked for FSDP (fsdp_version 1)" in message and "set up as ddp" in message
