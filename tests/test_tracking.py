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
