"""`ntp-rl eval`: Avg@n, Cons@n, pass@k and next-token diagnostics for any causal LM checkpoint.

Top to bottom: resolve the model (a run directory means its latest checkpoint) and load it;
take the task's first problems; sample n completions for each and score them; measure the
next-token distribution on held-out text; then write results.json, problems.csv and the
figures into a run directory of its own, log them to W&B, and end with a table.

With `eval.benchmarks` (`eval=paper_suite`: the paper's six maths benchmarks) one run measures
each of those task presets in turn with the same model, samples and metrics, and reports a
row per benchmark and their unweighted mean, as the paper's tables do.

Generate calls are filled by sequences, not problems: with generator=hf every call holds
sampling.batch_size samples, of as many problems as fit (a problem's n samples span calls when
they do not fit); with generator=vllm each process's problems go to the engine in one call, and
its scheduler batches them. Under `accelerate launch` call c goes to process c mod P, and every
call is sampled with a seed of its own. With hf the calls do not depend on P, so once gathered
and put back in problem order the results equal a one-process run's; with vllm they are the
same for the same P.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import OmegaConf

from ntp_rl import sharding
from ntp_rl.checkpoint import resolve_model_dir
from ntp_rl.config.validate import check_seq_len
from ntp_rl.data.packing import PretrainData
from ntp_rl.data.tokenizer import load_tokenizer
from ntp_rl.diagnostics import TextDiagnostics
from ntp_rl.engines import make_generator, sampling_weights, sequences_per_call
from ntp_rl.errors import ConfigError, DataError
from ntp_rl.evaluation import ProblemResult, deal_calls, plan_calls, sample_and_score_calls, summarize
from ntp_rl.generation import Sampling
from ntp_rl.io import write_csv_atomic, write_json_atomic
from ntp_rl.lm_head import logits_in_chunks
from ntp_rl.models import count_parameters, load_pretrained
from ntp_rl.plots import plot_histogram, plot_pass_at_k
from ntp_rl.seeding import eval_chunk_seed
from ntp_rl.rundir import shown_path
from ntp_rl.stages.session import StageSession
from ntp_rl.tasks import Task, TaskProblem, build_task


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    session = StageSession("eval", cfg, overrides, precision=cfg.eval.precision)

    if cfg.harness.tasks:
        if session.sharded:
            raise ConfigError("harness.tasks", "lm-evaluation-harness runs in one process on the whole model; launch "
                              "it without the FSDP config", list(cfg.harness.tasks))
        return run_harness(cfg, session, overrides)
    # Everything a user can get wrong is found before the run directory exists.
    subject = load_subject(cfg, session)
    benchmarks = load_benchmarks(cfg, session)
    session.note_source_run("model", cfg.model.name_or_path, subject.path)
    text = load_held_out_text(cfg, session, subject)
    # Named after the model evaluated, e.g. eval-model=<run>_step_00000400, not after its full path.
    naming = [o for o in overrides if o.split("=", 1)[0] not in ("model", "model.name_or_path")]
    session.choose_run_dir([f"model={_short(subject.path)}", *naming])

    with session.open(resume_step=None) as tracker:
        if session.is_main:
            session.run_dir.checkpoints.rmdir()  # made for every run; an eval saves no model
        sampling = Sampling(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                            max_new_tokens=cfg.sampling.max_new_tokens)
        announce(cfg, session, subject, benchmarks, sampling)
        ks = sorted(set(cfg.eval.ks))
        started = time.perf_counter()
        with sampling_weights(cfg.generator, subject.lm):
            results = {name: sample_problems(cfg, session, subject, task, problems, sampling)
                       for name, (task, problems) in benchmarks.items()}
        sampling_s = time.perf_counter() - started
        summaries = {name: summarize(rs, ks) for name, rs in results.items()}
        suite = bool(cfg.eval.benchmarks)
        summary = mean_over_benchmarks(summaries) if suite else next(iter(summaries.values()))
        if summary["scoring_timeouts"]:
            session.notice("scoring_timeouts", summary["scoring_timeouts"],
                           f"{summary['scoring_timeouts']} completion(s) took longer than task.score_time_limit_s="
                           f"{cfg.task.score_time_limit_s} to check and were scored wrong")
        generated = sum(r.mean_length * r.n for rs in results.values() for r in rs)
        perf = {"sampling_time_s": sampling_s, "tokens_per_sec": generated / max(sampling_s, 1e-9)}
        with sharding.full_weights(subject.lm):
            diagnostics = measure_text(cfg, session, subject, text) if text is not None else None
        perf["wall_time_s"] = time.perf_counter() - started
        tasks = {name: OmegaConf.to_container(task_cfg, resolve=True, enum_to_str=True)
                 for name, task_cfg in benchmark_configs(cfg).items()}
        record = {"stage": "eval", "model": subject.path, "model_arg": cfg.model.name_or_path,
                  "checkpoint_step": subject.step, "task": tasks if suite else next(iter(tasks.values())),
                  "split": cfg.eval.split, "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
                  "n": cfg.eval.n, "ks": ks, "summary": summary, "diagnostics": diagnostics,
                  "num_processes": session.world, "perf": perf}
        if suite:
            record["benchmarks"] = summaries
        log_metrics(tracker, subject, summary, perf, diagnostics, summaries if suite else None)
        if session.is_main:
            record["files"] = write_files(cfg, session, tracker, subject, benchmarks, results, summaries, summary,
                                          diagnostics, sampling)
        session.finish(record, checkpoint=subject.path)
        session.say(f"done in {perf['wall_time_s']:.0f}s ({perf['tokens_per_sec']:.0f} generated tokens/s) -> "
                    f"{shown_path(session.run_dir.path)}")
        if suite:
            session.say(_benchmark_table(summaries, summary, cfg.eval.n, ks))
        session.say(_table(summary, diagnostics, cfg.eval.n, ks))
        return record


def run_harness(cfg: Any, session: StageSession, overrides: Sequence[str]) -> dict:
    """`harness.tasks`: lm-evaluation-harness on the model (in the main process), its results in harness.json,
    results.json and W&B (harness/<task>/<metric>, and a table)."""
    from ntp_rl import harness

    harness.require_harness()
    subject = load_subject(cfg, session) if cfg.harness.backend == "hf" else None  # vllm loads it itself
    path = subject.path if subject else model_path(cfg)
    session.note_source_run("model", cfg.model.name_or_path, path)
    naming = [o for o in overrides if o.split("=", 1)[0] not in ("model", "model.name_or_path")]
    session.choose_run_dir([f"model={_short(path)}", *naming])
    with session.open(resume_step=None) as tracker:
        if session.is_main:
            session.run_dir.checkpoints.rmdir()
        session.say(f"ntp-rl eval -> {shown_path(session.run_dir.path)}")
        session.say(f"  harness: {', '.join(cfg.harness.tasks)} on {path} ({cfg.harness.backend} backend)")
        started = time.perf_counter()
        results = (harness.evaluate(cfg.harness, subject and subject.lm, subject and subject.tokenizer, path, cfg.seed)
                   if session.is_main else {})
        scores = harness.scores(results)
        step = _trained_steps(path)
        metrics = {f"harness/{task}/{metric}": value for task, values in scores.items() for metric, value in values.items()}
        tracker.log(metrics, step=step or 0)
        tracker.summary(metrics)
        rows = [[task, metric, value] for task, values in scores.items() for metric, value in values.items()]
        tracker.media(step or 0, tables={"harness/results": (["task", "metric", "value"], rows)})
        if session.is_main:
            write_json_atomic(session.run_dir.path / "harness.json", results)
        record = {"stage": "eval", "model": path, "model_arg": cfg.model.name_or_path, "checkpoint_step": step,
                  "harness": scores, "harness_config": OmegaConf.to_container(cfg.harness, resolve=True),
                  "perf": {"wall_time_s": time.perf_counter() - started}, "files": {"harness": "harness.json"}}
        session.finish(record, checkpoint=path)
        width = max((len(f"{task} {metric}") for task, metric, _ in rows), default=6)
        session.say("\n".join([f"  {'task metric':<{width}}  value", f"  {'-' * width}  ------"]
                              + [f"  {task + ' ' + metric:<{width}}  {value:.4f}" for task, metric, value in rows]))
        return record


def model_path(cfg: Any) -> str:
    """A run directory means its latest checkpoint; anything else is a model directory or hub name."""
    name = cfg.model.name_or_path
    return str(resolve_model_dir(name, "model.name_or_path")) if Path(name).exists() else name


def benchmark_configs(cfg: Any) -> dict[str, Any]:
    """name -> task config: the `task` itself, or each of `eval.benchmarks` (a task preset, read from local
    copies under `eval.benchmarks_dir` when it is set), checked with the run's own scoring settings."""
    if not cfg.eval.benchmarks:
        return {cfg.task.name: cfg.task}
    from ntp_rl.config.paths import conf_dir
    from ntp_rl.config.schema import TaskConfig

    configs = {}
    for name in cfg.eval.benchmarks:
        task_cfg = OmegaConf.merge(OmegaConf.structured(TaskConfig), OmegaConf.load(conf_dir() / "task" / f"{name}.yaml"))
        task_cfg.score_workers, task_cfg.score_time_limit_s = cfg.task.score_workers, cfg.task.score_time_limit_s
        if cfg.eval.benchmarks_dir:
            task_cfg.path, task_cfg.subset = str(Path(cfg.eval.benchmarks_dir).expanduser() / name), None
        configs[name] = task_cfg
    return configs


