"""`ntp-rl pipeline`: stage chaining, skipping finished stages, resuming an interrupted one, experiments."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY, run_cli
from ntp_rl.checkpoint import latest_checkpoint
from ntp_rl.cli import check_command_line
from ntp_rl.config.compose import compose
from ntp_rl.errors import UserError
from ntp_rl.stages import run_stage

# A lineage in seconds: the tiny pre-training of conftest, 4 RL steps, small evals.
PIPE = [
    *TINY, "task.difficulty=1", "rl.max_steps=4", "rl.prompts_per_step=4", "rl.num_generations=4",
    "rl.micro_batch_size=8", "rl.sampling.max_new_tokens=24", "rl.sampling.batch_size=8", "rl.train_problems=64",
    "rl.eval_problems=8", "rl.eval_samples=4", "rl.eval_ks=[1,4]", "rl.eval_every=2", "rl.save_every=2",
    "rl.eval_sampling.max_new_tokens=24", "eval.n=4", "eval.ks=[1,2,4]", "eval.num_problems=6",
    "sampling.max_new_tokens=24", "diagnostics.num_sequences=6",
]


@pytest.fixture
def pipe(tmp_path, shared_cache):
    return [*PIPE, f"out_dir={tmp_path / 'outputs'}", f"data.cache_dir={shared_cache}"]


def info(path: Path) -> dict:
    return json.loads((path / "run.json").read_text())


def test_stages_chain_into_one_lineage_and_a_rerun_skips_them(pipe, tmp_path, capsys):
    overrides = ["loss=precision", "seed=1"]
    first = run_stage("pipeline", compose("pipeline", [*pipe, *overrides]), overrides=overrides)
    lineage = tmp_path / "outputs" / "pipeline" / "pipeline-loss=precision,seed=1"
    assert Path(first["lineage"]) == lineage and info(lineage)["status"] == "finished"
    for step, stage in (("pretrain", "pretrain"), ("eval_base", "eval"), ("rl", "rl"), ("eval_rl", "eval")):
        assert info(lineage / step)["status"] == "finished" and info(lineage / step)["stage"] == stage
        cfg = OmegaConf.load(lineage / step / "config.yaml")
        assert cfg.seed == 1
        assert cfg.logger.wandb.group == "pipeline-loss=precision,seed=1"  # one W&B group per lineage
        assert cfg.logger.wandb.name == f"pipeline-loss=precision,seed=1/{step}"
    # each stage reads the previous stage's checkpoint
    assert OmegaConf.load(lineage / "pretrain" / "config.yaml").loss.beta == -0.25
    assert OmegaConf.load(lineage / "rl" / "config.yaml").init_from == str(lineage / "pretrain")
    base = json.loads((lineage / "eval_base" / "results.json").read_text())
    after = json.loads((lineage / "eval_rl" / "results.json").read_text())
    assert base["model"] == str(latest_checkpoint(lineage / "pretrain" / "checkpoints"))
    assert after["model"] == str(latest_checkpoint(lineage / "rl" / "checkpoints"))
    assert "base_avg@4" in first["summary"] and "rl_avg@4" in first["summary"]

    capsys.readouterr()
    again = run_stage("pipeline", compose("pipeline", [*pipe, *overrides]), overrides=overrides)
    out = capsys.readouterr().out
    assert out.count("already finished") == 4
    assert again["summary"] == first["summary"]


def test_an_interrupted_stage_resumes_and_the_finished_ones_are_kept(pipe, tmp_path):
    args = ["pipeline", *pipe]
    killed = run_cli(*args, env={"NTP_RL_KILL_AT": "checkpoint_done:2"})  # rl saves at step 2; pretrain at 3 and 6
    assert killed.returncode == -9, killed.stderr[-2000:]
    (lineage,) = (tmp_path / "outputs" / "pipeline").iterdir()
    assert info(lineage)["status"] == "running"
    assert info(lineage / "eval_base")["status"] == "finished" and info(lineage / "rl")["status"] == "running"
    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[pretrain] already finished" in resumed.stdout and "[eval_base] already finished" in resumed.stdout
    assert "[rl] resuming" in resumed.stdout and "resumed from" in resumed.stdout
    assert info(lineage)["status"] == "finished" and info(lineage / "eval_rl")["status"] == "finished"


def test_a_lineages_rl_continued_in_a_copy_runs_on_and_is_evaluated_again(pipe, tmp_path, capsys):
    """How a study's RL is made longer after the fact (docs/studies.md): a copy of the finished lineage without
    its RL results and its eval_rl, run again with more RL steps; the original is left as it was."""
    import shutil

    first = run_stage("pipeline", compose("pipeline", pipe), overrides=[])
    lineage, copy = Path(first["lineage"]), tmp_path / "longer"
    shutil.copytree(lineage, copy)
    (copy / "rl" / "results.json").unlink()
    shutil.rmtree(copy / "eval_rl")
    longer = [*pipe, f"run_dir={copy}", "rl.max_steps=6"]
    with pytest.raises(UserError, match="rl.max_steps"):
        run_stage("pipeline", compose("pipeline", longer), overrides=longer[-1:])
    capsys.readouterr()
    longer.append("resume_allow_changes=true")
    run_stage("pipeline", compose("pipeline", longer), overrides=longer[-2:])
    out = capsys.readouterr().out
    assert "[pretrain] already finished" in out and "[rl] resuming" in out and "rl.max_steps 4 -> 6" in out
    assert json.loads((copy / "rl" / "results.json").read_text())["step"] == 6
    assert json.loads((copy / "eval_rl" / "results.json").read_text())["model"] == str(copy / "rl" / "checkpoints" / "step_00000006")
    assert json.loads((lineage / "rl" / "results.json").read_text())["step"] == 4, "the original lineage is kept"


def test_paper_small_is_the_papers_five_settings_over_seeds():
    from ntp_rl.config.compose import compose as compose_with

    hydra = compose_with("pipeline", ["experiment=paper_small"], hydra=True).hydra
    assert hydra.sweeper.params.loss == "ce,precision,diversity,tail_penalty,head_reward"
    assert len(hydra.sweeper.params.seed.split(",")) >= 2 and hydra.runtime.choices["hydra/launcher"] == "local"
    assert compose("pipeline", ["experiment=paper_small"]).stages == ["pretrain", "eval_base", "rl", "eval_rl"]
    assert run_cli("experiment=paper_small", "--cfg", "job").returncode == 0  # `ntp-rl experiment=...` is a pipeline


def test_paper_study_runs_five_paired_seeds_per_setting_on_a_forking_corpus():
    from ntp_rl.config.compose import compose as compose_with

    params = compose_with("pipeline", ["experiment=paper_study"], hydra=True).hydra.sweeper.params
    assert params.loss == "ce,precision,diversity" and len(params.seed.split(",")) >= 5
    checked = check_command_line("pipeline", ["-m", "experiment=paper_study"])
    assert checked.plan.num_points == 15 and checked.plan.swept_keys == ["loss", "seed"]
    cfg = compose("pipeline", ["experiment=paper_study"])
    assert cfg.data.solution_order.value == "any" and cfg.loss.k == 10


def test_rl_study_tunes_on_validation_and_reports_on_test():
    """The pre-registered study (docs/rl-study.md): RL's own checks never read the test split; the verdicts'
    evals do, and only they."""
    cfg = compose("pipeline", ["experiment=rl_study"])
    assert cfg.rl.eval_split == "validation" and cfg.eval.split == "test"
    assert cfg.data.solution_order.value == "any" and cfg.train.max_steps == 700 and cfg.rl.max_steps == 150
    assert cfg.rl_optim.lr == 1e-4  # the pilot's rate, whatever rl's default becomes
    assert cfg.hypotheses == "rl_study"  # its closing compare judges the pre-registered hypotheses


def test_rl_study_matched_stops_every_base_at_one_validation_accuracy():
    """docs/rl-study-matched.md: rl_study's RL and evals, with pre-training ended by accuracy on validation."""
    cfg = compose("pipeline", ["experiment=rl_study_matched"])
    assert cfg.train.stop_at.accuracy == 0.25 and cfg.train.stop_at.split == "validation"
    assert cfg.rl.eval_split == "validation" and cfg.eval.split == "test" and cfg.rl.max_steps == 150
    assert cfg.hypotheses == "rl_study_matched"


