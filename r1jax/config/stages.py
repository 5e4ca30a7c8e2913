"""The configs of the R1 recipe's stages and commands: data, training (pre-training, SFT, distillation),
GRPO, rejection sampling, evaluation, and the pipeline that chains them."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal, Optional, Union

from r1jax import plugins
from r1jax.config.loader import FrozenDict, apply_overrides, load, need, read_yaml
from r1jax.config.mesh import MeshConfig
from r1jax.config.model import DenseConfig, ModelConfig
from r1jax.config.tasks import TaskConfig
from r1jax.errors import ConfigError

# ---- strategy names: the table of functions each chooses from is checked against its Literal at import

# What a data row becomes (r1jax/data/pipeline.py KINDS).
DataKind = Literal["pretrain", "sft", "prompts"]
# How examples are packed into rows (r1jax/data/packing.py PACKERS).
Packing = Literal["first_fit", "best_fit", "none"]
# What a pipeline stage runs (r1jax/pipeline.py CLASSES).
StageKind = Literal["pretrain", "sft", "grpo", "rejection", "distill"]
# The built-in judges of a completion (r1jax/eval/run.py VERIFIERS); `package.module:function` names others.
VerifierName = Literal["answer_match"]
VERIFIER_NAMES = typing.get_args(VerifierName)
# Storage dtype of Adam's μ and ν (r1jax/train/optimizer.py).
MomentDtype = Literal["float32", "bfloat16"]


# ---- data


# The built-in sources (r1jax/data/sources.py): the task `task.name` picks (TaskConfig; arithmetic by
# default) and the code task (code_task.py).
TASK_SOURCES = ("task:train", "task:eval", "task:code:train", "task:code:eval")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A grain input pipeline: sources → rows → tokens → packed [batch, seq_len] numpy batches.

    `kind` says what a row becomes: `pretrain` (a `text_field` document between bos and eos, loss
    on every token), `sft` (`messages` or `prompt`/`completion`, loss on assistant tokens and the
    closing eos) or `prompts` (RL prompts with gold answers, left-padded to `seq_len`).
    `batch_size` is global: each of the `shard_count` processes yields `batch_size / shard_count`
    rows. `shard_index`/`shard_count` default to the JAX process index and count.
    """

    kind: DataKind = "pretrain"
    # Files, globs (`data/*.jsonl`), `datasets.save_to_disk` directories, or a built-in task
    # (`task:train`, `task:eval`; the code task `task:code:train`, `task:code:eval`).
    sources: tuple[str, ...] = ()
    # Mixing proportions, one per source; null concatenates the sources instead.
    weights: Optional[tuple[float, ...]] = None
    # How to read files: by extension (.jsonl/.json, .parquet, .arrow, .array_record) or this format for all.
    format: Literal["auto", "jsonl", "parquet", "arrow", "arrayrecord"] = "auto"
    # "auto": the init_from model's own tokenizer and chat template when it has them, else "builtin";
    # or a tokenizer.json, or a directory holding one (docs/chat_templates.md).
    tokenizer: str = "auto"
    seq_len: int = 256
    batch_size: int = 8
    packing: Packing = "first_fit"
    # Examples longer than seq_len: cut into seq_len pieces (no tokens lost) or keep the first piece.
    overlong: Literal["split", "truncate"] = "split"
    text_field: str = "text"
    # Column names, TRL's by default (docs/data.md). A prompt is a string or a list of {role, content}
    # messages; a completion a string or a list of assistant messages.
    prompt_field: str = "prompt"  # sft (with completion_field) and prompts
    completion_field: str = "completion"  # sft
    messages_field: str = "messages"  # sft: the whole conversation (used when a row has it)
    # prompts: the gold answer (built-in `accuracy` reward, eval), also passed to rewards as `answer`;
    # null when the data has none (e.g. code problems judged by their `tests` column).
    answer_field: Optional[str] = "answer"
    shuffle: bool = True
    seed: int = 0
    num_epochs: Optional[int] = 1  # null: repeat forever
    # The last partial batch: dropped, or filled up with empty rows (loss_mask 0) to keep shapes static.
    drop_remainder: bool = True
    on_bad_row: Literal["error", "skip"] = "error"
    # grain worker processes (0: read and tokenize in this process). Rows are dealt out to workers,
    # so the order, and which saved states can be restored, depend on this number.
    worker_count: int = 0
    read_threads: int = 2  # threads reading and tokenizing rows (in each worker)
    shard_index: Optional[int] = None
    shard_count: Optional[int] = None
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)

    def __post_init__(self):
        need(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        need(self.num_epochs is None or self.num_epochs >= 1, "num_epochs",
             f"must be null or >= 1, got {self.num_epochs}")
        need(self.worker_count >= 0, "worker_count", f"must be >= 0, got {self.worker_count}")
        need(self.read_threads >= 0, "read_threads", f"must be >= 0, got {self.read_threads}")
        for key in ("text_field", "prompt_field", "completion_field", "messages_field"):
            need(bool(getattr(self, key)), key, "must not be empty")
        need(self.answer_field is None or bool(self.answer_field), "answer_field", "must be null or a column name")
        need((self.shard_index is None) == (self.shard_count is None), "shard_index",
             "shard_index and shard_count are set together or not at all")
        if self.shard_count is not None:
            need(self.shard_count >= 1, "shard_count", f"must be >= 1, got {self.shard_count}")
            need(0 <= self.shard_index < self.shard_count, "shard_index",
                 f"must be in [0, shard_count={self.shard_count}), got {self.shard_index}")
        for i, src in enumerate(self.sources):
            need(bool(src.strip()), f"sources[{i}]", "must not be empty")
            need(not src.startswith("task:") or src in TASK_SOURCES, f"sources[{i}]",
                 f"the built-in tasks are {', '.join(TASK_SOURCES)}; got {src!r}")
        if self.weights is not None:
            need(len(self.weights) == len(self.sources), "weights",
                 f"one weight per source: {len(self.sources)} sources, {len(self.weights)} weights")
            for i, w in enumerate(self.weights):
                need(w > 0, f"weights[{i}]", f"must be positive, got {w}")


# ---- training


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup then cosine/linear decay (or constant), global-norm clipping, and gradient
    accumulation over `grad_accum_steps` micro-batches of the global batch."""

    learning_rate: float = 3e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_steps: Optional[int] = None  # null: the run's total steps
    min_lr_ratio: float = 0.1  # final lr = learning_rate * min_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip_norm: Optional[float] = 1.0  # null: no clipping
    grad_accum_steps: int = 1
    # Storage of Adam's μ and ν. "float32": optax's adamw as is (moments in the params' dtype, fp32
    # for fp32 master weights). "bfloat16": μ, ν stored in bf16, half their memory, as DeepSeek-V3
    # does (§3.3 "Low-Precision Optimizer States"); the update is still computed in fp32 from the
    # upcast moments and the params keep their param_dtype.
    moment_dtype: MomentDtype = "float32"

    def __post_init__(self):
        need(self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(self.decay_steps is None or self.decay_steps > 0, "decay_steps", "must be null or positive")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.b1 < 1, "b1", f"must be in [0, 1), got {self.b1}")
        need(0 <= self.b2 < 1, "b2", f"must be in [0, 1), got {self.b2}")
        need(self.eps > 0, "eps", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip_norm is None or self.grad_clip_norm > 0, "grad_clip_norm", "must be null or positive")
        need(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        need(self.moment_dtype in typing.get_args(MomentDtype), "moment_dtype",
             f"must be one of {typing.get_args(MomentDtype)}, got {self.moment_dtype!r}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often training checkpoints are written."""

    directory: str = ""  # empty: <out_dir>/checkpoints
    save_interval_steps: int = 1000
    max_to_keep: int = 3
    async_save: bool = True
    keep_period: Optional[int] = None  # also keep every step that is a multiple of this

    def __post_init__(self):
        need(self.save_interval_steps >= 1, "save_interval_steps", f"must be >= 1, got {self.save_interval_steps}")
        # The newest complete checkpoint must survive until a newer one is committed.
        need(self.max_to_keep >= 1, "max_to_keep", f"must be >= 1, got {self.max_to_keep}")
        need(self.keep_period is None or self.keep_period >= 1, "keep_period",
             f"must be null or >= 1, got {self.keep_period}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Logit-level distillation of an SFT run's student from a frozen teacher (r1jax/train/distill.py):
    loss = alpha · τ²·KL(teacher_τ ‖ student_τ) + (1 − alpha) · CE(student, data targets), both
    token means over the loss mask. A `distill:` block in a stage-`sft` config (or a pipeline stage of
    kind `distill`) turns it on:

        distill:
          teacher: runs/r1/rl/checkpoints  # r1jax checkpoint (model or training dir) or HF directory
          alpha: 0.5         # weight of the KL term, in [0, 1]; 0 is plain SFT
          temperature: 2.0   # τ > 0, applied to both models' logits; the KL is scaled by τ²
          top_k: 64          # keep the teacher's top-k tokens renormalised; null: the full vocabulary
          logit_chunk: 128   # positions per chunk of the [B, chunk, V] logits of both models

    The teacher's vocab_size must equal the student's; it is loaded once, sharded by the run's rules,
    and never saved with the student's checkpoints. In a pipeline, name an earlier stage's checkpoints
    by path (`<pipeline out_dir>/<stage>/checkpoints`): "@stage" references resolve in init_from only.
    """

    teacher: str
    alpha: float = 0.5
    temperature: float = 1.0
    top_k: Optional[int] = None
    logit_chunk: int = 128

    def __post_init__(self):
        need(bool(self.teacher), "teacher", "required: an r1jax checkpoint or a Hugging Face directory")
        need(0.0 <= self.alpha <= 1.0, "alpha", f"must be in [0, 1], got {self.alpha}")
        need(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        need(self.top_k is None or self.top_k >= 1, "top_k", f"must be null or >= 1, got {self.top_k}")
        need(self.logit_chunk >= 1, "logit_chunk", f"must be >= 1, got {self.logit_chunk}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run (pre-training or SFT): model, data, optimizer, checkpoints, cadence.

    `model` is the architecture and execution choices; with `init_from` (a HF directory or an r1jax
    checkpoint) the architecture comes from there and `model` may only change execution fields
    (dtype, moe_dispatch, capacity_factor, ragged_buffer_factor, remat_policy, layer_loop, attention_impl).
    """

    stage: Literal["pretrain", "sft"] = "pretrain"
    model: Optional[Union[ModelConfig, DenseConfig]] = None
    init_from: Optional[str] = None
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    eval_data: Optional[DataConfig] = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    steps: int = 1000
    seed: int = 0
    out_dir: str = "runs/train"
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end (when eval_data is set)
    eval_batches: int = 8
    mtp_loss_weight: float = 0.3  # λ (V3 §2.2); divided over the MTP depth
    balance_loss_alpha: float = 1e-4  # α of the sequence-wise balance loss (V3 §2.1.2)
    router_bias_update_rate: float = 0.001  # γ of the aux-loss-free bias update; 0 disables it
    # Positions per vocabulary projection in the loss (logits [B,loss_chunk,V] at a time, recomputed in
    # the backward pass); 0 projects all T at once. Not with distill (its KL needs the whole logits).
    loss_chunk: int = 0
    peak_flops_per_device: Optional[float] = None  # for MFU; null: measured matmul rate on CPU, else omitted
    progress: bool = True
    # Device mesh and logical-axis rules (see `MeshConfig`); the default puts every device on `data`.
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    # Logit-level distillation from a frozen teacher (stage sft only); null: plain training.
    distill: Optional[DistillConfig] = None

    def __post_init__(self):
        need(self.model is not None or self.init_from is not None, "model",
             "required (a mapping, or a YAML file) unless init_from names a checkpoint")
        need(self.distill is None or self.stage == "sft", "distill",
             f"logit distillation trains on SFT data: only with stage 'sft', got stage {self.stage!r}")
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need(self.loss_chunk >= 0, "loss_chunk", f"must be >= 0 (0: the whole sequence), got {self.loss_chunk}")
        need(self.loss_chunk == 0 or self.distill is None, "loss_chunk",
             "distillation compares whole logits with the teacher's: set loss_chunk: 0 with distill")
        need(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        need(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        need(self.eval_batches >= 1, "eval_batches", f"must be >= 1, got {self.eval_batches}")
        need(self.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0")
        need(self.balance_loss_alpha >= 0, "balance_loss_alpha", "must be >= 0")
        need(self.router_bias_update_rate >= 0, "router_bias_update_rate", "must be >= 0")
        need(bool(self.out_dir), "out_dir", "must not be empty")
        expected_kind = {"pretrain": "pretrain", "sft": "sft"}[self.stage]
        need(self.data.kind == expected_kind, "data.kind",
             f"stage {self.stage!r} trains on kind {expected_kind!r} data, got {self.data.kind!r}")
        need(self.data.batch_size % self.optimizer.grad_accum_steps == 0, "optimizer.grad_accum_steps",
             f"must divide data.batch_size ({self.data.batch_size}), got {self.optimizer.grad_accum_steps}")
        if self.eval_data is not None:
            need(self.eval_data.kind == self.data.kind, "eval_data.kind", f"must equal data.kind ({self.data.kind!r})")


# ---- reinforcement learning


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward function of the weighted sum: a built-in name (accuracy, format, tag_count,
    language_consistency, overlong_penalty, code) or `package.module:function`, plus its options."""

    name: str = "accuracy"
    weight: float = 1.0
    label: str = ""  # metric name; default: the function name
    kwargs: FrozenDict = dataclasses.field(default_factory=FrozenDict)

    @property
    def metric_name(self) -> str:
        """`label`, else the function's name (`pkg.mod:fn` -> `fn`), as TRL names its reward columns."""
        return self.label or self.name.rpartition(":")[2]


def _default_rewards():
    return (RewardSpec("accuracy", 1.0), RewardSpec("format", 0.5))


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO (DeepSeekMath §4; R1) with DAPO's clip-higher, dynamic sampling and overlong handling,
    and Dr.GRPO's unscaled advantages and fixed-length aggregation as options (docs/grpo.md)."""

    stage: Literal["grpo"] = "grpo"
    model: Optional[Union[ModelConfig, DenseConfig]] = None
    init_from: Optional[str] = None
    prompts: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(kind="prompts", sources=("task:train",)))
    eval_prompts: Optional[DataConfig] = None
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=1e-6, weight_decay=0.0, schedule="constant"))
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    rewards: tuple[RewardSpec, ...] = dataclasses.field(default_factory=_default_rewards)
    steps: int = 100
    seed: int = 0
    out_dir: str = "runs/grpo"
    log_every: int = 1
    eval_every: int = 0
    eval_samples: int = 1  # completions per eval prompt (pass@k needs k <= eval_samples)
    samples_every: int = 10  # write prompts/completions/rewards to samples/ every N steps
    num_generations: int = 8  # G completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    beta: float = 0.04  # KL weight (k3 estimator); 0 disables the reference model entirely
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO clip-higher: 0.28
    loss_aggregation: Literal["sequence_mean", "token_mean", "fixed_length"] = "sequence_mean"
    # Advantage scale (TRL's names): "group" std (GRPO), "batch" std of the whole rollout, "none" (Dr.GRPO);
    # true/false mean "group"/"none".
    scale_rewards: Union[bool, Literal["group", "batch", "none"]] = "group"
    advantage_eps: float = 1e-4
    num_iterations: int = 1  # μ passes over the rollout's mini-batches, π_old fixed at sampling
    # M: the rollout's rows split at random into M mini-batches, one optimizer step each (R1: 16); every
    # mini-batch is optimizer.grad_accum_steps micro-batches. A step is M·μ optimizer steps.
    rollout_batches: int = 1
    ref_refresh_steps: int = 0  # replace π_ref by the current policy every N steps (rollouts; R1-Zero); 0 never
    # Options of TRL's loss (docs/grpo.md): ratio per token or per sequence (GSPO), the two-sided clip δ
    # of the unclipped branch, and the KL term weighted by the importance ratio (TRL's default: true).
    importance_sampling_level: Literal["token", "sequence"] = "token"
    delta: Optional[float] = None
    use_bias_correction_kl: bool = False
    # Edge cases (TRL's by default): a completion whose total reward is None stays in the loss with
    # advantage 0 ("keep"; its KL term applies) or is masked out ("drop"); under sequence_mean a fully
    # masked row counts in the mean's denominator ("count") or not ("skip").
    unscored: Literal["keep", "drop"] = "keep"
    masked_rows: Literal["count", "skip"] = "count"
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups and sample more prompts
    max_sampling_rounds: int = 4
    overlong: Literal["none", "mask", "soft"] = "none"
    overlong_cache_length: int = 16  # DAPO L_cache for the soft penalty
    logprob_chunk: int = 64  # positions per chunk when computing log-probs (no full [N,T,V] logits)
    # γ of V3's aux-loss-free bias update, applied after every policy update (0: routing biases frozen).
    router_bias_update_rate: float = 0.0
    progress: bool = True
    # Device mesh and logical-axis rules (see `MeshConfig`); the default puts every device on `data`.
    # Rollout and training share it: the prompts.batch_size × num_generations rows split over the batch
    # axes. Every process reads the whole prompt batch (prompts.shard_* are ignored).
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        need(self.model is not None or self.init_from is not None, "model",
             "required (a mapping, or a YAML file) unless init_from names a checkpoint")
        need(self.prompts.kind == "prompts", "prompts.kind", f"GRPO reads kind 'prompts', got {self.prompts.kind!r}")
        if self.eval_prompts is not None:
            need(self.eval_prompts.kind == "prompts", "eval_prompts.kind", "must be 'prompts'")
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need(self.num_generations >= 2, "num_generations", f"a group needs >= 2 completions, got {self.num_generations}")
        need(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        need(self.temperature > 0, "temperature", f"GRPO samples: must be > 0, got {self.temperature}")
        need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        need(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        need(self.beta >= 0, "beta", f"must be >= 0, got {self.beta}")
        need(self.epsilon_low >= 0 and self.epsilon_high >= 0, "epsilon_low", "clip ranges must be >= 0")
        need(self.num_iterations >= 1, "num_iterations", f"must be >= 1, got {self.num_iterations}")
        object.__setattr__(self, "scale_rewards", {True: "group", False: "none"}.get(self.scale_rewards,
                                                                                      self.scale_rewards))
        need(self.rollout_batches >= 1, "rollout_batches", f"must be >= 1, got {self.rollout_batches}")
        rows = self.prompts.batch_size * self.num_generations
        micro = self.rollout_batches * self.optimizer.grad_accum_steps
        need(rows % micro == 0, "rollout_batches",
             f"rollout_batches × optimizer.grad_accum_steps = {self.rollout_batches} × "
             f"{self.optimizer.grad_accum_steps} must divide the rollout's prompts.batch_size × num_generations = "
             f"{rows} rows")
        need(self.delta is None or self.delta > 1, "delta",
             f"the two-sided clip caps ratios at delta: must be > 1 (TRL advises > 1 + epsilon_high), got {self.delta}")
        need(self.ref_refresh_steps >= 0, "ref_refresh_steps", "must be >= 0")
        need(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be >= 1")
        need(0 <= self.overlong_cache_length < self.max_new_tokens or self.overlong != "soft",
             "overlong_cache_length", f"must be in [0, max_new_tokens={self.max_new_tokens})")
        need(self.logprob_chunk >= 1, "logprob_chunk", "must be >= 1")
        need(self.router_bias_update_rate >= 0, "router_bias_update_rate", "must be >= 0")
        need(self.eval_samples >= 1, "eval_samples", "must be >= 1")
        need(self.samples_every >= 0, "samples_every", "must be >= 0")
        need(len(self.rewards) >= 1, "rewards", "at least one reward function")
        names = [r.metric_name for r in self.rewards]
        twice = sorted({n for n in names if names.count(n) > 1})
        need(not twice, "rewards", f"two reward functions are named {twice[0]!r} in the metrics; give one a `label`"
             if twice else "")
        need(self.prompts.answer_field is not None or all(r.name != "accuracy" for r in self.rewards),
             "prompts.answer_field", "is null, but the accuracy reward needs the gold answer; name its column")
        need(self.log_every >= 1, "log_every", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class RejectionConfig:
    """Rejection sampling (R1 §2.3.3): N completions per prompt, keep the correct, well-formed,
    single-language, length-bounded ones, deduplicate, write an SFT dataset."""

    prompts: DataConfig = dataclasses.field(default_factory=lambda: DataConfig(kind="prompts", sources=("task:train",)))
    num_samples: int = 8
    temperature: float = 0.7  # R1's last stage samples at 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    min_tokens: int = 1
    max_prompts: Optional[int] = None  # stop after this many prompts (null: the whole prompt set)
    max_per_prompt: int = 4  # keep at most this many distinct correct completions per prompt
    require_format: bool = True
    language: str = "latin"
    min_language_share: float = 1.0
    seed: int = 0
    init_from: Optional[str] = None  # the model to sample from (HF directory or r1jax checkpoint)
    out_dir: str = "runs/rejection"

    def __post_init__(self):
        need(self.prompts.kind == "prompts", "prompts.kind", f"must be 'prompts', got {self.prompts.kind!r}")
        need(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        need(self.temperature >= 0, "temperature", "must be >= 0")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        need(1 <= self.min_tokens <= self.max_new_tokens, "min_tokens", "must be in [1, max_new_tokens]")
        need(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", "must be null or >= 1")
        need(self.max_per_prompt >= 1, "max_per_prompt", "must be >= 1")
        need(0 <= self.min_language_share <= 1, "min_language_share", "must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """`r1jax eval CONFIG`: sample `num_samples` completions per prompt from a model, verify them,
    report pass@k (unbiased) and maj@k, write results.jsonl (the table) and records.jsonl."""

    model: str = ""  # HF directory or r1jax checkpoint
    prompts: DataConfig = dataclasses.field(
        default_factory=lambda: DataConfig(kind="prompts", sources=("task:eval",), shuffle=False, drop_remainder=False))
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    ks: tuple[int, ...] = (1,)
    maj_ks: tuple[int, ...] = ()
    max_prompts: Optional[int] = None
    seed: int = 0
    # What judges a completion: a built-in name (answer_match: a built-in task's row by its task's
    # verifier, any other by its final answer equal to the gold one; docs/tasks.md) or
    # `package.module:function`, called as function(gold_answer: str, completion: str) -> bool.
    verifier: str = "answer_match"
    out_dir: str = "runs/eval"
    # Device mesh for sampling (weights loaded straight into their shards; rows split over data×fsdp×
    # expert, padded). Multi-host: every process runs the same command; process 0 writes the results.
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def __post_init__(self):
        need(bool(self.model), "model", "required: a Hugging Face directory or an r1jax checkpoint")
        need(self.prompts.kind == "prompts", "prompts.kind", f"must be 'prompts', got {self.prompts.kind!r}")
        need(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        need(self.temperature >= 0, "temperature", "must be >= 0")
        need(self.temperature > 0 or self.num_samples == 1, "num_samples",
             "greedy decoding (temperature 0) gives one distinct sample: use num_samples 1")
        for i, k in enumerate(self.ks + self.maj_ks):
            need(1 <= k <= self.num_samples, f"ks[{i}]", f"every k must be in [1, num_samples={self.num_samples}], got {k}")
        # A bad module or function is named before any weight is read. A built-in name resolves to None
        # here: the functions live in r1jax/eval/run.py VERIFIERS, which is checked against these names.
        plugins.resolve_spec(self.verifier, dict.fromkeys(VERIFIER_NAMES), "verifier", "verifier")


# ---- pipeline


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline. `config` is that stage's config mapping (its `stage`/`out_dir` are
    set by the pipeline). Inside it, "@name" in `init_from` means stage `name`'s final checkpoint and,
    in `data.sources`, stage `name`'s dataset (a rejection stage's output)."""

    name: str
    kind: StageKind
    config: FrozenDict = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self):
        need(self.name and self.name.replace("_", "").replace("-", "").isalnum(), "name",
             f"must be a non-empty word (letters, digits, _ or -), got {self.name!r}")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Stages run in order, each feeding the next (the R1 recipe); every stage is evaluated on
    `eval_prompts` (pass@1 greedy, and pass@1/pass@k over `eval_samples` samples at
    `eval_temperature`, R1's protocol) and a finished stage is never run again."""

    out_dir: str = "runs/pipeline"
    stages: tuple[StageSpec, ...] = ()
    eval_prompts: Optional[DataConfig] = None
    eval_samples: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
    eval_max_new_tokens: int = 64
    export_hf: bool = True  # write each model stage's final weights as a Hugging Face directory
    seed: int = 0
    # Every N steps of each GRPO stage, held-out pass@1 on `eval_prompts` (GRPO's eval_every: greedy
    # unless the stage sets eval_samples), drawn with the reward in rl_curves.png; 0: reward curve only.
    curve_every: int = 0

    def __post_init__(self):
        need(self.stages, "stages", "at least one stage")
        names = [st.name for st in self.stages]
        for i, n in enumerate(names):
            need(n not in names[:i], f"stages[{i}].name", f"{n!r} is used twice")
        need(self.eval_samples >= 1, "eval_samples", f"must be >= 1, got {self.eval_samples}")
        need(self.curve_every >= 0, "curve_every", f"must be >= 0, got {self.curve_every}")
        need(self.curve_every == 0 or self.eval_prompts is not None or all(
            st.kind != "grpo" or "eval_prompts" in st.config for st in self.stages), "curve_every",
             "held-out points need eval_prompts (the pipeline's or each GRPO stage's)")
        if self.eval_prompts is not None:
            need(self.eval_prompts.kind == "prompts", "eval_prompts.kind",
                 f"must be 'prompts', got {self.eval_prompts.kind!r}")


# stage name -> config class (`r1jax train` reads `stage` first).
STAGES = {"pretrain": TrainConfig, "sft": TrainConfig, "grpo": GRPOConfig}


def load_stage(path, overrides: list[str] = ()):
    """Load any stage's config: the `stage` key picks the dataclass."""
    d = read_yaml(path)
    stage = apply_overrides({"stage": d.get("stage")}, [o for o in overrides if o.startswith("stage=")])["stage"]
    if stage not in STAGES:
        raise ConfigError(f"stage: must be one of {sorted(STAGES)}, got {stage!r}")
    return load(STAGES[stage], path, overrides)