def load_benchmarks(cfg: Any, session: StageSession) -> dict[str, tuple[Task, list[TaskProblem]]]:
    """Each benchmark's task and its first eval.num_problems problems of eval.split."""
    benchmarks = {}
    for name, task_cfg in benchmark_configs(cfg).items():
        task = build_task(task_cfg)
        problems = task.problems(cfg.eval.split, cfg.eval.num_problems)
        if not problems:
            raise DataError(f"task={name}: the {cfg.eval.split} split has no problems to evaluate")
        session.note_unread_answers(task)
        benchmarks[name] = (task, problems)
    return benchmarks


def mean_over_benchmarks(summaries: dict[str, dict]) -> dict:
    """The paper's "average" column: each score's unweighted mean over the benchmarks (a benchmark of 30
    problems weighs as much as one of 500); counts are summed."""
    rows = list(summaries.values())
    summed = ("problems", "scoring_timeouts")
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]
            if key not in summed and key != "n" and key != "max_length" and key != "min_length"}
    return {"problems": sum(row["problems"] for row in rows), "n": rows[0]["n"], **mean,
            "min_length": min(row["min_length"] for row in rows), "max_length": max(row["max_length"] for row in rows),
            "scoring_timeouts": sum(row["scoring_timeouts"] for row in rows)}