def test_rl_study_plateau_is_rl_study_matched_with_rl_run_until_it_levels_off():
    """The registered extension (docs/rl-study-matched.md): its lineages must be rl_study_matched's in every
    key but RL's length, or its verdicts would not be the same study's once RL has levelled off."""
    from ntp_rl.rundir import _flat  # the flattening resume compares configs with

    def keys(overrides):
        return _flat(OmegaConf.to_container(compose("pipeline", overrides), resolve=True))

    matched, plateau = keys(["experiment=rl_study_matched", "loss=precision"]), keys(["experiment=rl_study_plateau", "loss=precision"])
    differ = {key for key in matched.keys() | plateau.keys() if matched.get(key) != plateau.get(key)}
    assert {"rl.max_steps", "rl.plateau.patience"} <= differ <= {"rl.max_steps", "rl.plateau.patience", "rl.plateau.min_gain"}
    assert (plateau["rl.max_steps"], plateau["rl.plateau.patience"], plateau["rl.plateau.min_gain"]) == (600, 50, 0.01)
    assert plateau["rl.eval_split"] == "validation"  # the rule reads validation checks, the verdicts the test split

@pytest.mark.parametrize("experiment", sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates_at_every_point(experiment, monkeypatch):
    # the GPU experiment included: its sizes are checked here even where it cannot run (its SLURM launcher
    # is refused without sbatch, which a cluster has)
    import shutil

    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kw: "/cluster/bin/sbatch" if name == "sbatch"
                        else which(name, *args, **kw))
    checked = check_command_line("pipeline", ["-m", f"experiment={experiment}"])
    assert checked.plan.num_points >= 6  # settings x seeds


@pytest.mark.parametrize("args, key", [
    (["stages=[rl,pretrain]"], "stages"),
    (["stages=[train]"], "stages"),
    (["rl_optim.lr=-1"], "rl_optim.lr"),
    (["rl.num_generations=1"], "rl.num_generations"),
    (["eval.ks=[1,64]"], "eval.ks"),
    (["resume=auto"], "resume"),
])
def test_bad_pipeline_settings_fail_in_one_line(args, key):
    with pytest.raises(UserError) as exc:
        check_command_line("pipeline", args)
    assert key in str(exc.value) and "\n" not in str(exc.value)


def test_a_hydra_multirun_makes_one_lineage_per_setting(pipe, tmp_path):
    result = run_cli("pipeline", "-m", "loss=ce,precision", *pipe, "rl.max_steps=2", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lineages = sorted((tmp_path / "outputs" / "pipeline").iterdir())
    assert len(lineages) == 2 and all(info(p)["status"] == "finished" for p in lineages)
    again = run_cli("pipeline", "-m", "loss=ce,precision", *pipe, "rl.max_steps=2", timeout=600)
    assert again.returncode == 0 and again.stdout.count("already finished") == 8  # the same lineages, found again
