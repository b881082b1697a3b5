"""lm-evaluation-harness on a checkpoint: the general benchmarks base models are compared on.

`ntp-rl eval harness.tasks=[hellaswag,arc_easy]` runs the harness's tasks on the model instead
of sampling the task: with the hf backend on the model exactly as ntp-rl loads it (an MoE
checkpoint routes with its balancing bias), or with the harness's own vLLM backend. The
harness is an optional extra (`pip install -e ".[harness]"`); task YAMLs of your own, over
local files, come in with `harness.include_path`.
"""

from __future__ import annotations

import math
from typing import Any

from ntp_rl.errors import ConfigError, UserError

INSTALL = 'pip install -e ".[harness]"'


def require_harness() -> None:
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"harness.tasks needs lm-evaluation-harness, an optional extra: {INSTALL}")


def evaluate(harness_cfg: Any, lm: Any, tokenizer: Any, model_path: str, seed: int) -> dict:
    """The harness's results dict (results, versions, n-shot, configs) for `harness.tasks`."""
    require_harness()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = None
    if harness_cfg.include_path:  # indexing the harness's own thousands of YAMLs takes minutes: only when needed
        manager = TaskManager(include_path=harness_cfg.include_path, include_defaults=False)
        if not all(name in manager.all_tasks for name in harness_cfg.tasks):
            manager = None
    manager = manager or TaskManager(include_path=harness_cfg.include_path)
    unknown = [name for name in harness_cfg.tasks if name not in manager.all_tasks]
    if unknown:
        raise ConfigError("harness.tasks", f"{unknown[0]} is not a task lm-evaluation-harness knows"
                          f"{' (nor harness.include_path)' if harness_cfg.include_path else ''}", list(harness_cfg.tasks))
    extra = dict(harness_cfg.model_args or {})
    if harness_cfg.backend == "hf":
        from lm_eval.models.huggingface import HFLM

        model: Any = HFLM(pretrained=lm, tokenizer=tokenizer, batch_size=harness_cfg.batch_size, **extra)
        model_args = None
    else:
        model, model_args = "vllm", {"pretrained": model_path, "tokenizer": model_path, **extra}
    results = simple_evaluate(model=model, model_args=model_args, tasks=list(harness_cfg.tasks),
                              num_fewshot=harness_cfg.num_fewshot, batch_size=harness_cfg.batch_size,
                              limit=harness_cfg.limit, task_manager=manager, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:  # the harness returns None on the processes other than its first
        return {}
    return {key: results.get(key) for key in ("results", "groups", "versions", "n-shot", "higher_is_better")}


def scores(results: dict) -> dict[str, dict[str, float]]:
    """task -> metric -> value, the harness's "acc,none" written "acc" (its filter kept when it is not none)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in (results.get("results") or {}).items():
        for key, value in metrics.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt == "none" else f"{metric}/{filt}"
            if math.isfinite(value):
                out.setdefault(task, {})[name] = float(value)
    return out