@dataclass
class Subject:
    """The model being evaluated."""

    path: str  # the directory (or hub name) it was loaded from
    lm: torch.nn.Module
    tokenizer: Any
    step: Optional[int]  # the training step of an ntp-rl checkpoint; None for other models

    @property
    def vocab_size(self) -> int:
        return self.lm.get_output_embeddings().weight.shape[0]


def load_subject(cfg: Any, session: StageSession) -> Subject:
    """A run directory means its latest checkpoint; weights in bf16 when the run computes in bf16."""
    path = model_path(cfg)
    dtype = torch.bfloat16 if session.accelerator.mixed_precision == "bf16" else torch.float32
    lm = load_pretrained(path, key="model.name_or_path", attn_implementation=cfg.model.attn_implementation,
                         dtype=dtype, empty=session.empty_model)
    # Under FSDP only the first process reads the weights; each process keeps a shard between the phases that
    # gather them (sampling, the text diagnostics).
    lm = sharding.shard(lm, lm, session.device, bf16=dtype == torch.bfloat16) if session.sharded else lm.to(session.device)
    lm.eval()
    return Subject(path=path, lm=lm, tokenizer=load_tokenizer(path), step=_trained_steps(path))


def load_held_out_text(cfg: Any, session: StageSession, subject: Subject) -> Optional[PretrainData]:
    """The diagnostics' text, tokenized with the model's own tokenizer (None when diagnostics are off)."""
    if not cfg.diagnostics.enabled:
        return None
    if cfg.diagnostics.k > subject.vocab_size:
        raise ConfigError("diagnostics.k", f"must be <= the model's vocabulary size {subject.vocab_size}", cfg.diagnostics.k)
    check_seq_len(cfg.data.seq_len, subject.lm)
    from ntp_rl.data import build_pretrain_data

    # Rank 0 builds the cache, the others read it.
    with session.accelerator.main_process_first():
        return build_pretrain_data(cfg.data, cache_dir=Path(cfg.data.cache_dir or Path(cfg.out_dir) / "cache"),
                                   seed=cfg.seed, tokenizer_name_or_path=subject.path)


