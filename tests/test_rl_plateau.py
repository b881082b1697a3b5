"""rl.plateau: RL that ends once held-out accuracy levels off -- the rule on known curves, then whole runs."""

import json

import pytest

from ntp_rl.checkpoint import latest_checkpoint
from ntp_rl.rl.plateau import stopping_step
from rl_helpers import eval_rows, rl_run, step_rows
from rl_helpers import one_thread, policy, rl_args  # noqa: F401 (fixtures)

# The validation avg@8 of a CE policy's RL every 25 steps (docs/rl-study-matched.md, the pilot's continuation):
# it looks flat at 175-225 and then rises again.
RISING = [(0, 0.305), (25, 0.554), (50, 0.627), (75, 0.688), (100, 0.695), (125, 0.741), (150, 0.768),
          (175, 0.792), (200, 0.800), (225, 0.809), (250, 0.850), (275, 0.867), (300, 0.889)]


@pytest.mark.parametrize(
    "curve, patience, min_gain, min_steps, step",
    [
        (RISING, 50, 0.01, 0, None),  # 200 gains only 0.008 on 175, but 225 beats 175 by 0.017: still rising
        (RISING, 25, 0.01, 0, 100),  # one check without a gain of 0.01 is enough at patience 25
        (RISING, 25, 0.01, 150, 200),  # ... but not before min_steps
        (RISING, 25, 0.0, 0, None),  # every check beats the last
        ([(0, 0.5), (10, 0.5), (20, 0.5)], 20, 0.0, 0, 20),  # flat: equal is no gain
        ([(0, 0.5), (10, 0.6), (20, 0.4), (30, 0.55), (40, 0.6)], 30, 0.0, 0, 40),  # a fall does not reset it
        ([(0, 0.5), (10, 0.505), (20, 0.509), (30, 0.508)], 30, 0.01, 0, 30),  # gains within the noise
        ([(0, 0.5), (10, 0.506), (20, 0.512), (30, 0.518)], 30, 0.01, 0, None),  # small gains that add up count:
        # 20 beats 0 by more than 0.01, so patience runs from 20
    ],
)
def test_the_rule_stops_a_known_curve_where_early_stopping_would(curve, patience, min_gain, min_steps, step):
    assert stopping_step(curve, patience, min_gain, min_steps) == step


def plateau_args(rl_args, patience, min_gain, max_steps):
    return [*rl_args, "rl.eval_split=validation", f"rl.max_steps={max_steps}", "rl.eval_every=2", "rl.save_every=4",
            f"rl.plateau.patience={patience}", f"rl.plateau.min_gain={min_gain}"]


def test_a_run_that_levels_off_stops_there_with_a_checkpoint_and_is_finished(rl_args, tmp_path, capsys):
    # No check can beat the step-0 one by more than 1: the rule stops at the first check 4 steps after it.
    run_dir = tmp_path / "run"
    results = rl_run([*plateau_args(rl_args, 4, 1.0, 12), f"run_dir={run_dir}"])
    assert results["step"] == 4 and results["stopped_at"]["step"] == 4
    assert results["stopped_at"]["best_step"] == 0 and results["stopped_at"]["split"] == "validation"
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000004", "a checkpoint where it stopped"
    assert sorted(step_rows(run_dir)) == [1, 2, 3, 4] and sorted(eval_rows(run_dir)) == [0, 2, 4]
    assert results["eval_after"]["avg@4"] == eval_rows(run_dir)[4]["eval/avg@4"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert "stopped at step 4 of 12" in capsys.readouterr().out
    assert rl_run([*plateau_args(rl_args, 4, 1.0, 12), f"run_dir={run_dir}", "resume=auto"]) == results, \
        "a run that levelled off is finished: resume=auto does not train it further"


def test_the_rule_resumes_where_it_was_and_a_cap_reached_first_is_said(rl_args, tmp_path):
    run_dir = tmp_path / "run"
    capped = rl_run([*plateau_args(rl_args, 6, 1.0, 4), f"run_dir={run_dir}"])
    assert capped["step"] == 4 and capped["stopped_at"] is None
    assert "plateau_not_reached" in capped["notices"]
    # Continued to a larger cap: the rule's last improvement (step 0) comes from the checkpoint, so it stops at
    # step 6; a rule that started over at the resume would first stop at step 12.
    more = rl_run([*plateau_args(rl_args, 6, 1.0, 20), f"run_dir={run_dir}", "resume=auto", "resume_allow_changes=true"])
    assert more["step"] == 6 and more["stopped_at"]["best_step"] == 0


def test_a_run_continued_with_the_rule_reads_the_checks_it_logged_before(rl_args, tmp_path, capsys):
    """A run trained without rl.plateau, then continued with it (resume_allow_changes=true): its checkpoints
    hold no rule state, so the rule reads the logged checks, and stops where a run with the rule from the
    start would have."""
    run_dir = tmp_path / "run"
    plain = rl_run([*rl_args, "rl.eval_split=validation", "rl.max_steps=4", "rl.eval_every=2", f"run_dir={run_dir}"])
    assert "stopped_at" not in plain
    more = rl_run([*plateau_args(rl_args, 6, 1.0, 20), f"run_dir={run_dir}", "resume=auto", "resume_allow_changes=true"])
    assert more["step"] == 6 and more["stopped_at"]["best_step"] == 0, "the step-0 check, read from the log"
    # Had the rule read a curve on which it would already have stopped, the run says so and stops at its next check.
    again = tmp_path / "again"
    rl_run([*rl_args, "rl.eval_split=validation", "rl.max_steps=4", "rl.eval_every=2", f"run_dir={again}"])
    late = rl_run([*plateau_args(rl_args, 2, 1.0, 20), f"run_dir={again}", "resume=auto", "resume_allow_changes=true"])
    assert late["step"] == 6 and late["notices"]["plateau_before_resume"] == 2
    assert "rl.plateau would have stopped this run at step 2" in capsys.readouterr().out
