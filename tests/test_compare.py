"""`ntp-rl compare` on small synthetic run directories written in the runs' own formats."""

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from conftest import run_cli
from ntp_rl.errors import UserError
from ntp_rl.io import write_json_atomic
from ntp_rl.stages.compare import compare
from ntp_rl.study.report import format_p
from ntp_rl.study.wandb_log import WandbOptions
from wandb_offline import read_run, run_files


def write_run(path: Path, stage: str, status: str = "finished", overrides=(), seed=0, results=None, metrics=(),
              config=None):
    path.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path / "run.json", {"stage": stage, "status": status, "overrides": list(overrides)})
    OmegaConf.save(OmegaConf.create({"seed": seed, "stage": stage, **(config or {})}), path / "config.yaml")
    if results is not None:
        write_json_atomic(path / "results.json", results)
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def write_lineage(root: Path, loss: str, seed: int, accuracy: float, after: float, stop_before: str = "",
                  entropy: float = 0.5, group: str = None):
    """A pipeline lineage as `ntp-rl pipeline` writes it: base diagnostics, evals before and after RL."""
    lineage = root / f"pipeline-loss={loss},seed={seed}"
    write_run(lineage, "pipeline", overrides=[f"loss={loss}", f"seed={seed}", f"out_dir={root}"], seed=seed)
    stages = {
        "pretrain": {"val": {"nll": 0.5 + seed / 10, "ppl": 1.6, "entropy": 0.4 + accuracy},
                     "loss": {"name": loss, "beta": 0.0}},
        "eval_base": {"summary": {"avg@4": accuracy, "cons@4": accuracy, "pass@1": accuracy, "pass@4": 2 * accuracy},
                      "diagnostics": {"entropy": entropy, "nll": 0.6, "tail_mass": 0.01 + seed / 100,
                                      "topk_mass": 0.99 - seed / 100, "forking_share": 0.2}},
        "rl": {"eval_before": {"avg@4": accuracy}, "eval_after": {"avg@4": after}},
        "eval_rl": {"summary": {"avg@4": after, "cons@4": after, "pass@1": after, "pass@4": min(1.0, 2 * after)}},
    }
    metrics = {
        "pretrain": [{"step": s, "train/nll": 3 - s / 2, "train/entropy": 2 - s / 2} for s in (1, 2, 3)],
        "rl": [{"step": s, "reward": accuracy + s / 10, "entropy": 0.5 - s * accuracy, "completions/mean_length": 20 + s,
                "dynamic_sampling/filled_groups": s + seed} for s in (1, 2)],
    }
    wandb_cfg = {"logger": {"wandb": {"group": group or lineage.name, "project": "ntp-rl-tests"}}}
    for stage, results in stages.items():
        if stage == stop_before:
            write_run(lineage / stage, stage, status="failed", seed=seed)
            break
        write_run(lineage / stage, stage, seed=seed, results=results, metrics=metrics.get(stage, ()), config=wandb_cfg)
    return lineage


@pytest.fixture
def no_figures(monkeypatch):
    """For the tests that read only tables: drawing is most of compare's time."""
    monkeypatch.setattr("ntp_rl.stages.compare.write_figures", lambda *args, **kwargs: [])



def test_a_midtrain_stage_has_columns_of_its_own(tmp_path, no_figures):
    root = tmp_path / "pipeline"
    for seed in (0, 1):
        write_lineage(root, "ce", seed, accuracy=0.1, after=0.2)
        mid = write_lineage(root, "dft", seed, accuracy=0.1, after=0.3)
        write_run(mid / "midtrain", "midtrain", seed=seed,
                  results={"val": {"nll": 0.6 + seed / 10, "ppl": 1.9, "entropy": 0.2}, "loss": {"name": "dft"}})
    rows = {r["setting"]: r for r in compare([str(root)], str(tmp_path / "out"))["rows"]}
    assert rows["loss=dft"]["midtrain nll"] == pytest.approx(0.65)
    assert rows["loss=dft"]["midtrain entropy-nll"] == pytest.approx(-0.45)  # 0.2 - 0.6 and 0.2 - 0.7
    assert rows["loss=dft"]["pretrain nll"] == pytest.approx(0.55)  # pre-training's own, beside it
    assert "midtrain nll" not in rows["loss=ce"]
    header = next(line for line in (tmp_path / "out" / "compare.md").read_text().splitlines() if line.startswith("| setting"))
    assert header.index("pretrain entropy-nll") < header.index("midtrain nll") < header.index("base avg@4")

