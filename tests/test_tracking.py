"""Real W&B, offline: what a lineage's runs write to W&B's own files is what metrics.jsonl holds,
under the lineage's group, each stage's job type and the settings' tags."""

from pathlib import Path

from conftest import TINY
from ntp_rl.config.compose import compose
from ntp_rl.stages import run_stage
from ntp_rl.tracking import read_metrics
from wandb_offline import history_by_step, read_run, run_files


def test_a_lineage_logs_to_wandb_offline_with_group_job_type_and_tags(tmp_path, shared_cache):
    overrides = ["loss=precision"]
    args = [*TINY, "stages=[pretrain,eval_base]", "eval.n=2", "eval.ks=[1,2]", "eval.num_problems=4",
            "sampling.max_new_tokens=8", "diagnostics.num_sequences=4", "logger.wandb.mode=offline",
            f"out_dir={tmp_path}", f"data.cache_dir={shared_cache}", *overrides]
    result = run_stage("pipeline", compose("pipeline", args), overrides=overrides)
    lineage = Path(result["lineage"])
    import wandb

    wandb.teardown()  # W&B's service writes the run files in the background: let it finish before reading them

    for stage, job_type in (("pretrain", "pretrain"), ("eval_base", "eval")):
        (run_file,) = run_files(lineage / stage)
        run = read_run(run_file)
        assert run["group"] == lineage.name == "pipeline-loss=precision"
        assert run["job_type"] == job_type and run["tags"] == ["loss=precision"]
        assert run["name"] == f"pipeline-loss=precision/{stage}"
        logged = history_by_step(run_file)
        local = {row["step"]: row for row in read_metrics(lineage / stage)}
        assert logged and set(logged) == set(local), stage
        for step, row in local.items():
            for key, value in row.items():
                if key != "step" and isinstance(value, float):
                    assert logged[step][key] == value, (stage, step, key)


# ---------------------------------------------------------------------------
# W&B never kills a run (issue 25, item 3): no network or no login


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_auto_mode_without_a_reachable_server_logs_offline_with_one_line(tmp_path, shared_cache, monkeypatch):
    """Logged in (a key set) on a machine that cannot reach the W&B server: the run trains, logs offline, and says
    why in one line, instead of W&B's 90 s wait and traceback."""
    import json

    from conftest import run_cli

    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.delenv("WANDB_MODE")  # the tests' `disabled` would win over auto
    result = run_cli("pretrain", *TINY, "train.max_steps=2", "logger.wandb.mode=auto", f"out_dir={tmp_path}",
                     f"data.cache_dir={shared_cache}",
                     env={"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": url}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    said = [line for line in result.stderr.splitlines() if "W&B" in line]
    assert len(said) == 1 and said[0].startswith(f"W&B: offline (cannot reach the W&B server {url} ("), said
    (run_json,) = tmp_path.rglob("run.json")
    assert json.loads(run_json.read_text())["status"] == "finished"
    assert list((run_json.parent / "wandb").glob("offline-run-*")), "W&B's files are kept for `wandb sync`"


def test_explicit_online_is_refused_in_one_line_before_a_run_directory_exists(tmp_path, monkeypatch, capsys):
    """logger.wandb.mode=online against a server that never answers, and WANDB_MODE=online without a login."""
    import socket
    import time

    import pytest

    from ntp_rl.cli import main
    from ntp_rl.config.schema import WandbMode
    from ntp_rl.errors import ConfigError
    from ntp_rl.tracking import resolve_wandb

    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.delenv("WANDB_MODE")
    try:
        started = time.monotonic()
        with pytest.raises(ConfigError, match="cannot reach the W&B server"):
            resolve_wandb(WandbMode.online)
        assert time.monotonic() - started < 10, "the refusal must come within 10 s"
        auto = resolve_wandb(WandbMode.auto)
        assert auto[0] == "offline" and auto[1].startswith(f"cannot reach the W&B server {url} (")

        args = ["pretrain", *TINY, f"out_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]
        with pytest.raises(SystemExit) as refused:
            main([*args, "logger.wandb.mode=online"])
        err = capsys.readouterr().err.strip()
        assert refused.value.code == 2 and "\n" not in err, err
        assert err.startswith(f"ntp-rl: error: logger.wandb.mode=online: cannot reach the W&B server {url} (")
        assert err.endswith("; use logger.wandb.mode=auto (or offline) to log offline and `wandb sync` later")
    finally:
        silent.close()

    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: not logged in
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(SystemExit) as refused:
        main([*args, "logger.wandb.mode=auto"])
    assert capsys.readouterr().err.strip() == (
        "ntp-rl: error: WANDB_MODE=online: not logged in to W&B (run `wandb login`, or set WANDB_API_KEY); "
        "use logger.wandb.mode=auto (or offline) to log offline and `wandb sync` later")
    assert not list(tmp_path.rglob("run.json")), "refused before any run directory exists"