def announce(cfg: Any, session: StageSession, subject: Subject, benchmarks: dict[str, tuple[Task, list[TaskProblem]]],
             sampling: Sampling) -> None:
    step = f" (step {subject.step})" if subject.step is not None else ""
    session.say(f"ntp-rl eval -> {shown_path(session.run_dir.path)}")
    session.say(f"  model: {subject.path}{step}, {count_parameters(subject.lm) / 1e6:.2f}M params | "
                f"{session.world} process(es), {session.device.type}")
    for name, (_, problems) in benchmarks.items():
        session.say(f"  task:  {name} ({cfg.eval.split} split), {len(problems)} problems x n={cfg.eval.n} samples, "
                    f"T={sampling.temperature}, top-p {sampling.top_p}, at most {sampling.max_new_tokens} new tokens")


def sample_problems(cfg: Any, session: StageSession, subject: Subject, task: Task, problems: list[TaskProblem],
                    sampling: Sampling) -> list[ProblemResult]:
    """This process's generate calls, sampled and scored, then everyone's results in problem order."""
    n, ks = cfg.eval.n, sorted(set(cfg.eval.ks))
    generator = make_generator(cfg.generator, subject.lm, subject.tokenizer, task.stop_strings, cfg.sampling.batch_size,
                               subject.path, session)
    per_call = sequences_per_call(cfg.generator, cfg.sampling.batch_size, n, len(problems), session.world)
    mine = deal_calls(plan_calls(len(problems), n, per_call), session.rank, session.world)
    bar = session.progress(total=sum(count for _, call in mine for *_, count in call), desc="eval: sampling",
                           unit="sample")
    results = sample_and_score_calls(generator, task, problems, n, sampling, ks, lambda c: eval_chunk_seed(cfg.seed, c),
                                     session.rank, session.world, per_call, cfg.eval.keep_samples, on_call=bar.update)
    bar.close()
    return results


@torch.no_grad()
def measure_text(cfg: Any, session: StageSession, subject: Subject, text: PretrainData) -> dict:
    """The next-token diagnostics on this process's held-out windows, summed over all processes."""
    windows = text.val[: cfg.diagnostics.num_sequences]
    meter = TextDiagnostics(subject.vocab_size, cfg.diagnostics.k, cfg.diagnostics.forking_threshold,
                            cfg.diagnostics.bins, device=session.device)
    for batch in windows[session.rank::session.world].split(cfg.diagnostics.batch_size):
        batch = batch.to(session.device)
        targets = batch[:, 1:].reshape(-1)
        for part, logits in logits_in_chunks(subject.lm, batch[:, :-1], chunk_size=1024):
            meter.add(logits, targets[part])
    meter.state = session.accelerator.reduce(meter.state, reduction="sum")
    return {"text": text.description, "sequences": len(windows), "seq_len": cfg.data.seq_len,
            "unigram_nll": text.unigram_nll, **meter.result()}


