"""`ntp-rl compare` on small synthetic run directories written in the runs' own formats."""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from ntp_rl.io import write_json_atomic
from ntp_rl.stages.compare import compare


def write_run(path: Path, stage: str, status: str = "finished", overrides=(), seed=0, results=None, metrics=()):
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / "run.json", {"stage": stage, "status": status, "overrides": list(overrides)})
    OmegaConf.save(OmegaConf.create({"seed": seed, "stage": stage}), path / "config.yaml")
    if results is not None:
        write_json_atomic(path / "results.json", results)
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def write_lineage(root: Path, loss: str, seed: int, accuracy: float, after: float, stop_before: str = ""):
    lineage = root / f"pipeline-loss={loss},seed={seed}"
    write_run(lineage, "pipeline", overrides=[f"loss={loss}", f"seed={seed}", f"out_dir={root}"], seed=seed)
    stages = {
        "pretrain": {"val": {"nll": 0.5 + seed / 10, "ppl": 1.6, "entropy": 0.4 + accuracy}},
        "eval_base": {"summary": {"avg@4": accuracy, "cons@4": accuracy, "pass@1": accuracy, "pass@4": 2 * accuracy}},
        "rl": {"eval_before": {"avg@4": accuracy}, "eval_after": {"avg@4": after}},
        "eval_rl": {"summary": {"avg@4": after, "cons@4": after, "pass@1": after, "pass@4": min(1.0, 2 * after)}},
    }
    metrics = {
        "pretrain": [{"step": s, "train/nll": 3 - s, "train/entropy": 2 - s / 2} for s in (1, 2, 3)],
        "rl": [{"step": s, "reward": accuracy + s / 10, "entropy": 0.5, "completions/mean_length": 20 + s} for s in (1, 2)],
    }
    for stage, results in stages.items():
        if stage == stop_before:
            write_run(lineage / stage, stage, status="failed", seed=seed)
            break
        write_run(lineage / stage, stage, seed=seed, results=results, metrics=metrics.get(stage, ()))
    return lineage


def test_table_averages_seeds_per_setting_and_lists_incomplete_runs(tmp_path):
    root = tmp_path / "pipeline"
    write_lineage(root, "ce", 0, accuracy=0.10, after=0.20)
    write_lineage(root, "ce", 1, accuracy=0.20, after=0.40)
    write_lineage(root, "precision", 0, accuracy=0.30, after=0.50)
    broken = write_lineage(root, "precision", 1, accuracy=0.9, after=0.9, stop_before="rl")

    result = compare([str(root)], str(tmp_path / "out"))
    rows = {r["setting"]: r for r in result["rows"]}
    assert set(rows) == {"loss=ce", "loss=precision"}
    assert rows["loss=ce"]["seeds"] == 2 and rows["loss=precision"]["seeds"] == 1
    assert rows["loss=ce"]["base avg@4"] == pytest.approx(0.15)
    assert rows["loss=ce"]["rl avg@4"] == pytest.approx(0.30)
    assert rows["loss=ce"]["rl avg@4 std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows["loss=precision"]["rl pass@4"] == pytest.approx(1.0)  # the broken seed is not averaged in
    assert result["incomplete"] == [str(broken.resolve())]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "0.1500 ± 0.0707" in table and "rl: failed" in table and "eval_rl: not run" in table
    with open(tmp_path / "out" / "compare.csv") as f:
        assert {r["setting"] for r in csv.DictReader(f)} == {"loss=ce", "loss=precision"}
    for name in ("pretrain_curves.png", "rl_curves.png", "passk.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000, name


def test_standalone_runs_of_a_sweep(tmp_path):
    sweep = tmp_path / "sweeps" / "pretrain-x"
    for i, beta in enumerate((-0.25, 0.0, 0.5)):
        write_run(sweep / str(i), "pretrain", overrides=[f"loss.beta={beta}", "train.max_steps=9"],
                  results={"val": {"nll": 1.0 + beta, "ppl": 2.0, "entropy": 0.5 + beta}})
    write_run(sweep / "3", "pretrain", status="running", overrides=["loss.beta=1.0", "train.max_steps=9"])
    result = compare([str(sweep)])
    labels = sorted(r["setting"] for r in result["rows"])
    assert labels == ["loss.beta=-0.25", "loss.beta=0.0", "loss.beta=0.5"]  # the shared override is dropped
    assert len(result["incomplete"]) == 1 and (sweep / "compare" / "compare.md").exists()


def test_compare_from_the_shell_and_bad_paths(tmp_path):
    write_lineage(tmp_path / "p", "ce", 0, accuracy=0.1, after=0.2)
    ok = run_cli("compare", str(tmp_path / "p"), "--out", str(tmp_path / "o"))
    assert ok.returncode == 0, ok.stderr
    assert "| default |" in ok.stdout  # one setting: nothing tells it apart from another
    missing = run_cli("compare", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such directory" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = run_cli("compare", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no ntp-rl runs" in empty.stderr