def by(comparisons, metric, setting):
    return next(c for c in comparisons if c.metric == metric and c.setting == setting)


def test_means_with_intervals_over_seeds_and_incomplete_lineages_listed(tmp_path):
    root = tmp_path / "pipeline"
    write_lineage(root, "ce", 0, accuracy=0.10, after=0.20)
    write_lineage(root, "ce", 1, accuracy=0.20, after=0.40)
    write_lineage(root, "precision", 0, accuracy=0.30, after=0.50)
    broken = write_lineage(root, "precision", 1, accuracy=0.9, after=0.9, stop_before="rl")

    result = compare([str(root)], str(tmp_path / "out"))
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["loss=ce", "loss=precision"]  # the baseline first
    assert rows["loss=ce"]["seeds"] == 2 and rows["loss=precision"]["seeds"] == 1
    assert rows["loss=ce"]["base avg@4"] == pytest.approx(0.15) and rows["loss=ce"]["rl avg@4"] == pytest.approx(0.30)
    # 0.2 and 0.4: s = 0.1414, t(0.975, df=1) = 12.7062 -> 0.30 ± 12.7062 * 0.1414 / sqrt(2) = ± 1.2706
    assert rows["loss=ce"]["rl avg@4 ci"] == pytest.approx((0.3 - 1.27062, 0.3 + 1.27062), abs=1e-4)
    assert rows["loss=precision"]["rl pass@4"] == pytest.approx(1.0)  # the broken seed is not averaged in
    assert rows["loss=ce"]["rl filled groups/step"] == pytest.approx(2.0)  # seeds' means 1.5 and 2.5
    # entropy - NLL at the end of pre-training: (0.5 - 0.5) and (0.6 - 0.6)
    assert rows["loss=ce"]["pretrain entropy-nll"] == pytest.approx(0.0, abs=1e-12)
    # the RL policy's entropy and length, last step minus first: -accuracy and +1 token
    assert rows["loss=ce"]["rl entropy change"] == pytest.approx(-0.15)
    assert rows["loss=precision"]["rl entropy change"] == pytest.approx(-0.3)
    assert rows["loss=ce"]["rl length change"] == pytest.approx(1.0)
    # RL's gain per lineage, after minus before, in Avg@n and the largest pass@k: (0.1, 0.2) and (0.2, 0.4)
    assert rows["loss=ce"]["gain avg@4"] == pytest.approx(0.15) and rows["loss=ce"]["gain pass@4"] == pytest.approx(0.3)
    assert "gain pass@1" not in rows["loss=ce"]
    assert result["incomplete"] == [str(broken.resolve())]
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| loss=ce | 2 | " in table and "0.3000 ± 1.2706" in table
    assert "rl: failed" in table and "eval_rl: not run" in table
    with open(tmp_path / "out" / "compare.csv") as f:
        csv_rows = list(csv.DictReader(f))
    ce_rl = next(r for r in csv_rows if r["setting"] == "loss=ce" and r["metric"] == "rl avg@4")
    assert float(ce_rl["ci_high"]) == pytest.approx(1.57062, abs=1e-4) and ce_rl["seeds"] == "2"
    for name in ("pretrain_curves.png", "rl_curves.png", "passk.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000, name


def test_settings_against_the_baseline_paired_by_seed_and_holm_adjusted(tmp_path, no_figures):
    root = tmp_path / "pipeline"
    after = {"ce": [0.20, 0.30, 0.25], "diversity": [0.21, 0.33, 0.24], "precision": [0.30, 0.41, 0.37]}
    for loss, values in after.items():
        for seed, value in enumerate(values):
            write_lineage(root, loss, seed, accuracy=0.1, after=value)
    result = compare([str(root)], str(tmp_path / "out"))
    assert result["baseline"] == "loss=ce"
    p = {loss: scipy_stats.ttest_rel(after[loss], after["ce"]).pvalue for loss in ("diversity", "precision")}
    low, high = sorted(p.values())
    holm = {loss: min(1.0, max(2 * low, high) if p[loss] == high else 2 * low) for loss in p}
    for loss in ("diversity", "precision"):
        c = by(result["comparisons"], "rl avg@4", f"loss={loss}")
        assert c.result.test == "paired t" and c.result.p == pytest.approx(p[loss])
        assert c.p_adjusted == pytest.approx(holm[loss])
    assert by(result["comparisons"], "rl avg@4", "loss=precision").significant == "yes"
    assert by(result["comparisons"], "rl avg@4", "loss=diversity").significant == "no"
    table = result["table"]
    assert "## Against the baseline: loss=ce" in table and "| rl avg@4 | loss=precision | paired t | 3 pairs |" in table
    # Base accuracy is the same everywhere: no spread to test, said rather than a p-value of 0 or 1.
    assert by(result["comparisons"], "base avg@4", "loss=precision").significant == "n/a"


def test_unpaired_welch_test_when_the_settings_ran_different_seeds(tmp_path, no_figures):
    root = tmp_path / "pipeline"
    for seed, value in enumerate([0.20, 0.30, 0.25]):
        write_lineage(root, "ce", seed, accuracy=0.1, after=value)
    for seed, value in zip((5, 6, 7), [0.30, 0.41, 0.37]):
        write_lineage(root, "precision", seed, accuracy=0.1, after=value)
    result = compare([str(root)], str(tmp_path / "out"))
    c = by(result["comparisons"], "rl avg@4", "loss=precision")
    reference = scipy_stats.ttest_ind([0.30, 0.41, 0.37], [0.20, 0.30, 0.25], equal_var=False)
    assert c.result.test == "Welch t" and c.result.p == pytest.approx(reference.pvalue)
    assert c.p_adjusted == pytest.approx(reference.pvalue)  # a family of one


def test_baseline_by_name_by_default_first_setting_or_an_error(tmp_path, no_figures):
    root = tmp_path / "pipeline"
    for loss in ("diversity", "precision"):
        for seed in (0, 1):
            write_lineage(root, loss, seed, accuracy=0.1, after=0.2 + seed / 10)
    fallback = compare([str(root)], str(tmp_path / "a"))
    assert fallback["baseline"] == "loss=diversity" and "no setting is 'ce'" in fallback["table"]
    chosen = compare([str(root)], str(tmp_path / "b"), baseline="precision")
    assert chosen["baseline"] == "loss=precision" and "first one" not in chosen["table"]
    with pytest.raises(UserError, match="--baseline sharp matches no setting; the settings are: loss=diversity, "
                                        "loss=precision"):
        compare([str(root)], str(tmp_path / "c"), baseline="sharp")


def test_predictors_of_the_rl_gain(tmp_path):
    root = tmp_path / "pipeline"
    # The gain in Avg@4 rises with base entropy, lineage by lineage (rank correlation 1).
    for i, (loss, seed) in enumerate([(l, s) for l in ("ce", "precision") for s in (0, 1, 2)]):
        write_lineage(root, loss, seed, accuracy=0.10 + (i % 2) / 50, after=0.2 + i / 20, entropy=0.3 + i / 10)
    result = compare([str(root)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "predictors.md").read_text()
    assert "6 lineages with an eval before and after RL" in text
    row = next(line for line in text.splitlines() if line.startswith("| base entropy | avg@4 |"))
    assert "| 6 | +1.000" in row
    assert "Gain in Avg@n: base entropy predicts it best, a strong positive rank correlation" in text
    # p from the exact permutation distribution: 2 of 720 orders are as extreme as rho = 1.
    with open(tmp_path / "out" / "predictors.csv") as f:
        entropy = next(r for r in csv.DictReader(f) if r["predictor"] == "base entropy" and r["gain"] == "Avg@n")
    assert float(entropy["p"]) == pytest.approx(2 / 720)
    for name in ("predictors_avg.png", "predictors_passk.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000, name
    assert result["predictors"] == text


def test_predictors_say_so_when_nothing_is_significant(tmp_path, no_figures):
    root = tmp_path / "pipeline"
    for seed, (entropy, after) in enumerate([(0.3, 0.25), (0.4, 0.20), (0.5, 0.30), (0.6, 0.22)]):
        write_lineage(root, "ce", seed, accuracy=0.1, after=after, entropy=entropy)
    compare([str(root)], str(tmp_path / "out"))
    text = (tmp_path / "out" / "predictors.md").read_text()
    assert "Gain in Avg@n: no diagnostic predicts it significantly at 0.05" in text
    assert "predicts it best" not in text


def test_plain_runs_are_linked_to_the_runs_they_started_from(tmp_path, monkeypatch):
    """`ntp-rl compare outputs/rl outputs/pretrain`: one row per lineage, passk.png, output outside the runs."""
    monkeypatch.chdir(tmp_path)
    outputs = tmp_path / "outputs"
    for seed, (after, loss) in enumerate([(0.3, "precision"), (0.4, "precision")]):
        pretrain = outputs / "pretrain" / f"2026010{seed}-120000-pretrain-loss={loss}"
        write_run(pretrain, "pretrain", overrides=[f"loss={loss}", f"seed={seed}"], seed=seed,
                  results={"val": {"nll": 0.5, "ppl": 1.65, "entropy": 0.45}})
        # rl stored the model directory it loaded, relative to where it was started: matched by its ending.
        init = f"somewhere/else/outputs/pretrain/{pretrain.name}/checkpoints/step_00000160"
        write_run(outputs / "rl" / f"2026010{seed}-130000-rl-init_from=outputs_pretrain", "rl",
                  overrides=[f"init_from=outputs/pretrain/{pretrain.name}", "rl.max_steps=5"], seed=seed,
                  results={"init_from": init, "eval_before": {"avg@4": 0.1, "pass@1": 0.1, "pass@4": 0.3},
                           "eval_after": {"avg@4": after, "pass@1": after, "pass@4": 0.5}})
    result = compare([str(outputs / "rl"), str(outputs / "pretrain")])
    (row,) = result["rows"]
    assert row["setting"] == "loss=precision,rl.max_steps=5" and row["seeds"] == 2
    assert row["pretrain nll"] == pytest.approx(0.5) and row["rl avg@4"] == pytest.approx(0.35)
    out = Path(result["out_dir"])
    assert out.parent == Path("outputs") / "compare" and (out / "passk.png").exists()
    assert not list((outputs / "rl").rglob("compare.md")) and not list((outputs / "pretrain").rglob("compare.md"))
    again = compare([str(outputs / "rl"), str(outputs / "pretrain")])
    assert again["out_dir"] != result["out_dir"]  # a fresh directory each time


def test_eval_runs_are_linked_to_their_models(tmp_path, no_figures):
    outputs = tmp_path / "outputs"
    pretrain = outputs / "pretrain" / "20260101-120000-pretrain"
    write_run(pretrain, "pretrain", results={"val": {"nll": 0.5}})
    rl = outputs / "rl" / "20260101-130000-rl"
    write_run(rl, "rl", overrides=[f"init_from={pretrain}"], results={"init_from": str(pretrain / "checkpoints"),
                                                                       "eval_after": {"avg@4": 0.9}})
    for name, model, avg in (("base", pretrain, 0.1), ("after", rl, 0.3)):
        write_run(outputs / "eval" / f"20260101-14000{len(name)}-eval-{name}", "eval",
                  overrides=["model=hf", f"model.name_or_path={model}"],
                  results={"model": str(model / "checkpoints" / "step_00000005"), "summary": {"avg@4": avg}})
    result = compare([str(outputs)], str(tmp_path / "out"))
    (row,) = result["rows"]
    assert row["setting"] == "default"  # no path of a model in the label
    assert row["base avg@4"] == pytest.approx(0.1) and row["rl avg@4"] == pytest.approx(0.3)  # the evals, not rl's own


def test_an_unlinked_input_is_named_by_its_run_not_its_path(tmp_path, no_figures):
    outputs = tmp_path / "outputs"
    gone = "'outputs/pretrain/20260101-120000-pretrain-loss=precision/checkpoints/step_00000160'"
    for name, init in (("a", gone), ("b", "Qwen/Qwen3-0.6B")):
        write_run(outputs / "rl" / name, "rl", overrides=[f"init_from={init}"],
                  results={"eval_after": {"avg@4": 0.2}})
    result = compare([str(outputs)], str(tmp_path / "out"))
    assert sorted(r["setting"] for r in result["rows"]) == [
        "init_from=20260101-120000-pretrain-loss=precision", "init_from=Qwen/Qwen3-0.6B"]


def test_one_setting_keeps_its_overrides_as_its_label(tmp_path):
    write_lineage(tmp_path / "p", "ce", 0, accuracy=0.1, after=0.2)
    ok = run_cli("compare", str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--wandb", "disabled")
    assert ok.returncode == 0, ok.stderr
    assert "| loss=ce | 1 |" in ok.stdout


def test_standalone_runs_of_a_sweep(tmp_path, no_figures):
    sweep = tmp_path / "sweeps" / "pretrain-x"
    for i, (beta, name) in enumerate(((-0.25, "precision"), (0.0, "ce"), (0.5, "diversity"))):
        write_run(sweep / str(i), "pretrain", overrides=[f"loss.beta={beta}", "train.max_steps=9"],
                  results={"val": {"nll": 1.0 + beta, "ppl": 2.0, "entropy": 0.5 + beta}, "loss": {"name": name}})
    write_run(sweep / "3", "pretrain", status="running", overrides=["loss.beta=1.0", "train.max_steps=9"])
    result = compare([str(sweep)], str(tmp_path / "out"))
    labels = [r["setting"] for r in result["rows"]]
    assert labels == ["loss.beta=0.0", "loss.beta=-0.25", "loss.beta=0.5"]  # the shared override is dropped
    assert result["baseline"] == "loss.beta=0.0"  # no label says ce: the loss name in results.json does
    assert result["incomplete"] == [str((sweep / "3").resolve())] and not (tmp_path / "out" / "predictors.md").exists()


def test_broken_and_older_records_are_listed_never_averaged_or_fatal(tmp_path, no_figures, capsys):
    root = tmp_path / "pipeline"
    good = write_lineage(root, "ce", 0, accuracy=0.1, after=0.2)
    with open(good / "rl" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward": 0.\n[1, 2]\n')  # a line cut short, and JSON that is not a row
    no_status = write_lineage(root, "ce", 1, accuracy=0.5, after=0.9)
    write_json_atomic(no_status / "eval_rl" / "run.json", {"stage": "eval"})  # an older run.json
    no_results = write_lineage(root, "ce", 2, accuracy=0.5, after=0.9)
    (no_results / "eval_base" / "results.json").write_text("{not json")
    garbled = write_lineage(root, "ce", 3, accuracy=0.5, after=0.9)
    (garbled / "run.json").write_text("")  # still a lineage (it holds the stages), of unknown setting
    (garbled / "pretrain" / "config.yaml").write_text("seed: [unclosed\n")

    result = compare([str(root)], str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert f"{good / 'rl' / 'metrics.jsonl'}:3: not a JSON object, skipped" in err
    assert f"{good / 'rl' / 'metrics.jsonl'}:4: not a JSON object, skipped" in err
    (row,) = result["rows"]
    assert row["seeds"] == 1 and row["rl avg@4"] == pytest.approx(0.2)  # only the good lineage
    table = result["table"]
    assert "eval_rl: no status (older format?)" in table
    assert "eval_base: finished, but results.json is missing or unreadable" in table
    assert f"{garbled.resolve()}: lineage: run.json missing or unreadable" in table
    assert str(no_status.resolve()) in table and str(no_results.resolve()) in table


def test_compare_logs_its_tables_and_figures_to_wandb_offline(tmp_path):
    root = tmp_path / "pipeline"
    for loss in ("ce", "precision"):
        for seed in (0, 1):
            write_lineage(root, loss, seed, accuracy=0.1, after=0.2 + seed / 10, group="paper_small")
    compare([str(root)], str(tmp_path / "out"), wandb=WandbOptions(mode="offline"))
    (run_file,) = run_files(tmp_path / "out")
    run = read_run(run_file)
    assert run["job_type"] == "compare" and run["group"] == "paper_small" and run["project"] == "ntp-rl-tests"
    table = run["history"]["compare/compare"]
    csv_lines = (tmp_path / "out" / "compare.csv").read_text().splitlines()
    assert table["_type"] == "table-file" and table["nrows"] == len(csv_lines) - 1 > 0
    logged = json.loads((run_file.parent / "files" / table["path"]).read_text())
    mean = logged["columns"].index("mean")
    assert all(isinstance(row[mean], float) for row in logged["data"])  # numbers, so W&B can plot them
    assert run["history"]["compare/predictors"]["_type"] == "table-file"
    assert run["history"]["compare/passk"]["_type"] == "image-file"


@pytest.mark.parametrize("args, needle", [
    (["{tmp}/nope"], "compare: {tmp}/nope: no such directory"),
    (["{tmp}/empty"], "compare: {tmp}/empty: no ntp-rl runs there (no run.json below it)"),
    (["{tmp}/p", "--out", "{tmp}/file"], "compare: --out {tmp}/file: is a file, not a directory"),
    (["{tmp}/p", "--baseline", "sharp"], "compare: --baseline sharp matches no setting; the settings are: loss=ce"),
])
def test_a_mistake_costs_one_line_and_exit_2(args, needle, tmp_path, capsys, no_figures):
    from ntp_rl.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("")
    write_lineage(tmp_path / "p", "ce", 0, accuracy=0.1, after=0.2)
    with pytest.raises(SystemExit) as exc:
        main(["compare", *(a.format(tmp=tmp_path) for a in args), "--wandb", "disabled"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err == f"ntp-rl: error: {needle.format(tmp=tmp_path)}"


HYPOTHESES = """
baseline: loss=ce
hypotheses:
  - {id: 1, finding: precision does best after RL, metric: rl avg@4, direction: {loss=precision: greater}}
  - {id: 2, finding: diversity lowers base scores, metric: base avg@4, direction: {diversity: less}}
  - {id: 3, finding: base scores move little, metric: base avg@4, within: 0.02}
  - {id: 4, finding: RL sharpens, metric: gain avg@4, sign: greater}
  - {id: 4, finding: RL sharpens, metric: gain pass@4, sign: less, settings: [loss=precision]}
  - {id: 5, finding: DFT is sharper still, metric: base entropy-nll, direction: {loss=dft: less}}
  - {id: 6, finding: entropy ordered, metric: base entropy-nll, direction: {precision: less, diversity: greater}}
  - {id: 7, finding: what predicts the gain, predicts: Avg@n}
"""


def test_preregistered_hypotheses_are_judged_on_the_tables(tmp_path, no_figures):
    """Each rule's three outcomes, read off the same paired tests and intervals compare.md shows."""
    root = tmp_path / "pipeline"
    base = [0.10, 0.12, 0.11, 0.13]
    lift = {"ce": [0.10, 0.12, 0.09, 0.11], "precision": [0.20, 0.23, 0.19, 0.22], "diversity": [0.05, 0.06, 0.03, 0.05]}
    shift = {"ce": 0.0, "precision": 0.001, "diversity": 0.2}  # base avg@4: inside ±0.02, and wholly outside
    entropy = {"ce": [0.60, 0.62, 0.61, 0.63], "precision": [0.50, 0.53, 0.50, 0.52], "diversity": [0.61, 0.65, 0.60, 0.62]}
    for loss in lift:
        for seed in range(4):
            accuracy = base[seed] + shift[loss] + seed * 1e-4 * (loss == "precision")
            write_lineage(root, loss, seed, accuracy=accuracy, after=accuracy + lift[loss][seed],
                          entropy=entropy[loss][seed])
    (tmp_path / "h.yaml").write_text(HYPOTHESES)
    result = compare([str(root)], str(tmp_path / "out"), hypotheses=str(tmp_path / "h.yaml"))
    with open(tmp_path / "out" / "verdicts.csv") as f:
        rows = [(r["id"], r["setting"], r["verdict"]) for r in csv.DictReader(f)]
    assert rows == [
        ("1", "loss=precision", "holds"),  # +0.10 in rl avg@4, Holm p < 0.05
        ("2", "loss=diversity", "fails"),  # significantly above the baseline: against the hypothesis
        ("3", "loss=diversity", "fails"), ("3", "loss=precision", "holds"),  # +0.2 wholly outside, +0.001 inside
        ("4", "loss=ce", "holds"), ("4", "loss=diversity", "holds"), ("4", "loss=precision", "holds"),
        ("4", "loss=precision", "fails"),  # pass@4 rose: 2 x accuracy, capped at 1
        ("5", "loss=dft", "cannot tell"),  # no lineage of that setting
        ("6", "loss=precision", "holds"),
        ("6", "loss=diversity", "cannot tell"),  # +0.005 [-0.02, +0.03]: not significant either way
        ("7", "all lineages", "reported"),
    ]
    # The evidence is compare's own numbers: the paired difference and its Holm-adjusted p.
    c = by(result["comparisons"], "rl avg@4", "loss=precision")
    text = result["verdicts"]
    assert f"{c.result.diff:+.4f} [{c.result.low:+.4f}, {c.result.high:+.4f}]" in text
    assert f"adjusted {format_p(c.p_adjusted)}" in text
    summary = {line.split(" | ")[0].lstrip("| "): line.split("**")[1] for line in text.splitlines() if "**" in line}
    assert summary == {"1. precision does best after RL": "holds", "2. diversity lowers base scores": "fails",
                       "3. base scores move little": "fails", "4. RL sharpens": "fails",
                       "5. DFT is sharper still": "cannot tell", "6. entropy ordered": "cannot tell",
                       "7. what predicts the gain": "reported"}
    # the held-out-text diagnostic compare now tabulates: entropy - NLL at the base (NLL 0.6 in write_lineage)
    assert {r["setting"]: r["base entropy-nll"] for r in result["rows"]}["loss=ce"] == pytest.approx(0.015)


def test_a_straddling_interval_cannot_tell_and_the_shipped_study_file_loads(tmp_path, no_figures):
    from ntp_rl.study.hypotheses import load

    root = tmp_path / "pipeline"
    for seed, (ce, other) in enumerate([(0.10, 0.14), (0.12, 0.10), (0.11, 0.16)]):
        write_lineage(root, "ce", seed, accuracy=ce, after=0.3)
        write_lineage(root, "precision", seed, accuracy=other, after=0.3)
    (tmp_path / "h.yaml").write_text("hypotheses:\n  - {id: a, finding: same base, metric: base avg@4, within: 0.02}\n")
    result = compare([str(root)], str(tmp_path / "out"), hypotheses=str(tmp_path / "h.yaml"))
    assert "| a | base avg@4 | within ±0.02 of the baseline | loss=precision | cannot tell |" in result["verdicts"]
    assert "p adjusted with Holm" in result["verdicts"]  # the verdicts name the adjustment their p-values had
    bh = compare([str(root)], str(tmp_path / "bh"), adjustment="bh", hypotheses=str(tmp_path / "h.yaml"))
    assert "p adjusted with Benjamini-Hochberg" in bh["verdicts"]
    study = load("rl_study")  # what experiment=rl_study judges: every metric a column its lineages will have
    assert study.baseline == "loss=ce" and [h.id for h in study.hypotheses] == ["1", "2", "3", "4", "5", "6", "6", "7"]
    assert {h.metric for h in study.hypotheses} == {"rl avg@8", "base entropy-nll", "pretrain nll", "base avg@8",
                                                   "rl entropy change", "gain avg@8", "gain pass@8", "Avg@n"}
    matched = load("rl_study_matched")  # its primary is RL's gain; the base scores are the matching's check
    assert (matched.hypotheses[0].metric, matched.hypotheses[0].rule) == ("gain avg@8", "direction")
    assert {h.metric for h in matched.hypotheses} <= {h.metric for h in study.hypotheses}


@pytest.mark.parametrize("text, needle", [
    ("hypotheses: []", "expected a mapping with a non-empty list under 'hypotheses'"),
    ("hypotheses:\n  - {id: 1, finding: f, metric: m}", "needs exactly one rule of direction, within, sign, predicts; "
                                                        "found none"),
    ("hypotheses:\n  - {id: 1, finding: f, metric: m, within: 0.1, sign: less}", "needs exactly one rule"),
    ("hypotheses:\n  - {id: 1, finding: f, metric: m, direction: {precision: higher}}", "direction must map settings"),
    ("hypotheses:\n  - {id: 1, finding: f, metric: m, within: -1}", "within must be a positive margin"),
    ("hypotheses:\n  - {id: 1, finding: f, metric: m, within: 1, margin: 2}", "unknown key(s) margin"),
    ("hypotheses:\n  - {id: 1, metric: m, within: 1}", "'finding' is missing"),
    ("baseline: loss=precision\nhypotheses:\n  - {id: 1, finding: f, metric: m, within: 1}",
     "--baseline ce is not the baseline loss=precision"),
])
def test_a_wrong_hypotheses_file_costs_one_line_and_exit_2(text, needle, tmp_path, capsys, no_figures):
    from ntp_rl.cli import main

    write_lineage(tmp_path / "p", "ce", 0, accuracy=0.1, after=0.2)
    (tmp_path / "h.yaml").write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["compare", str(tmp_path / "p"), "--hypotheses", str(tmp_path / "h.yaml"), "--baseline", "ce",
              "--wandb", "disabled"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("ntp-rl: error: ") and needle in err and "\n" not in err


def test_bases_stopped_at_an_accuracy_report_the_steps_they_needed(tmp_path):
    from ntp_rl.study.records import find_records
    from ntp_rl.study.table import record_values

    stopped, plain = write_lineage(tmp_path, "ce", 0, 0.3, 0.4), write_lineage(tmp_path, "precision", 0, 0.3, 0.4)
    results = json.loads((stopped / "pretrain" / "results.json").read_text())
    write_json_atomic(stopped / "pretrain" / "results.json",
                      {**results, "step": 525, "stopped_at": {"step": 525, "metric": "avg@8", "value": 0.27}})
    values = {record.path: record_values(record) for record in find_records([str(tmp_path)])}
    assert values[stopped]["pretrain steps"] == 525 and "pretrain steps" not in values[plain]


def test_rl_stopped_at_a_plateau_reports_the_steps_it_took(tmp_path):
    from ntp_rl.study.records import find_records
    from ntp_rl.study.table import record_values

    levelled, capped = write_lineage(tmp_path, "ce", 0, 0.3, 0.6), write_lineage(tmp_path, "precision", 0, 0.3, 0.6)
    for lineage, rl_results in ((levelled, {"step": 225, "stopped_at": {"step": 225, "rule": "plateau"}}),
                                (capped, {"step": 400, "stopped_at": None})):  # rl.plateau set, the cap came first
        results = json.loads((lineage / "rl" / "results.json").read_text())
        write_json_atomic(lineage / "rl" / "results.json", {**results, **rl_results})
    plain = write_lineage(tmp_path, "diversity", 0, 0.3, 0.6)
    values = {record.path: record_values(record) for record in find_records([str(tmp_path)])}
    assert values[levelled]["rl steps"] == 225 and values[capped]["rl steps"] == 400
    assert "rl steps" not in values[plain]


def test_a_sweep_without_the_baseline_writes_its_table_and_says_the_verdicts_wait(tmp_path, capsys):
    """A pre-registered study run a point at a time: the first points' closing compare has no baseline yet."""
    from ntp_rl.config.compose import compose
    from ntp_rl.sweeps import compare_lineages

    root = tmp_path / "outputs" / "pipeline"
    ce, precision = write_lineage(root, "ce", 0, 0.1, 0.3), write_lineage(root, "precision", 0, 0.12, 0.3)
    (tmp_path / "h.yaml").write_text("baseline: loss=ce\nhypotheses:\n"
                                     "  - {id: a, finding: same base, metric: base avg@4, within: 0.02}\n")
    cfg = compose("pipeline", [f"out_dir={tmp_path / 'outputs'}", "logger.wandb.mode=disabled",
                               f"hypotheses={tmp_path / 'h.yaml'}"])
    out = tmp_path / "outputs" / "experiments" / "study"
    compare_lineages([str(precision)], cfg, ["experiment=study"], tmp_path)
    err = capsys.readouterr().err
    assert "the verdicts of hypotheses=" in err and "--baseline loss=ce matches no setting" in err
    assert (out / "compare.md").exists() and not (out / "verdicts.md").exists()
    compare_lineages([str(ce), str(precision)], cfg, ["experiment=study"], tmp_path)
    assert "were not judged" not in capsys.readouterr().err and (out / "verdicts.md").exists()