def log_metrics(tracker: Any, subject: Subject, summary: dict, perf: dict, diagnostics: Optional[dict],
                benchmarks: Optional[dict[str, dict]] = None) -> None:
    """eval/<metric> (a suite: the mean over benchmarks), eval/<benchmark>/<metric> for each benchmark of a suite."""
    metrics = {f"eval/{k}": v for k, v in summary.items()} | {f"perf/{k}": v for k, v in perf.items()}
    for name, scores in (benchmarks or {}).items():
        metrics |= {f"eval/{name}/{k}": v for k, v in scores.items()}
    if diagnostics:
        settings = {"k", "forking_threshold", "sequences", "seq_len"}
        metrics |= {f"val/{k}": v for k, v in diagnostics.items() if isinstance(v, (int, float)) and k not in settings}
    tracker.log(metrics, step=subject.step or 0)
    tracker.summary(metrics)


def write_files(cfg: Any, session: StageSession, tracker: Any, subject: Subject,
                benchmarks: dict[str, tuple[Task, list[TaskProblem]]], results: dict[str, list[ProblemResult]],
                summaries: dict[str, dict], summary: dict, diagnostics: Optional[dict], sampling: Sampling) -> dict:
    """problems.csv (a suite: <benchmark>/problems.csv and benchmarks.csv), samples.jsonl, the figures, and the
    same to W&B (main process); returns the files' names."""
    n, ks, run_path = cfg.eval.n, sorted(set(cfg.eval.ks)), session.run_dir.path
    suite = bool(cfg.eval.benchmarks)
    files: dict[str, Any] = {}
    tables = {}
    for name, (_, problems) in benchmarks.items():
        folder = run_path / name if suite else run_path
        folder.mkdir(exist_ok=True)
        columns, rows = _problem_table(results[name], ks)
        write_csv_atomic(folder / "problems.csv", columns, rows)
        tables[f"eval/{name}/per_problem" if suite else "eval/per_problem"] = (columns, rows)
        if cfg.eval.keep_samples:
            _write_samples(folder / "samples.jsonl", problems, results[name])
    prefix = "<benchmark>/" if suite else ""
    files["problems"] = f"{prefix}problems.csv"
    if cfg.eval.keep_samples:
        files["samples"] = f"{prefix}samples.jsonl"
    if suite:
        columns, rows = _benchmark_rows(summaries, summary, n, ks)
        write_csv_atomic(run_path / "benchmarks.csv", columns, rows)
        tables["eval/benchmarks"] = (columns, rows)
        files["benchmarks"] = "benchmarks.csv"
        curves = {name: {k: s[f"pass@{k}"] for k in ks} for name, s in summaries.items()}
        problems_shown = ", ".join(f"{name} {len(p)}" for name, (_, p) in benchmarks.items())
        title = f"{_short(subject.path)}\nproblems: {problems_shown}; T={sampling.temperature}, top-p {sampling.top_p}"
        references = {f"mean Avg@{n}": summary[f"avg@{n}"]}
    else:
        (name, (_, problems)), = benchmarks.items()
        curves = {f"pass@k (unbiased, n={n})": {k: summary[f"pass@{k}"] for k in ks}}
        title = (f"{_short(subject.path)}\n{name} ({cfg.eval.split}): {len(problems)} problems, "
                 f"T={sampling.temperature}, top-p {sampling.top_p}")
        references = {f"Avg@{n}": summary[f"avg@{n}"], f"Cons@{n}": summary[f"cons@{n}"]}
    figures = {"eval/pass_at_k": plot_pass_at_k(run_path / "passk.png", curves, title=title, references=references)}
    files["pass_at_k"] = "passk.png"
    if diagnostics:
        hist = diagnostics["entropy_histogram"]
        figures["val/entropy_histogram"] = plot_histogram(
            run_path / "entropy.png", hist["edges"], hist["counts"],
            title=f"next-token entropy of {_short(subject.path)}\non {diagnostics['tokens']} held-out tokens",
            xlabel="entropy (nats)",
            marker=(f"forking > {cfg.diagnostics.forking_threshold} ({diagnostics['forking_share']:.1%})",
                    cfg.diagnostics.forking_threshold))
        files["entropy_histogram"] = "entropy.png"
    tracker.media(subject.step or 0, tables=tables, images=figures)
    return files


