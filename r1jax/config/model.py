"""The two model architectures side by side: ModelConfig (DeepSeek-V2/V3, MoE + MLA) and DenseConfig (the
Qwen2/Llama students), their HF config.json round trip, and the strategy names the model code runs.

Field names follow the HF config classes, so `from_hf_config(d).to_hf_config() == d`. Fields marked
`_r1` exist only in r1jax (execution choices) and are not written to config.json.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Annotated, Literal, Optional, Union

from r1jax.config.loader import (UNION_BUILDERS, Choice, FrozenDict, apply_overrides, check_choice, from_dict,
                                 need, read_yaml, thaw)
from r1jax.errors import ConfigError

# ---- strategy names (the tables of functions live beside the model code and are checked against these)

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES = typing.get_args(Dtype)
# How routed experts run (r1jax/model/moe.py DISPATCH); "auto" (the default) is the dropless strategy
# measured fastest on the backend the model is traced for (moe.AUTO_DISPATCH).
MoeDispatch = Annotated[Literal["auto", "dense", "ragged", "blocked", "capacity", "capacity_ep", "ragged_ep"],
                        Choice("strategy")]
# What a decoder layer keeps for the backward pass (r1jax/model/transformer.py REMAT_POLICIES).
RematPolicy = Annotated[Literal["none", "full", "dots", "dots_no_batch"], Choice("policy")]
# How training attention and the sampler's prefill compute softmax(q·k)·v (r1jax/model/flash.py
# IMPLEMENTATIONS): "dot" materializes the [B,H,T,T] fp32 scores (the reference); "chunked" is online
# softmax over query × key blocks with a recomputing backward, memory linear in T (long sequences);
# "splash" jax's Pallas TPU kernel, "cudnn" cuDNN's flash attention (GPU; model/kernels.py); "auto"
# splash on TPU, cudnn on a GPU where it applies, chunked elsewhere.
# How a stack of identical layers is looped over: "scan" (one compiled layer body, its activations
# stacked per layer for the backward pass), "unroll" (every layer compiled in line: no stacking copies,
# compile time grows with depth), "auto" (the per-backend choice, decoder.UNROLL_ON: scan everywhere
# for now; benchmarks/README.md, "Defaults per backend").
LayerLoop = Annotated[Literal["auto", "scan", "unroll"], Choice("layer loop")]
AttentionImpl = Annotated[Literal["dot", "chunked", "splash", "cudnn", "auto"], Choice("attention implementation")]

# ---- the HF side: model_type -> architectures entry, and what transformers assumes for absent keys

DEEPSEEK_ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
DENSE_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
HF_MODEL_TYPES = tuple(DEEPSEEK_ARCHITECTURES)
DENSE_MODEL_TYPES = tuple(DENSE_ARCHITECTURES)
DENSE_ROPE_TYPES = ("default", "llama3", "yarn")
# What transformers' Qwen2Config / LlamaConfig assume for a key config.json leaves out, where that
# differs from DenseConfig's own defaults (which describe Qwen2.5-Math-1.5B, not the HF classes).
_HF_DENSE_DEFAULTS = {
    "qwen2": dict(num_key_value_heads=None, head_dim=None, max_position_embeddings=32768, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "llama": dict(num_key_value_heads=None, head_dim=None, max_position_embeddings=2048, tie_word_embeddings=False,
                  attention_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None),
}
# Kept apart from the other HF keys: transformers ≥ 5 nests rope_theta inside rope_parameters.
_ROPE_KEYS = ("rope_scaling", "rope_parameters", "rope_theta")


def _r1(**kw):
    """Field that exists only in r1jax (not written to the HF config.json)."""
    return dataclasses.field(metadata={"hf": False}, **kw)


def _positive_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and not math.isnan(v) and v > 0


def _rope_from_hf(d: dict, extra: dict) -> dict:
    """rope_theta, rope_scaling and hf_rope_key from a config.json dict, in either spelling; a top-level
    rope_theta beside rope_parameters goes to `extra` so it is written back."""
    rope_key = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
    rope = d.get(rope_key)
    if rope is not None and not isinstance(rope, Mapping):
        raise ConfigError(f"{rope_key}: expected a mapping or null, got {rope!r}")
    rope = dict(rope or {})
    theta = rope.pop("rope_theta", None) if rope_key == "rope_parameters" else None
    if "rope_theta" in d and rope_key == "rope_parameters":
        extra["rope_theta"] = d["rope_theta"]
    return {"rope_theta": d.get("rope_theta", 10000.0) if theta is None else theta,
            "rope_scaling": None if d.get(rope_key) is None else rope, "hf_rope_key": rope_key}


class _HFModel:
    """What ModelConfig and DenseConfig share: null defaults, freezing, the config.json round trip.
    A subclass sets HF_ARCHITECTURES and HF_REQUIRED and may adjust the HF keys through the _hf hooks."""

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if not isinstance(self.hf_extra, FrozenDict):
            object.__setattr__(self, "hf_extra", FrozenDict(self.hf_extra or {}))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        self.validate()

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @classmethod
    def _hf_keys(cls, model_type: str) -> set[str]:
        """The fields that are config.json keys of this model_type (rope ones handled apart)."""
        return {f.name for f in dataclasses.fields(cls) if f.metadata.get("hf", True)} - {"hf_extra", *_ROPE_KEYS}

    @classmethod
    def _hf_defaults(cls, model_type: str) -> dict:
        return {}

    @classmethod
    def _from_hf(cls, model_type: str, kw: dict, extra: dict) -> None:
        """Architecture-specific reading of config.json: aliases, defaults, lists; edits kw/extra."""

    def _hf_omitted(self) -> set[str]:
        """Fields left out of this config's config.json."""
        return set()

    @classmethod
    def from_hf_config(cls, d: Mapping, **r1jax_options):
        """Build from a HF config.json dict; absent keys take the HF class's defaults."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in cls.HF_ARCHITECTURES:
            raise ConfigError(f"model_type: expected one of {list(cls.HF_ARCHITECTURES)}, got {model_type!r}")
        for key in cls.HF_REQUIRED:
            if d.get(key) is None:
                raise ConfigError(f"{key}: required field missing from config.json")
        keys = cls._hf_keys(model_type)
        kw, extra = cls._hf_defaults(model_type), {}
        for k, v in d.items():
            if k not in _ROPE_KEYS:
                (kw if k in keys else extra)[k] = v
        cls._from_hf(model_type, kw, extra)
        kw.update(_rope_from_hf(d, extra))
        kw["hf_extra"] = extra
        kw.update(r1jax_options)
        return from_dict(cls, kw, "")

    def to_hf_config(self) -> dict:
        """The HF config.json dict; keys read by from_hf_config come back unchanged."""
        keys = self._hf_keys(self.model_type) - self._hf_omitted()
        out = {f.name: thaw(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name in keys}
        out.update(thaw(self.hf_extra))
        rope = thaw(self.rope_scaling) if self.rope_scaling is not None else None
        if self.hf_rope_key == "rope_parameters":
            out["rope_parameters"] = {**(rope if rope is not None else {"rope_type": "default"}),
                                      "rope_theta": self.rope_theta}
        else:
            out["rope_scaling"] = rope
            out["rope_theta"] = self.rope_theta
        out.setdefault("architectures", [self.HF_ARCHITECTURES[self.model_type]])
        return out


# ---- DeepSeek-V2/V3


@dataclasses.dataclass(frozen=True)
class ModelConfig(_HFModel):
    """DeepSeek-V2/V3 architecture. Field names follow HF `DeepseekV3Config` where one exists."""

    HF_ARCHITECTURES = DEEPSEEK_ARCHITECTURES
    HF_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                   "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    # MLA gives every head its own key and value (kv_b_proj makes H heads); kept for the round trip.
    num_key_value_heads: Optional[int] = None
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    first_k_dense_replace: int = 3
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    hidden_act: Literal["silu"] = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[FrozenDict] = None
    rope_interleave: bool = True
    attention_bias: bool = False
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1
    pad_token_id: Optional[int] = None
    model_type: Literal["deepseek_v3", "deepseek_v2"] = "deepseek_v3"
    # HF keys r1jax does not interpret (architectures, quantization_config, auto_map, ...),
    # carried so a config.json survives the round trip.
    hf_extra: FrozenDict = dataclasses.field(default_factory=FrozenDict)
    # Whether the HF config spelled rope as `rope_parameters` (transformers ≥ 5) or `rope_scaling`.
    hf_rope_key: Literal["rope_scaling", "rope_parameters"] = _r1(default="rope_scaling")
    # r1jax execution choices.
    dtype: Dtype = _r1(default="float32")
    param_dtype: Dtype = _r1(default="float32")
    moe_dispatch: MoeDispatch = _r1(default="auto")
    capacity_factor: float = _r1(default=1.25)
    # ragged_ep's receive buffer, in units of a device's own token copies (N·k): null sizes it for the
    # worst case (dropless); f > 0 gives ceil(f·N·k) rows, copies beyond it dropped and counted
    # (r1jax/model/experts.py, docs/deepseek_v3.md §5).
    ragged_buffer_factor: Optional[float] = _r1(default=None)
    remat_policy: RematPolicy = _r1(default="none")
    layer_loop: LayerLoop = _r1(default="auto")
    # Full-sequence attention: "dot" (scores materialized, O(T²) memory), "chunked" (blockwise
    # online softmax, O(T) memory forward and backward; same result to fp32 rounding), or a fused
    # kernel: "splash" (TPU), "cudnn" (GPU), "auto" (AttentionImpl above). Decode steps always use
    # the cache's own form. See docs/deepseek_v3.md §3 and r1jax/model/flash.py, kernels.py.
    attention_impl: AttentionImpl = _r1(default="dot")

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        if self.n_routed_experts == 0:
            return self.num_hidden_layers
        return min(self.first_k_dense_replace, self.num_hidden_layers)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def mtp_is_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.num_hidden_layers >= self.first_k_dense_replace

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    # ------------------------------------------------------------------ validation
    def validate(self):
        for key in self.HF_REQUIRED:  # the sizes config.json must give
            need(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        need(self.intermediate_size > 0 or self.num_dense_layers == 0, "intermediate_size",
             f"must be positive when there are dense layers, got {self.intermediate_size}")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank",
             f"must be null or positive, got {self.q_lora_rank}")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"must be even (rotary pairs), got {self.qk_rope_head_dim}")
        need(self.n_routed_experts >= 0, "n_routed_experts", "must be >= 0")
        need(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
        need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.max_position_embeddings > 0, "max_position_embeddings", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        if self.n_routed_experts > 0:
            self._validate_routing()
        if self.model_type == "deepseek_v3":
            need(self.scoring_func == "sigmoid", "scoring_func",
                 f"model_type deepseek_v3 routes with a sigmoid gate, got {self.scoring_func!r}")
            need(self.topk_method == "noaux_tc", "topk_method",
                 f"model_type deepseek_v3 routes with noaux_tc, got {self.topk_method!r}")
        else:
            need(self.scoring_func == "softmax", "scoring_func",
                 f"model_type deepseek_v2 routes with a softmax gate, got {self.scoring_func!r}")
            need(self.topk_method in ("greedy", "group_limited_greedy"), "topk_method",
                 f"model_type deepseek_v2 supports greedy or group_limited_greedy, got {self.topk_method!r}")
            need(self.rope_interleave, "rope_interleave", "deepseek_v2 always uses interleaved rope")
        need(self.capacity_factor > 0, "capacity_factor", "must be positive")
        need(self.ragged_buffer_factor is None or _positive_number(self.ragged_buffer_factor) and
             math.isfinite(self.ragged_buffer_factor), "ragged_buffer_factor",
             f"must be null (worst-case buffer) or a positive number, got {self.ragged_buffer_factor!r}")
        if self.rope_scaling is not None:
            self._validate_rope()
        check_choice(self.moe_dispatch, MoeDispatch, "moe_dispatch")
        check_choice(self.remat_policy, RematPolicy, "remat_policy")
        check_choice(self.layer_loop, LayerLoop, "layer_loop")
        check_choice(self.attention_impl, AttentionImpl, "attention_impl")

    def _validate_routing(self):
        need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
        need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
        need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             f"must be in [1, n_routed_experts={self.n_routed_experts}], got {self.num_experts_per_tok}")
        need(self.n_group >= 1, "n_group", f"must be >= 1, got {self.n_group}")
        need(self.n_routed_experts % self.n_group == 0, "n_group",
             f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})")
        need(1 <= self.topk_group <= self.n_group, "topk_group",
             f"must be in [1, n_group={self.n_group}], got {self.topk_group}")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method in ("noaux_tc", "group_limited_greedy"):
            need(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                 f"topk_group ({self.topk_group}) groups of {per_group} experts cannot supply "
                 f"num_experts_per_tok={self.num_experts_per_tok} experts")
        if self.topk_method == "noaux_tc":
            need(per_group >= 2, "n_group",
                 f"noaux_tc scores each group by its top-2 experts; n_routed_experts/n_group = {per_group}")

    def _validate_rope(self):
        rs, kind = self.rope_scaling, self.rope_type
        if kind == "default":
            return
        need(kind == "yarn", "rope_scaling.type", f"only 'yarn' (or 'default') is supported, got {kind!r}")
        factor = rs.get("factor")
        need(not (factor is None or isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0),
             "rope_scaling.factor", f"must be a positive number, got {factor!r}")
        omp = rs.get("original_max_position_embeddings")
        need(omp is None or (isinstance(omp, int) and omp > 0), "rope_scaling.original_max_position_embeddings",
             f"must be a positive int, got {omp!r}")
        for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            v = rs.get(k)
            need(v is None or not (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)),
                 f"rope_scaling.{k}", f"must be a number, got {v!r}")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def _from_hf(cls, model_type: str, kw: dict, extra: dict) -> None:
        # HF-only aliases.
        for alias, name in (("num_mtp_layers", "num_nextn_predict_layers"), ("num_local_experts", "n_routed_experts")):
            if alias in extra and name not in kw:
                kw[name] = extra.pop(alias)
        if model_type == "deepseek_v2":
            kw.setdefault("scoring_func", "softmax")
            kw.setdefault("topk_method", "greedy")
            kw.setdefault("num_nextn_predict_layers", 0)
            kw.setdefault("rope_interleave", True)
            kw.setdefault("first_k_dense_replace", 0)
            for k in ("n_group", "topk_group"):
                if kw.get(k) is None:
                    kw[k] = 1
        for k in ("first_k_dense_replace", "n_group", "topk_group", "num_experts_per_tok"):
            if k in kw and kw[k] is None:
                raise ConfigError(f"{k}: must not be null")
        if kw.get("n_routed_experts") is None:
            kw["n_routed_experts"] = 0
        if isinstance(kw.get("eos_token_id"), list):
            extra["eos_token_id"] = kw.pop("eos_token_id")

    def _hf_omitted(self) -> set[str]:
        # DeepseekV2Config has no MTP modules; the key is written only when a V2 config has them.
        v2_without_mtp = self.model_type == "deepseek_v2" and self.num_nextn_predict_layers == 0
        return {"num_nextn_predict_layers"} if v2_without_mtp else set()


# ---- dense students


@dataclasses.dataclass(frozen=True)
class DenseConfig(_HFModel):
    """A dense decoder-only student (the R1-Distill bases, docs/deepseek_v3.md §9): Qwen2 (GQA, q/k/v biases) or Llama
    (GQA, optional biases, llama3 RoPE scaling). Field names follow HF `Qwen2Config`/`LlamaConfig`; the
    defaults are Qwen2.5-Math-1.5B, the smallest R1-Distill base."""

    HF_ARCHITECTURES = DENSE_ARCHITECTURES
    HF_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: Optional[int] = 2  # null: num_attention_heads (no grouping)
    head_dim: Optional[int] = None  # null: hidden_size // num_attention_heads (Qwen2 configs leave it out)
    hidden_act: Literal["silu"] = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[FrozenDict] = None  # HF's dict: {rope_type: default | llama3 | yarn, factor, ...}
    # Biases on q/k/v, and for Llama also on o_proj (LlamaAttention). Qwen2 always has q/k/v biases and
    # none on o_proj; null: the model type's own (qwen2 true, llama false).
    attention_bias: Optional[bool] = None
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[int] = 151643
    pad_token_id: Optional[int] = None
    model_type: Literal["qwen2", "llama"] = "qwen2"
    # HF keys r1jax does not interpret (architectures, sliding_window, max_window_layers, use_cache, ...),
    # carried so a config.json survives the round trip; the ones that would change the math are checked.
    hf_extra: FrozenDict = dataclasses.field(default_factory=FrozenDict)
    hf_rope_key: Literal["rope_scaling", "rope_parameters"] = _r1(default="rope_scaling")
    # r1jax execution choices.
    dtype: Dtype = _r1(default="float32")
    param_dtype: Dtype = _r1(default="float32")
    remat_policy: RematPolicy = _r1(default="none")
    layer_loop: LayerLoop = _r1(default="auto")
    # Full-sequence attention: "dot" (scores materialized, O(T²) memory), "chunked" (blockwise
    # online softmax, O(T) memory forward and backward; same result to fp32 rounding), or a fused
    # kernel: "splash" (TPU), "cudnn" (GPU), "auto" (AttentionImpl above). Decode steps always use
    # the cache's own form. See docs/deepseek_v3.md §3 and r1jax/model/flash.py, kernels.py.
    attention_impl: AttentionImpl = _r1(default="dot")

    def __post_init__(self):
        if self.attention_bias is None:
            object.__setattr__(self, "attention_bias", self.model_type == "qwen2")
        super().__post_init__()

    # ------------------------------------------------------------------ derived sizes
    @property
    def attn_head_dim(self) -> int:
        """K: the query, key and value width of one head."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    # The MLA names of the same widths, so FLOP and KV-cache accounting read either architecture.
    @property
    def qk_head_dim(self) -> int:
        return self.attn_head_dim

    @property
    def v_head_dim(self) -> int:
        return self.attn_head_dim

    @property
    def kv_groups(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def o_proj_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @property
    def num_nextn_predict_layers(self) -> int:
        """Dense students have no multi-token prediction modules (losses and conversion ask)."""
        return 0

    # ------------------------------------------------------------------ validation
    def validate(self):
        for key in (*self.HF_REQUIRED, "num_key_value_heads", "max_position_embeddings"):  # sizes
            need(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        H, G = self.num_attention_heads, self.num_key_value_heads
        need(H % G == 0, "num_key_value_heads",
             f"must divide num_attention_heads ({H}): each kv head serves H/G query heads, got {G}")
        if self.head_dim is None:
            need(self.hidden_size % H == 0, "head_dim",
                 f"null derives hidden_size // num_attention_heads, but {self.hidden_size} is not divisible by {H}")
        else:
            need(self.head_dim > 0, "head_dim", f"must be null or positive, got {self.head_dim}")
        need(self.attn_head_dim % 2 == 0, "head_dim", f"must be even (rotary pairs), got {self.attn_head_dim}")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(self.initializer_range >= 0, "initializer_range", "must be >= 0")
        if self.model_type == "qwen2":
            need(self.attention_bias, "attention_bias", "qwen2 always has q/k/v biases (use model_type llama without)")
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, key)
            need(v is None or 0 <= v < self.vocab_size, key,
                 f"must be null or in [0, vocab_size={self.vocab_size}), got {v}")
        self._validate_hf_extra()
        if self.rope_scaling is not None:
            self._validate_rope()
        check_choice(self.remat_policy, RematPolicy, "remat_policy")
        check_choice(self.layer_loop, LayerLoop, "layer_loop")
        check_choice(self.attention_impl, AttentionImpl, "attention_impl")

    def _validate_hf_extra(self):
        """HF options that would change the math r1jax computes are rejected, not silently ignored."""
        extra = self.hf_extra
        need(not extra.get("use_sliding_window"), "use_sliding_window",
             "sliding-window attention is not supported (the R1-Distill bases attend to the full context)")
        types = extra.get("layer_types")
        if types is not None:
            need(all(t == "full_attention" for t in types), "layer_types",
                 f"only full_attention layers are supported, got {sorted(set(types))}")
        need(not extra.get("mlp_bias"), "mlp_bias", "MLP biases are not supported")
        for where in (extra, self.rope_scaling or {}):
            prf = where.get("partial_rotary_factor")
            need(prf is None or prf == 1, "partial_rotary_factor",
                 f"only 1.0 (rotate whole heads) is supported, got {prf}")

    def _validate_rope(self):
        rs, kind = self.rope_scaling, self.rope_type
        type_key = "rope_scaling." + ("rope_type" if "rope_type" in rs else "type")
        need(kind in DENSE_ROPE_TYPES, type_key, f"supported: {', '.join(DENSE_ROPE_TYPES)}, got {kind!r}")
        if kind == "default":
            return
        need(_positive_number(rs.get("factor")), "rope_scaling.factor",
             f"must be a positive number, got {rs.get('factor')!r}")
        omp = rs.get("original_max_position_embeddings")
        if kind == "llama3" or omp is not None:
            need(isinstance(omp, int) and not isinstance(omp, bool) and omp > 0,
                 "rope_scaling.original_max_position_embeddings", f"must be a positive int, got {omp!r}")
        if kind == "llama3":
            for k in ("low_freq_factor", "high_freq_factor"):
                need(_positive_number(rs.get(k)), f"rope_scaling.{k}", f"must be a positive number, got {rs.get(k)!r}")
            need(rs["high_freq_factor"] > rs["low_freq_factor"], "rope_scaling.high_freq_factor",
                 f"must exceed low_freq_factor ({rs['low_freq_factor']}): the band between them is blended")
        else:
            for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
                v = rs.get(k)
                need(v is None or _positive_number(v), f"rope_scaling.{k}", f"must be a positive number, got {v!r}")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def _hf_keys(cls, model_type: str) -> set[str]:
        keys = super()._hf_keys(model_type)
        if model_type == "qwen2":
            keys.discard("attention_bias")  # not a Qwen2Config key: passed through untouched
        return keys

    @classmethod
    def _hf_defaults(cls, model_type: str) -> dict:
        return dict(_HF_DENSE_DEFAULTS[model_type])

    @classmethod
    def _from_hf(cls, model_type: str, kw: dict, extra: dict) -> None:
        if isinstance(kw.get("eos_token_id"), list):
            # Llama 3 instruct lists several; the sampler stops on all of them (hf_extra keeps the list).
            extra["eos_token_id"], kw["eos_token_id"] = kw["eos_token_id"], None

    def _hf_omitted(self) -> set[str]:
        return {"head_dim"} if self.head_dim is None else set()  # derived, as Qwen2 configs leave it


# HF model_type -> the config class of its architecture.
MODEL_CONFIGS = {**dict.fromkeys(HF_MODEL_TYPES, ModelConfig), **dict.fromkeys(DENSE_MODEL_TYPES, DenseConfig)}


def config_from_hf(d: Mapping, **r1jax_options) -> Union[ModelConfig, DenseConfig]:
    """ModelConfig or DenseConfig from a HF config.json dict, chosen by its model_type."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
    cls = MODEL_CONFIGS.get(d.get("model_type"))
    if cls is None:
        raise ConfigError(f"model_type: expected one of {list(MODEL_CONFIGS)}, got {d.get('model_type')!r}")
    return cls.from_hf_config(d, **r1jax_options)


def model_from_dict(d: Mapping, path: str = "") -> Union[ModelConfig, DenseConfig]:
    """A model config from a YAML mapping: model_type qwen2/llama builds a DenseConfig, anything else
    (or none: deepseek_v3) a ModelConfig."""
    model_type = d.get("model_type", "deepseek_v3") if isinstance(d, Mapping) else None
    if isinstance(d, Mapping) and model_type not in MODEL_CONFIGS:
        raise ConfigError(f"{path + '.' if path else ''}model_type: expected one of {list(MODEL_CONFIGS)}, "
                          f"got {model_type!r}")
    return from_dict(MODEL_CONFIGS.get(model_type, ModelConfig), d, path)


# A field typed Union[ModelConfig, DenseConfig] (TrainConfig.model, ...) is built by its model_type.
UNION_BUILDERS[frozenset({ModelConfig, DenseConfig})] = model_from_dict


def load_model(path, overrides: list[str] = ()) -> Union[ModelConfig, DenseConfig]:
    """A model YAML (configs/model/*.yaml) of either architecture, plus dotted overrides."""
    return model_from_dict(apply_overrides(read_yaml(path), list(overrides)))
