"""`ntp-rl eval`: Avg@n, Cons@n, pass@k and next-token diagnostics for any causal LM checkpoint.

Top to bottom: resolve the model (a run directory means its latest checkpoint) and load it;
take the task's first problems; sample n completions for each and score them; measure the
next-token distribution on held-out text; then write results.json, problems.csv and the
figures into a run directory of its own, log them to W&B, and end with a table.

Under `accelerate launch` the problems are dealt out in chunks of one generate call each
(chunk c to process c mod P), and every chunk is sampled with a seed of its own. So the
samples depend on (seed, chunk), never on how many processes there are, and once gathered
and put back in problem order the results equal a one-process run's.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ntp_rl.checkpoint import resolve_model_dir
from ntp_rl.config import check_eval
from ntp_rl.data.tokenizer import load_tokenizer
from ntp_rl.diagnostics import TextDiagnostics
from ntp_rl.errors import ConfigError, DataError
from ntp_rl.evaluation import ProblemResult, sample_and_score, summarize
from ntp_rl.generation import HFGenerator, Sampling
from ntp_rl.models import count_parameters, load_pretrained
from ntp_rl.plots import plot_histogram, plot_pass_at_k
from ntp_rl.rundir import recording_failures, write_json_atomic
from ntp_rl.runtime import choose_run, make_accelerator, open_run, resolved_wandb_mode
from ntp_rl.tasks import build_task


def run(cfg: Any, overrides: Sequence[str] = ()) -> dict:
    check_eval(cfg)
    mode = resolved_wandb_mode(cfg)
    accelerator = make_accelerator(cfg.eval.precision, mode)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    say = tqdm.write if accelerator.is_main_process else (lambda message: None)

    # Everything a user can get wrong is found before the run directory exists.
    name = cfg.model.name_or_path
    model_path = str(resolve_model_dir(name, "model.name_or_path")) if Path(name).exists() else name
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    lm = load_pretrained(model_path, key="model.name_or_path", attn_implementation=cfg.model.attn_implementation,
                         dtype=dtype).to(device).eval()
    tokenizer = load_tokenizer(model_path)
    vocab = lm.get_output_embeddings().weight.shape[0]
    task = build_task(cfg.task)
    problems = task.problems(cfg.eval.split, cfg.eval.num_problems)
    if not problems:
        raise DataError(f"task={cfg.task.name}: the {cfg.eval.split} split has no problems to evaluate")
    n, ks = cfg.eval.n, sorted(set(cfg.eval.ks))

    held_out, text_source = None, None
    if cfg.diagnostics.enabled:
        if cfg.diagnostics.k > vocab:
            raise ConfigError("diagnostics.k", f"must be <= the model's vocabulary size {vocab}", cfg.diagnostics.k)
        if cfg.data.seq_len > lm.config.max_position_embeddings:
            raise ConfigError("data.seq_len", f"exceeds the model's max_position_embeddings="
                              f"{lm.config.max_position_embeddings}", cfg.data.seq_len)
        from ntp_rl.data.pretrain import build_pretrain_data

        # Tokenized with the model's own tokenizer; rank 0 builds the cache, the others read it.
        with accelerator.main_process_first():
            text_source = build_pretrain_data(cfg.data, cache_dir=Path(cfg.data.cache_dir or Path(cfg.out_dir) / "cache"),
                                              seed=cfg.seed, tokenizer_name_or_path=model_path)
        held_out = text_source.val[: cfg.diagnostics.num_sequences]

    # Named after the model evaluated, e.g. eval-model=<run>_step_00000400, not after its full path.
    naming = [o for o in overrides if o.split("=", 1)[0] not in ("model", "model.name_or_path")]
    run_dir = choose_run(cfg, "eval", [f"model={_short(model_path)}", *naming], accelerator)
    with (recording_failures(run_dir, accelerator.is_main_process),
          open_run(run_dir, cfg, "eval", overrides, accelerator, mode, resume_step=None) as tracker):
        if accelerator.is_main_process:
            run_dir.checkpoints.rmdir()  # made for every run; an eval saves no model
        step = _trained_steps(model_path)
        sampling = Sampling(temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
                            max_new_tokens=cfg.sampling.max_new_tokens)
        say(f"ntp-rl eval -> {run_dir.path}")
        say(f"  model: {model_path}{f' (step {step})' if step is not None else ''}, "
            f"{count_parameters(lm) / 1e6:.2f}M params | {world} process(es), {device.type}")
        say(f"  task:  {cfg.task.name} ({cfg.eval.split} split), {len(problems)} problems x n={n} samples, "
            f"T={sampling.temperature}, top-p {sampling.top_p}, at most {sampling.max_new_tokens} new tokens")

        # Sampling: this process's chunks of problems, then everyone's results in problem order.
        generator = HFGenerator(lm, tokenizer, task.stop_strings, batch_size=cfg.sampling.batch_size)
        per_call = max(1, cfg.sampling.batch_size // n)
        chunks = [range(s, min(s + per_call, len(problems))) for s in range(0, len(problems), per_call)]
        mine = range(rank, len(chunks), world)
        bar = tqdm(total=sum(len(chunks[c]) for c in mine), desc="eval: sampling", unit="problem", dynamic_ncols=True,
                   disable=not (accelerator.is_main_process and cfg.logger.progress_bar))
        started = time.perf_counter()
        scored: list[tuple[int, ProblemResult]] = []
        for c in mine:
            batch = [problems[i] for i in chunks[c]]
            # A seed per chunk: the samples must not depend on which process drew them.
            out = sample_and_score(generator, task, batch, n, sampling, ks, seed=cfg.seed * 1_000_003 + c,
                                   keep_samples=cfg.eval.keep_samples)
            scored += zip(chunks[c], out)
            bar.update(len(batch))
        bar.close()
        from accelerate.utils import gather_object

        results = [r for _, r in sorted(gather_object(scored), key=lambda pair: pair[0])]
        sampling_s = time.perf_counter() - started
        summary = summarize(results, ks)
        perf = {"sampling_time_s": sampling_s,
                "tokens_per_sec": sum(r.mean_length * r.n for r in results) / max(sampling_s, 1e-9)}

        # Held-out text: this process's windows, then the sums of all of them.
        diagnostics = None
        if held_out is not None:
            meter = TextDiagnostics(vocab, cfg.diagnostics.k, cfg.diagnostics.forking_threshold, cfg.diagnostics.bins,
                                    device=device)
            with torch.no_grad():
                for windows in held_out[rank::world].split(cfg.diagnostics.batch_size):
                    windows = windows.to(device)
                    logits = lm(input_ids=windows[:, :-1], use_cache=False).logits
                    meter.add(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
            meter.state = accelerator.reduce(meter.state, reduction="sum")
            diagnostics = {"text": text_source.description, "sequences": len(held_out), "seq_len": cfg.data.seq_len,
                           "unigram_nll": text_source.unigram_nll, **meter.result()}

        perf["wall_time_s"] = wall = time.perf_counter() - started
        record = {"stage": "eval", "model": model_path, "model_arg": name, "checkpoint_step": step,
                  "task": OmegaConf.to_container(cfg.task, resolve=True, enum_to_str=True), "split": cfg.eval.split,
                  "sampling": OmegaConf.to_container(cfg.sampling, resolve=True), "n": n, "ks": ks,
                  "summary": summary, "diagnostics": diagnostics, "num_processes": world, "perf": perf}
        metrics = {f"eval/{k}": v for k, v in summary.items()} | {f"perf/{k}": v for k, v in perf.items()}
        if diagnostics:
            settings = {"k", "forking_threshold", "sequences", "seq_len"}
            metrics |= {f"val/{k}": v for k, v in diagnostics.items() if isinstance(v, (int, float)) and k not in settings}
        tracker.log(metrics, step=step or 0)
        tracker.summary(metrics)
        if accelerator.is_main_process:
            columns, rows = _problem_table(results, ks)
            _write_csv(run_dir.path / "problems.csv", columns, rows)
            if cfg.eval.keep_samples:
                _write_samples(run_dir.path / "samples.jsonl", problems, results)
            figures = {"eval/pass_at_k": plot_pass_at_k(
                run_dir.path / "passk.png", {f"pass@k (unbiased, n={n})": {k: summary[f"pass@{k}"] for k in ks}},
                title=f"{_short(model_path)}\n{cfg.task.name} ({cfg.eval.split}): {len(problems)} problems, "
                      f"T={sampling.temperature}, top-p {sampling.top_p}",
                references={f"Avg@{n}": summary[f"avg@{n}"], f"Cons@{n}": summary[f"cons@{n}"]})}
            if diagnostics:
                hist = diagnostics["entropy_histogram"]
                figures["val/entropy_histogram"] = plot_histogram(
                    run_dir.path / "entropy.png", hist["edges"], hist["counts"],
                    title=f"next-token entropy of {_short(model_path)}\non {diagnostics['tokens']} held-out tokens",
                    xlabel="entropy (nats)",
                    marker=(f"forking > {cfg.diagnostics.forking_threshold} ({diagnostics['forking_share']:.1%})",
                            cfg.diagnostics.forking_threshold))
            record["files"] = {"problems": "problems.csv", "pass_at_k": "passk.png",
                               **({"entropy_histogram": "entropy.png"} if diagnostics else {}),
                               **({"samples": "samples.jsonl"} if cfg.eval.keep_samples else {})}
            tracker.media(step or 0, tables={"eval/per_problem": (columns, rows)}, images=figures)
            write_json_atomic(run_dir.path / "results.json", record)
            run_dir.update(status="finished", checkpoint=model_path)
        say(f"done in {wall:.0f}s ({perf['tokens_per_sec']:.0f} generated tokens/s) -> {run_dir.path}")
        say(_table(summary, diagnostics, n, ks))
        accelerator.wait_for_everyone()
        return record


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


def _write_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    tmp.replace(path)


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