def _trained_steps(model_path: str) -> int | None:
    """The training step of an ntp-rl checkpoint (None for other models): W&B's x-axis for this run."""
    try:
        return int(json.loads((Path(model_path) / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _short(model_path: str) -> str:
    # .../<run>/checkpoints/step_00000400 -> <run>/step_00000400
    parts = Path(model_path).parts
    return "/".join(parts[-3::2]) if len(parts) >= 3 and parts[-2] == "checkpoints" else parts[-1]


def _problem_table(results: Sequence[ProblemResult], ks: Sequence[int]) -> tuple[list[str], list[list]]:
    columns = ["id", "answer", "n", "correct", "majority", "majority_correct", *[f"pass@{k}" for k in ks],
               "mean_length", "max_length", "truncated"]
    rows = [[r.id, r.answer, r.n, r.correct, r.majority if r.majority is not None else "", r.majority_correct,
             *[r.pass_at_k[k] for k in ks], r.mean_length, r.max_length, r.truncated] for r in results]
    return columns, rows


def _benchmark_rows(summaries: dict[str, dict], mean: dict, n: int, ks: Sequence[int]) -> tuple[list[str], list[list]]:
    """The paper's table: a row per benchmark and the mean over them."""
    columns = ["benchmark", "problems", f"avg@{n}", f"cons@{n}", *[f"pass@{k}" for k in ks], "mean_length",
               "truncated_frac"]
    rows = [[name, s["problems"], *[s[c] for c in columns[2:]]] for name, s in [*summaries.items(), ("mean", mean)]]
    return columns, rows


def _benchmark_table(summaries: dict[str, dict], mean: dict, n: int, ks: Sequence[int]) -> str:
    """A row per benchmark and the mean, for a person to read (percentages, as papers print them)."""
    columns, rows = _benchmark_rows(summaries, mean, n, ks)
    shown = [columns[:2] + [c for c in columns[2:-2]]]
    shown += [[str(row[0]), str(row[1]), *[f"{100 * v:.1f}" for v in row[2:-2]]] for row in rows]
    widths = [max(len(r[i]) for r in shown) for i in range(len(shown[0]))]
    lines = ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in shown]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, lines[1])
    return "\n".join(lines)


def _write_samples(path: Path, problems: Sequence[Any], results: Sequence[ProblemResult]) -> None:
    with open(path, "w") as f:
        for problem, result in zip(problems, results):
            f.write(json.dumps({"id": result.id, "prompt": problem.prompt, "answer": result.answer,
                                "samples": result.samples}) + "\n")


def _table(summary: dict, diagnostics: dict | None, n: int, ks: Sequence[int]) -> str:
    """metric | value, for a person to read at the end of the console output."""
    rows = [(f"avg@{n} (mean accuracy)", f"{summary[f'avg@{n}']:.4f}"),
            (f"cons@{n} (majority vote)", f"{summary[f'cons@{n}']:.4f}")]
    rows += [(f"pass@{k}", f"{summary[f'pass@{k}']:.4f}") for k in ks]
    rows += [("response length (tokens)", f"mean {summary['mean_length']:.1f}, max {summary['max_length']}"),
             ("truncated responses", f"{summary['truncated_frac']:.1%}")]
    if diagnostics:
        d = diagnostics
        rows += [("held-out NLL (nats/token)", f"{d['nll']:.4f} (unigram {d['unigram_nll']:.3f})"),
                 ("perplexity", f"{d['ppl']:.3f}"),
                 ("entropy (nats/token)", f"{d['entropy']:.4f}"),
                 (f"forking share (H > {d['forking_threshold']})", f"{d['forking_share']:.4f}"),
                 (f"top-{d['k']} mass / tail mass", f"{d['topk_mass']:.6f} / {d['tail_mass']:.2e}"),
                 ("target rank: top-1 / median / p90", f"{d['accuracy']:.4f} / {d['target_rank_median']} / "
                                                       f"{d['target_rank_p90']}")]
    width = max(len(label) for label, _ in rows)
    lines = [f"  {'metric':<{width}}  value", f"  {'-' * width}  {'-' * 24}"]
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    return "\n".join(lines)
