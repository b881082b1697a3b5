"""Checks beyond types: one `validate_<stage>` per stage, run once when the stage is dispatched.

Each check raises ConfigError naming the key and what would work. These need nothing but the
config; checks that need the process count, the device, the model or the tokenizer are the
functions at the end, which the stages call once those exist.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ntp_rl.config.pipeline_schema import LINEAGE_STAGES
from ntp_rl.config.schema import DataSource, GeneratorKind, LossImpl, ModelArch
from ntp_rl.errors import ConfigError, DataError


def validate_pretrain(cfg: Any) -> None:
    _check_common(cfg)
    _check_resume(cfg)
    check_loss(cfg.loss)
    _check_model(cfg.model)
    _check_data(cfg.data)
    _check_optim(cfg.optim)
    _check_train(cfg.train)
    _check_stop_at(cfg.train.stop_at, cfg.task)


def validate_midtrain(cfg: Any) -> None:
    if OmegaConf.is_missing(cfg, "init_from"):  # before anything reads model.name_or_path, which points to it
        raise ConfigError("init_from", "is required (set it on the command line): a pretrain run, a checkpoint or an HF model")
    if cfg.model.arch is not ModelArch.hf:
        raise ConfigError("model", "midtrain continues init_from's model; architecture presets do not apply "
                          "(set model.rope_theta, model.max_position_embeddings, model.moe_balancing instead)")
    _check_init_from(cfg.init_from)
    validate_pretrain(cfg)


def validate_rl(cfg: Any) -> None:
    _check_common(cfg)
    _check_resume(cfg)
    _check_init_from(cfg.init_from)
    _check_grpo(cfg.rl, cfg.optim, cfg.task)
    _check_generator(cfg.generator, cfg.rl)


def validate_eval(cfg: Any) -> None:
    _check_common(cfg)
    if cfg.resume not in (None, "never"):
        raise ConfigError("resume", "eval runs are not resumed (they save no checkpoints); run the command again", cfg.resume)
    if cfg.model.arch is not ModelArch.hf:
        raise ConfigError("model", "eval needs trained weights: model=<run dir, checkpoint, HF model dir or hub name>; "
                          "an architecture preset such as model=tiny has none")
    _check_model(cfg.model)
    _check_evaluation(cfg.eval, cfg.sampling, cfg.diagnostics, cfg.data, cfg.task)
    _check_scoring(cfg.task)
    _check_harness(cfg.harness)
    _check_generator(cfg.generator)


def check_objective(cfg: Any) -> None:
    """A search's objective (cfg a validated pipeline config) must be a value the lineage's
    summary will hold (pipeline.lineage_summary). Checked for searches only: a grid needs none."""
    ks = sorted(cfg.eval.ks)
    made = {"pretrain": ["pretrain_nll", "pretrain_entropy"]}
    for stage, prefix in (("eval_base", "base"), ("eval_rl", "rl")):
        made[stage] = [f"{prefix}_avg@{cfg.eval.n}", f"{prefix}_cons@{cfg.eval.n}",
                       *dict.fromkeys(f"{prefix}_pass@{k}" for k in (ks[0], ks[-1]))]
    choices = [key for stage in cfg.stages for key in made.get(stage, [])]
    if cfg.objective not in choices:
        raise ConfigError("objective", f"must be a value this lineage reports; choose one of: {', '.join(choices)}",
                          cfg.objective)


def validate_pipeline(cfg: Any) -> None:
    _check_common(cfg)
    _check_resume(cfg)
    if cfg.resume not in (None, "never"):
        raise ConfigError("resume", "a pipeline always resumes: run the same command again", cfg.resume)
    unknown = [s for s in cfg.stages if s not in LINEAGE_STAGES]
    if unknown or not cfg.stages or list(cfg.stages) != [s for s in LINEAGE_STAGES if s in cfg.stages]:
        raise ConfigError("stages", f"must be a non-empty subset of {list(LINEAGE_STAGES)}, in that order",
                          list(cfg.stages))
    check_loss(cfg.loss)
    _check_model(cfg.model)
    _check_data(cfg.data)
    _check_optim(cfg.optim)
    _check_train(cfg.train)
    _check_stop_at(cfg.train.stop_at, cfg.task)
    if "midtrain" in cfg.stages:
        for key in ("rope_theta", "seq_len", "max_steps"):
            _positive(cfg.midtrain[key], f"midtrain.{key}")
        _check_optim(cfg.midtrain_optim, "midtrain_optim")
        if cfg.midtrain.loss is not None:
            presets = _preset_names("loss")
            if cfg.midtrain.loss not in presets:
                raise ConfigError("midtrain.loss", f"must name a loss preset in conf/loss: {', '.join(presets)}",
                                  cfg.midtrain.loss)
    _check_grpo(cfg.rl, cfg.rl_optim, cfg.task, optim_key="rl_optim")
    _check_evaluation(cfg.eval, cfg.sampling, cfg.diagnostics, cfg.data, cfg.task)
    _check_generator(cfg.generator, cfg.rl)
    if cfg.hypotheses:
        # Read now, not after hours of lineages, when the sweep's compare would find the file wrong.
        from ntp_rl.study.hypotheses import load

        try:
            load(cfg.hypotheses)
        except DataError as exc:
            raise ConfigError("hypotheses", str(exc)) from None


# ---------------------------------------------------------------------------
# Sections


def _positive(value: Any, key: str) -> None:
    if value is None or value <= 0:
        raise ConfigError(key, "must be > 0", value)


def _finite(value: float, key: str) -> None:
    if not math.isfinite(value):
        raise ConfigError(key, "must be a finite number", value)


def _preset_names(group: str) -> list[str]:
    """The presets of a config group (conf/<group>/*.yaml), for keys that name one outside Hydra's defaults."""
    from ntp_rl.config.paths import conf_dir

    return sorted(path.stem for path in (conf_dir() / group).glob("*.yaml"))


def _check_benchmarks(ev: Any) -> None:
    presets = _preset_names("task")
    for name in ev.benchmarks:
        if name not in presets:
            raise ConfigError("eval.benchmarks", f"{name} is no task preset; choose from: {', '.join(presets)}",
                              list(ev.benchmarks))
    if len(set(ev.benchmarks)) != len(ev.benchmarks):
        raise ConfigError("eval.benchmarks", "names a benchmark twice", list(ev.benchmarks))
    if ev.benchmarks_dir:
        missing = [name for name in ev.benchmarks if not (Path(ev.benchmarks_dir).expanduser() / name).is_dir()]
        if missing:
            raise DataError(f"eval.benchmarks_dir={ev.benchmarks_dir}: no directory {missing[0]}/ (one per benchmark, "
                            f"holding its split's file)")


def _check_harness(harness: Any) -> None:
    if not harness.tasks:
        return
    from ntp_rl.harness import require_harness

    require_harness()
    if harness.backend not in ("hf", "vllm"):
        raise ConfigError("harness.backend", "must be hf or vllm", harness.backend)
    if harness.backend == "vllm":
        _require_vllm("harness.backend", "harness.backend=hf")
    _positive(harness.batch_size, "harness.batch_size")
    if harness.limit is not None:
        _positive(harness.limit, "harness.limit")
    if harness.include_path and not Path(harness.include_path).expanduser().is_dir():
        raise DataError(f"harness.include_path={harness.include_path}: no such directory")


def _check_scoring(task: Any) -> None:
    _positive(task.score_time_limit_s, "task.score_time_limit_s")
    _finite(task.score_time_limit_s, "task.score_time_limit_s")
    if task.score_workers is not None and task.score_workers < 0:
        raise ConfigError("task.score_workers", "must be >= 0 (0: check answers in this process; null: the cores)",
                          task.score_workers)


def _check_common(cfg: Any) -> None:
    """What every stage's config has: required keys, the seed, where runs are written."""
    _check_required(cfg)
    if not 0 <= cfg.seed < 2**32:  # numpy's seed range, which accelerate's set_seed passes it to
        raise ConfigError("seed", "must be an integer in 0..4294967295 (0..2**32-1)", cfg.seed)
    for key in ("out_dir", "run_dir"):
        if cfg[key]:
            _check_directory_path(cfg[key], key)
    if "data" in cfg and cfg.data.cache_dir:
        _check_directory_path(cfg.data.cache_dir, "data.cache_dir")


def _check_directory_path(path: str, key: str) -> None:
    """A directory to write in must not be, or lie under, a file."""
    target = Path(path).expanduser()
    for ancestor in (target, *target.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "is a file" if ancestor == target else f"{ancestor} is a file"
                raise ConfigError(key, f"{where}, not a directory", path)
            return


def _check_required(cfg: Any) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(missing[0], "is required (set it on the command line)")


def _check_resume(cfg: Any) -> None:
    if cfg.resume not in (None, "never", "auto") and not Path(cfg.resume).exists():
        raise ConfigError("resume", "must be null, never, auto, or an existing checkpoint directory", cfg.resume)


def check_loss(loss: Any, vocab_size: Optional[int] = None) -> None:
    """The loss's settings; with `vocab_size` (known once the tokenizer is), also k against it."""
    for key in ("beta", "lambda_top", "lambda_tail"):
        _finite(loss[key], f"loss.{key}")
    if loss.k < 1 or (vocab_size is not None and loss.k > vocab_size):
        bound = f"in 1..{vocab_size} (the vocabulary size)" if vocab_size else ">= 1"
        raise ConfigError("loss.k", f"must be {bound}", loss.k)
    _positive(loss.chunk_size, "loss.chunk_size")
    if loss.compile and loss.impl is LossImpl.reference:
        raise ConfigError("loss.compile", "applies to loss.impl=fused or chunked, not reference", loss.compile)


def _check_model(model: Any) -> None:
    for key in ("rope_theta", "max_position_embeddings"):
        if model[key] is not None or model.arch is not ModelArch.hf:
            _positive(model[key], f"model.{key}")
    _finite(model.moe_bias_rate, "model.moe_bias_rate")
    if model.moe_bias_rate < 0:
        raise ConfigError("model.moe_bias_rate", "must be >= 0", model.moe_bias_rate)
    if model.arch is ModelArch.hf:
        if not model.name_or_path:
            raise ConfigError("model.name_or_path", "is required with model.arch=hf (a hub name or a local directory)")
        return
    for key in ("hidden_size", "num_layers", "intermediate_size", "num_heads", "num_kv_heads"):
        _positive(model[key], f"model.{key}")
    if model.num_heads % model.num_kv_heads:
        raise ConfigError("model.num_kv_heads", f"must divide model.num_heads={model.num_heads}", model.num_kv_heads)
    if model.head_dim is None and model.hidden_size % model.num_heads:
        raise ConfigError("model.num_heads", f"must divide model.hidden_size={model.hidden_size} (or set model.head_dim)",
                          model.num_heads)
    if model.arch is ModelArch.qwen3_moe:
        for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size"):
            _positive(model[key], f"model.{key}")
        if model.num_experts_per_tok > model.num_experts:
            raise ConfigError("model.num_experts_per_tok", f"must be <= model.num_experts={model.num_experts}",
                              model.num_experts_per_tok)


def _check_data(data: Any) -> None:
    _positive(data.seq_len, "data.seq_len")
    if data.source is DataSource.embedded:
        if not 1 <= data.difficulty <= 5:
            raise ConfigError("data.difficulty", "must be in 1..5", data.difficulty)
        _positive(data.num_train_docs, "data.num_train_docs")
        _positive(data.num_val_docs, "data.num_val_docs")
        if data.vocab_size < 64:
            raise ConfigError("data.vocab_size", "must be >= 64", data.vocab_size)
    elif data.source is DataSource.prepared:
        if bool(data.path) == bool(data.sources):
            raise ConfigError("data.path", "data=prepared reads one directory `ntp-rl prepare` wrote (data.path) or a "
                              "mixture (data.sources='[{path: a, weight: 0.9}, {path: b, weight: 0.1}]'): give one of "
                              "the two" + (", not both" if data.path else ""))
        places = [(f"data.sources[{i}].path", s.path) for i, s in enumerate(data.sources)] or [("data.path", data.path)]
        for key, path in places:
            if not (Path(path).expanduser() / "manifest.json").is_file():
                raise ConfigError(key, "holds no prepared corpus (no manifest.json); make one with `ntp-rl prepare "
                                  "data=hf data.path=<corpus> data.tokenizer=<tokenizer> prepare.out_dir=<dir>`", path)
        for i, source in enumerate(data.sources):
            if not (math.isfinite(source.weight) and source.weight > 0):
                raise ConfigError(f"data.sources[{i}].weight", "must be a positive number", source.weight)
    elif data.sources:
        raise ConfigError("data.sources", "is a mixture of prepared corpora: use it with data=prepared")
    else:
        if not data.path:
            raise ConfigError("data.path", "is required with data.source=hf (a hub dataset name or local files)")
        _positive(data.val_docs, "data.val_docs")


def validate_prepare(cfg: Any) -> None:
    _check_required(cfg)
    if cfg.data.source is not DataSource.hf:
        raise ConfigError("data", "prepare tokenizes a `datasets` source: data=hf data.path=<hub name or local files>",
                          cfg.data.source.value)
    _check_data(cfg.data)
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer", "is required: the tokenizer the shards are made with (an HF name or directory)")
    _check_directory_path(cfg.prepare.out_dir, "prepare.out_dir")
    _positive(cfg.prepare.workers, "prepare.workers")
    _positive(cfg.prepare.docs_per_shard, "prepare.docs_per_shard")


def _check_optim(optim: Any, prefix: str = "optim") -> None:
    for key in ("lr", "weight_decay", "beta1", "beta2", "eps", "grad_clip", "decay_fraction", "min_lr_ratio"):
        _finite(optim[key], f"{prefix}.{key}")
    _positive(optim.lr, f"{prefix}.lr")
    if optim.weight_decay < 0:
        raise ConfigError(f"{prefix}.weight_decay", "must be >= 0", optim.weight_decay)
    for key in ("beta1", "beta2"):
        if not 0 <= optim[key] < 1:
            raise ConfigError(f"{prefix}.{key}", "must be in [0, 1)", optim[key])
    if optim.warmup_steps < 0:
        raise ConfigError(f"{prefix}.warmup_steps", "must be >= 0", optim.warmup_steps)
    if not 0 <= optim.decay_fraction <= 1:
        raise ConfigError(f"{prefix}.decay_fraction", "must be in [0, 1]", optim.decay_fraction)
    if not 0 <= optim.min_lr_ratio <= 1:
        raise ConfigError(f"{prefix}.min_lr_ratio", "must be in [0, 1]", optim.min_lr_ratio)


def _check_train(train: Any) -> None:
    for key in ("max_steps", "log_every", "eval_every", "save_every", "keep_last", "eval_sequences"):
        _positive(train[key], f"train.{key}")
    # The split over processes is checked by the stage (micro_batches), which knows how many there are.
    micro_batches(train.batch_size, train.micro_batch_size, 1)


def _check_stop_at(stop_at: Any, task: Any) -> None:
    """train.stop_at: read only when its accuracy is set."""
    from ntp_rl.tasks import task_splits

    if stop_at.accuracy is None:
        return
    if not 0 < stop_at.accuracy <= 1:
        raise ConfigError("train.stop_at.accuracy", "must be in (0, 1]: the share of held-out problems solved, or "
                          "null to train all train.max_steps", stop_at.accuracy)
    _positive(stop_at.problems, "train.stop_at.problems")
    if stop_at.min_steps < 0:
        raise ConfigError("train.stop_at.min_steps", "must be >= 0", stop_at.min_steps)
    _positive(stop_at.samples, "train.stop_at.samples")
    _check_sampling(stop_at.sampling, "train.stop_at.sampling")
    if stop_at.split not in task_splits(task.kind):
        raise ConfigError("train.stop_at.split", f"task {task.name} serves only: {', '.join(task_splits(task.kind))}",
                          stop_at.split)
    _check_scoring(task)


def _check_sampling(sampling: Any, prefix: str = "sampling") -> None:
    if sampling.temperature < 0 or not math.isfinite(sampling.temperature):
        raise ConfigError(f"{prefix}.temperature", "must be a finite number >= 0 (0 = greedy)", sampling.temperature)
    if not 0 < sampling.top_p <= 1:
        raise ConfigError(f"{prefix}.top_p", "must be in (0, 1]", sampling.top_p)
    _positive(sampling.max_new_tokens, f"{prefix}.max_new_tokens")
    _positive(sampling.batch_size, f"{prefix}.batch_size")


def _check_evaluation(ev: Any, sampling: Any, diag: Any, data: Any, task: Any) -> None:
    """What an eval samples and measures, wherever it sits (`ntp-rl eval` or a pipeline's evals)."""
    from ntp_rl.tasks import TASK_SPLITS, task_splits

    _check_sampling(sampling)
    _positive(ev.n, "eval.n")
    _positive(ev.num_problems, "eval.num_problems")
    if not ev.ks:
        raise ConfigError("eval.ks", "must list at least one k, e.g. eval.ks=[1,8]", list(ev.ks))
    too_big = [k for k in ev.ks if not 1 <= k <= ev.n]
    if too_big:
        raise ConfigError("eval.ks", f"every k must be in 1..eval.n={ev.n} (pass@k draws k of the n samples); "
                          f"{too_big[0]} is not", list(ev.ks))
    # A suite's benchmarks each have their own task: only the splits every task serves.
    splits = TASK_SPLITS if ev.benchmarks else task_splits(task.kind)
    if ev.split not in splits:
        raise ConfigError("eval.split", f"must be one of: {', '.join(splits)}", ev.split)
    _check_benchmarks(ev)
    if diag.enabled:
        _check_data(data)
        for key in ("num_sequences", "batch_size", "k", "bins"):
            _positive(diag[key], f"diagnostics.{key}")
        if diag.forking_threshold < 0 or not math.isfinite(diag.forking_threshold):
            raise ConfigError("diagnostics.forking_threshold", "must be a finite entropy in nats, >= 0",
                              diag.forking_threshold)


def _check_init_from(init_from: str) -> None:
    """A local path must hold a model; anything else is taken for a hub name and checked when loaded."""
    from ntp_rl.checkpoint import resolve_model_dir

    path = Path(init_from)
    if path.exists():
        resolve_model_dir(init_from, key="init_from")
    elif path.is_absolute() or init_from.startswith((".", "~")) or len(path.parts) > 2:
        raise DataError(f"init_from={init_from}: no such directory (give a run directory, a checkpoint or an HF model)")


def _check_grpo(rl: Any, optim: Any, task: Any, optim_key: str = "optim") -> None:
    """The RL settings, wherever they sit (`ntp-rl rl` or a pipeline's rl stage)."""
    from ntp_rl.rl.advantages import ADVANTAGES
    from ntp_rl.rl.policy_loss import POLICY_LOSSES

    from ntp_rl.tasks import load_reward_fn, task_splits

    _check_optim(optim, optim_key)
    _check_scoring(task)
    _finite(task.format_reward, "task.format_reward")
    if task.reward_fn:  # imported and its signature checked before any run starts
        load_reward_fn(task.reward_fn)
    for key in ("max_steps", "prompts_per_step", "num_iterations", "num_mini_batches", "micro_batch_size",
                "logprob_chunk_size", "max_sampling_rounds", "train_problems", "log_every", "save_every", "keep_last", "eval_every",
                "eval_problems", "eval_samples"):
        _positive(rl[key], f"rl.{key}")
    for key in ("max_tokens_per_micro_batch", "prompts_per_generate_call"):
        if rl[key] is not None:
            _positive(rl[key], f"rl.{key}")
    if rl.num_generations < 2:
        raise ConfigError("rl.num_generations", "must be >= 2: group-relative advantages compare samples of a prompt",
                          rl.num_generations)
    rl_prompt_split(rl, 1)  # and again by the stage, with its number of processes
    for key in ("clip_eps_low", "clip_eps_high", "advantage_eps", "kl_coef"):
        _finite(rl[key], f"rl.{key}")
    if not 0 <= rl.clip_eps_low < 1:
        raise ConfigError("rl.clip_eps_low", "must be in [0, 1): the ratio is clipped below at 1 - clip_eps_low",
                          rl.clip_eps_low)
    if rl.clip_eps_high < 0:
        raise ConfigError("rl.clip_eps_high", "must be >= 0: the ratio is clipped above at 1 + clip_eps_high",
                          rl.clip_eps_high)
    if rl.advantage_eps < 0:
        raise ConfigError("rl.advantage_eps", "must be >= 0", rl.advantage_eps)
    if rl.kl_coef < 0:
        raise ConfigError("rl.kl_coef", "must be >= 0 (0 = no KL term)", rl.kl_coef)
    if rl.max_nonfinite_skips < 0:
        raise ConfigError("rl.max_nonfinite_skips", "must be >= 0", rl.max_nonfinite_skips)
    if rl.advantage not in ADVANTAGES:
        raise ConfigError("rl.advantage", f"unknown estimator; choose one of: {', '.join(sorted(ADVANTAGES))}", rl.advantage)
    if rl.policy_loss not in POLICY_LOSSES:
        raise ConfigError("rl.policy_loss", f"unknown loss; choose one of: {', '.join(sorted(POLICY_LOSSES))}",
                          rl.policy_loss)
    _check_sampling(rl.sampling, "rl.sampling")
    if rl.sampling.temperature == 0:
        raise ConfigError("rl.sampling.temperature", "must be > 0: GRPO compares different samples of a prompt", 0)
    _check_sampling(rl.eval_sampling, "rl.eval_sampling")
    if rl.eval_split not in task_splits(task.kind):
        raise ConfigError("rl.eval_split", f"task {task.name} serves only: {', '.join(task_splits(task.kind))}",
                          rl.eval_split)
    bad_ks = [k for k in rl.eval_ks if not 1 <= k <= rl.eval_samples]
    if bad_ks:
        raise ConfigError("rl.eval_ks", f"every k must be in 1..rl.eval_samples={rl.eval_samples}", list(rl.eval_ks))
    _check_plateau(rl)


def _check_plateau(rl: Any) -> None:
    """rl.plateau: read only when its patience is set."""
    plateau = rl.plateau
    if plateau.patience is None:
        return
    _positive(plateau.patience, "rl.plateau.patience")
    _finite(plateau.min_gain, "rl.plateau.min_gain")
    if plateau.min_gain < 0:
        raise ConfigError("rl.plateau.min_gain", "must be >= 0", plateau.min_gain)
    if plateau.min_steps < 0:
        raise ConfigError("rl.plateau.min_steps", "must be >= 0", plateau.min_steps)
    if rl.eval_split == "test":
        raise ConfigError("rl.plateau.patience", "stops on the held-out checks of rl.eval_split=test: a stopping "
                          "rule must not read the split a study reports; set rl.eval_split=validation",
                          plateau.patience)


_VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _require_vllm(key: str, instead: str) -> None:
    """Found at validation, not when the engine starts: before any run directory or W&B run exists."""
    from ntp_rl.vllm_engine import INSTALL_HINT, vllm_available

    if not vllm_available():
        raise ConfigError(key, f"vllm needs vLLM, which is not installed (or fails to import): {INSTALL_HINT}; "
                          f"or {instead}", "vllm")


def _check_generator(generator: Any, rl: Any = None) -> None:
    """The sampling engine's settings (and rl.tis_cap, which needs an engine that reports its log-probs)."""
    if rl is not None and rl.max_logp_gap is not None and not rl.max_logp_gap > 0:
        raise ConfigError("rl.max_logp_gap", "must be > 0 (nats), or null for the default of the engine's precision",
                          rl.max_logp_gap)
    if rl is not None and rl.tis_cap is not None:
        if not math.isfinite(rl.tis_cap) or rl.tis_cap < 1:
            raise ConfigError("rl.tis_cap", "must be a finite number >= 1 (the largest importance weight), or null",
                              rl.tis_cap)
        if generator.name is not GeneratorKind.vllm:
            raise ConfigError("rl.tis_cap", "corrects the sampling engine's numbers: it needs generator=vllm "
                              "(generator=hf samples with the trained model itself)", rl.tis_cap)
    if generator.name is not GeneratorKind.vllm:
        return
    _require_vllm("generator", "sample with generator=hf")
    engine = generator.vllm
    if not 0 < engine.gpu_memory_utilization <= 1:
        raise ConfigError("generator.vllm.gpu_memory_utilization", "must be in (0, 1]", engine.gpu_memory_utilization)
    for key in ("tensor_parallel_size", "max_num_seqs"):
        _positive(engine[key], f"generator.vllm.{key}")
    for key in ("kv_cache_gib", "max_model_len", "max_num_batched_tokens"):
        if engine[key] is not None:
            _positive(engine[key], f"generator.vllm.{key}")
    if engine.dtype is not None and engine.dtype not in _VLLM_DTYPES:
        raise ConfigError("generator.vllm.dtype", f"must be one of: {', '.join(_VLLM_DTYPES)}", engine.dtype)


# ---------------------------------------------------------------------------
# Checks that need what only a running stage knows: its processes, its model.


def micro_batches(batch_size: int, micro_batch_size: Optional[int], num_processes: int,
                  prefix: str = "train") -> tuple[int, int]:
    """(micro batch size, gradient accumulation steps) for this many processes, or say which key to change."""
    _positive(batch_size, f"{prefix}.batch_size")
    if micro_batch_size is None:
        if batch_size % num_processes:
            raise ConfigError(f"{prefix}.batch_size", f"must be a multiple of the {num_processes} processes", batch_size)
        return batch_size // num_processes, 1
    _positive(micro_batch_size, f"{prefix}.micro_batch_size")
    per_step = micro_batch_size * num_processes
    if batch_size % per_step:
        raise ConfigError(
            f"{prefix}.batch_size",
            f"must be a multiple of {prefix}.micro_batch_size x processes = {micro_batch_size} x {num_processes} = {per_step}",
            batch_size,
        )
    return micro_batch_size, batch_size // per_step


def rl_prompt_split(rl: Any, num_processes: int) -> int:
    """Prompts (groups) each process samples per step, or say which key to change."""
    per_update = rl.num_mini_batches * num_processes
    if rl.prompts_per_step % per_update:
        raise ConfigError("rl.prompts_per_step", f"must be a multiple of rl.num_mini_batches x processes = "
                          f"{rl.num_mini_batches} x {num_processes} = {per_update}", rl.prompts_per_step)
    return rl.prompts_per_step // num_processes


def check_seq_len(seq_len: int, model: Any) -> None:
    """Training or measuring windows longer than the model's positions would fail deep inside attention."""
    limit = model.config.max_position_embeddings
    if seq_len > limit:
        raise ConfigError("data.seq_len", f"exceeds the model's max_position_embeddings={limit}", seq_len)
