"""Frozen, validated configs loaded from YAML, with dotted `key=value` overrides.

Every config is a frozen dataclass, so it is hashable and can be a static argument of `jax.jit`.
Loading checks every key against the dataclass fields and every value against the field's type, and
names the full key path on error (`model.rope_scaling.factor: expected float, got 'x'`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from r1jax.errors import ConfigError


class FrozenDict(Mapping):
    """An immutable, hashable mapping for dict-valued config fields (rope scaling, HF passthrough)."""

    def __init__(self, items=()):
        self._d = {k: _freeze(v) for k, v in dict(items).items()}
        self._hash = None

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __hash__(self):
        if self._hash is None:
            self._hash = hash(json.dumps(thaw(self), sort_keys=True, default=str))
        return self._hash

    def __eq__(self, other):
        return isinstance(other, Mapping) and thaw(self) == thaw(other)

    def __repr__(self):
        return f"FrozenDict({self._d!r})"


def _freeze(v):
    if isinstance(v, Mapping) and not isinstance(v, FrozenDict):
        return FrozenDict(v)
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def thaw(v):
    """FrozenDict/tuple → plain dict/list, recursively (for JSON and YAML output)."""
    if isinstance(v, Mapping):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [thaw(x) for x in v]
    return v


# --------------------------------------------------------------------------- generic loading


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(value, tp, path: str):
    """Check `value` against type hint `tp`; return the (possibly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, Mapping) and {a for a in args if dataclasses.is_dataclass(a)} >= {ModelConfig, DenseConfig}:
            return model_from_dict(value, path)  # the architecture is chosen by model_type
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message names the key and the problem
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if tp is FrozenDict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return FrozenDict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-3` (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def from_dict(cls, d: Mapping, path: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key for {cls.__name__} "
            f"(valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e))


def to_dict(cfg) -> dict:
    """Dataclass → plain nested dict (YAML/JSON ready)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return thaw(v)

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' → (['a','b','c'], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict (new dict; input untouched)."""
    d = json.loads(json.dumps(d)) if d else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = d
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"{'.'.join(keys[: i + 1])}: is not a mapping, cannot set {'.'.join(keys)}")
            node = node[k]
        node[keys[-1]] = value
    return d


def read_yaml(path) -> dict:
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return d


def _resolve_includes(d, cls, base: Path, path: str):
    """A dataclass-typed field may name a YAML file (`model: configs/model/tiny_v3.yaml`), looked
    up beside the including file, then from the working directory. Resolved before overrides, so
    `model.num_hidden_layers=2` reaches inside it."""
    if not isinstance(d, dict) or not dataclasses.is_dataclass(cls):
        return d
    hints = typing.get_type_hints(cls)
    out = dict(d)
    for key, value in d.items():
        tp = hints.get(key)
        if tp is None:
            continue
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        sub = inner[0]
        if not dataclasses.is_dataclass(sub):
            continue
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            candidates = [base / value, Path(value)]
            found = next((c for c in candidates if c.exists()), None)
            if found is None:
                raise ConfigError(f"{path}{key}: included file {value!r} not found (looked in {base} and the "
                                  f"working directory)")
            out[key] = _resolve_includes(read_yaml(found), sub, found.parent, f"{path}{key}.")
        elif isinstance(value, dict):
            out[key] = _resolve_includes(value, sub, base, f"{path}{key}.")
    return out


def load_dict(cls, path, overrides: list[str] = ()) -> dict:
    """The YAML file as a dict with includes resolved and overrides applied."""
    d = _resolve_includes(read_yaml(path), cls, Path(path).parent, "")
    return apply_overrides(d, list(overrides))


def load(cls, path, overrides: list[str] = ()):
    """Load dataclass `cls` from a YAML file plus dotted overrides."""
    return from_dict(cls, load_dict(cls, path, overrides))


# --------------------------------------------------------------------------- the model


def _r1(**kw):
    """Field that exists only in r1jax (not written to the HF config.json)."""
    return dataclasses.field(metadata={"hf": False}, **kw)


DTYPES = ("float32", "bfloat16", "float16")
HF_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V2/V3 architecture. Field names follow HF `DeepseekV3Config` where one exists."""

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
    dtype: Literal["float32", "bfloat16", "float16"] = _r1(default="float32")
    param_dtype: Literal["float32", "bfloat16", "float16"] = _r1(default="float32")
    moe_dispatch: str = _r1(default="ragged")
    capacity_factor: float = _r1(default=1.25)
    remat_policy: str = _r1(default="none")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if not isinstance(self.hf_extra, FrozenDict):
            object.__setattr__(self, "hf_extra", FrozenDict(self.hf_extra or {}))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        self.validate()

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

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    # ------------------------------------------------------------------ validation
    def validate(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        for key in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
        ):
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
        if self.rope_scaling is not None:
            self._validate_rope()
        # Late imports: the strategy tables live beside the code they choose between.
        from r1jax.model.moe import DISPATCH
        from r1jax.model.transformer import REMAT_POLICIES

        need(self.moe_dispatch in DISPATCH, "moe_dispatch",
             f"unknown strategy {self.moe_dispatch!r}; valid: {', '.join(sorted(DISPATCH))}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy",
             f"unknown policy {self.remat_policy!r}; valid: {', '.join(sorted(REMAT_POLICIES))}")

    def _validate_rope(self):
        rs = self.rope_scaling
        kind = self.rope_type
        if kind == "default":
            return
        if kind != "yarn":
            raise ConfigError(f"rope_scaling.type: only 'yarn' (or 'default') is supported, got {kind!r}")
        factor = rs.get("factor")
        if factor is None or isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
            raise ConfigError(f"rope_scaling.factor: must be a positive number, got {factor!r}")
        omp = rs.get("original_max_position_embeddings")
        if omp is not None and (not isinstance(omp, int) or omp <= 0):
            raise ConfigError(f"rope_scaling.original_max_position_embeddings: must be a positive int, got {omp!r}")
        for k in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            v = rs.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v)):
                raise ConfigError(f"rope_scaling.{k}: must be a number, got {v!r}")

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, d: Mapping, **r1jax_options) -> "ModelConfig":
        """Build from a HF config.json dict (DeepseekV3Config or DeepseekV2Config)."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ConfigError(f"model_type: expected one of {list(HF_MODEL_TYPES)}, got {model_type!r}")
        required = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
        )
        for key in required:
            if key not in d or d[key] is None:
                raise ConfigError(f"{key}: required field missing from config.json")
        hf_fields = {f.name for f in dataclasses.fields(cls) if f.metadata.get("hf", True)} - {
            "hf_extra", "rope_scaling", "rope_theta"
        }
        kw, extra = {}, {}
        for k, v in d.items():
            if k in ("rope_scaling", "rope_parameters", "rope_theta"):
                continue
            (kw if k in hf_fields else extra)[k] = v
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
        rope_key = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
        rope = d.get(rope_key)
        if rope is not None and not isinstance(rope, Mapping):
            raise ConfigError(f"{rope_key}: expected a mapping or null, got {rope!r}")
        rope = dict(rope or {})
        theta = rope.pop("rope_theta", None) if rope_key == "rope_parameters" else None
        theta = d.get("rope_theta", 10000.0) if theta is None else theta
        if "rope_theta" in d and rope_key == "rope_parameters":
            extra["rope_theta"] = d["rope_theta"]
        kw["rope_theta"] = theta
        kw["rope_scaling"] = rope or (None if d.get(rope_key) is None else {})
        kw["hf_extra"] = extra
        kw["hf_rope_key"] = rope_key
        kw.update(r1jax_options)
        return from_dict(cls, kw, "")

    def to_hf_config(self) -> dict:
        """The HF config.json dict; keys read by from_hf_config come back unchanged."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("hf", True) or f.name in ("hf_extra", "rope_scaling", "rope_theta"):
                continue
            out[f.name] = thaw(getattr(self, f.name))
        out.update(thaw(self.hf_extra))
        rope = thaw(self.rope_scaling) if self.rope_scaling is not None else None
        if self.hf_rope_key == "rope_parameters":
            rp = dict(rope or {"rope_type": "default"})
            rp["rope_theta"] = self.rope_theta
            out["rope_parameters"] = rp
        else:
            out["rope_scaling"] = rope
            out["rope_theta"] = self.rope_theta
        if self.model_type == "deepseek_v2":
            out.pop("num_nextn_predict_layers", None) if self.num_nextn_predict_layers == 0 else None
        out.setdefault("architectures", [
            "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
        ])
        return out

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


# ---- data


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """The built-in verifiable task (r1jax/data/tasks.py): integer arithmetic like `3+4*5-2=?`."""

    min_operands: int = 2
    max_operands: int = 3
    max_operand: int = 9  # operands are drawn from 0..max_operand
    ops: str = "+-*"
    # Share of all expressions that belong to the held-out split (chosen by a hash of the expression,
    # so the two splits are disjoint whatever the seed).
    heldout_fraction: float = 0.1
    seed: int = 0
    num_train: int = 20000  # rows of the `task:train` source
    num_eval: int = 200  # rows of the `task:eval` source (distinct problems)
    # Share of train problems whose gold completion tags a wrong answer (the worked result off by 1..3),
    # like hastily written cold-start data: SFT imitates the slips, and RL, rewarded only for correct
    # answers, has to learn to report what the reasoning derived. Held-out problems are never noisy.
    answer_noise: float = 0.0

    def __post_init__(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(self.min_operands >= 2, "min_operands", f"must be >= 2, got {self.min_operands}")
        need(self.max_operands >= self.min_operands, "max_operands",
             f"must be >= min_operands={self.min_operands}, got {self.max_operands}")
        need(self.max_operand >= 1, "max_operand", f"must be >= 1, got {self.max_operand}")
        need(bool(self.ops) and set(self.ops) <= set("+-*"), "ops",
             f"must be a non-empty string of '+', '-', '*', got {self.ops!r}")
        need(0.0 < self.heldout_fraction < 1.0, "heldout_fraction",
             f"must be in (0, 1), got {self.heldout_fraction}")
        need(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        need(self.num_train >= 1, "num_train", f"must be >= 1, got {self.num_train}")
        need(self.num_eval >= 1, "num_eval", f"must be >= 1, got {self.num_eval}")
        need(0.0 <= self.answer_noise < 1.0, "answer_noise", f"must be in [0, 1), got {self.answer_noise}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """A grain input pipeline: sources → rows → tokens → packed [batch, seq_len] numpy batches.

    `kind` says what a row becomes: `pretrain` (a `text_field` document between bos and eos, loss
    on every token), `sft` (`messages` or `prompt`/`completion`, loss on assistant tokens and the
    closing eos) or `prompts` (RL prompts with gold answers, left-padded to `seq_len`).
    `batch_size` is global: each of the `shard_count` processes yields `batch_size / shard_count`
    rows. `shard_index`/`shard_count` default to the JAX process index and count.
    """

    kind: Literal["pretrain", "sft", "prompts"] = "pretrain"
    # Files, globs (`data/*.jsonl`) or the built-in task (`task:train`, `task:eval`).
    sources: tuple[str, ...] = ()
    # Mixing proportions, one per source; null concatenates the sources instead.
    weights: Optional[tuple[float, ...]] = None
    # How to read files: by extension (.jsonl/.json, .parquet, .array_record) or this format for all.
    format: Literal["auto", "jsonl", "parquet", "arrayrecord"] = "auto"
    tokenizer: str = "builtin"  # "builtin", a tokenizer.json, or a directory holding one
    seq_len: int = 256
    batch_size: int = 8
    packing: Literal["first_fit", "best_fit", "none"] = "first_fit"
    # Examples longer than seq_len: cut into seq_len pieces (no tokens lost) or keep the first piece.
    overlong: Literal["split", "truncate"] = "split"
    text_field: str = "text"
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
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(self.seq_len >= 2, "seq_len", f"must be >= 2, got {self.seq_len}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        need(self.num_epochs is None or self.num_epochs >= 1, "num_epochs",
             f"must be null or >= 1, got {self.num_epochs}")
        need(self.worker_count >= 0, "worker_count", f"must be >= 0, got {self.worker_count}")
        need(self.read_threads >= 0, "read_threads", f"must be >= 0, got {self.read_threads}")
        need(bool(self.text_field), "text_field", "must not be empty")
        need((self.shard_index is None) == (self.shard_count is None), "shard_index",
             "shard_index and shard_count are set together or not at all")
        if self.shard_count is not None:
            need(self.shard_count >= 1, "shard_count", f"must be >= 1, got {self.shard_count}")
            need(0 <= self.shard_index < self.shard_count, "shard_index",
                 f"must be in [0, shard_count={self.shard_count}), got {self.shard_index}")
        for i, src in enumerate(self.sources):
            need(bool(src.strip()), f"sources[{i}]", "must not be empty")
            need(not src.startswith("task:") or src in ("task:train", "task:eval"), f"sources[{i}]",
                 f"the built-in task is 'task:train' or 'task:eval', got {src!r}")
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

    def __post_init__(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

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


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often training checkpoints are written."""

    directory: str = ""  # empty: <out_dir>/checkpoints
    save_interval_steps: int = 1000
    max_to_keep: int = 3
    async_save: bool = True
    keep_period: Optional[int] = None  # also keep every step that is a multiple of this

    def __post_init__(self):
        if self.save_interval_steps < 1:
            raise ConfigError(f"save_interval_steps: must be >= 1, got {self.save_interval_steps}")
        if self.max_to_keep < 1:
            # The newest complete checkpoint must survive until a newer one is committed.
            raise ConfigError(f"max_to_keep: must be >= 1, got {self.max_to_keep}")
        if self.keep_period is not None and self.keep_period < 1:
            raise ConfigError(f"keep_period: must be null or >= 1, got {self.keep_period}")


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
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

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
    (dtype, moe_dispatch, capacity_factor, remat_policy).
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
    peak_flops_per_device: Optional[float] = None  # for MFU; null: measured matmul rate on CPU, else omitted
    progress: bool = True
    # Device mesh and logical-axis rules (see `MeshConfig`); the default puts every device on `data`.
    mesh: "MeshConfig" = dataclasses.field(default_factory=lambda: MeshConfig())
    # Logit-level distillation from a frozen teacher (stage sft only); null: plain training.
    distill: Optional[DistillConfig] = None

    def __post_init__(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(self.model is not None or self.init_from is not None, "model",
             "required (a mapping, or a YAML file) unless init_from names a checkpoint")
        need(self.distill is None or self.stage == "sft", "distill",
             f"logit distillation trains on SFT data: only with stage 'sft', got stage {self.stage!r}")
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
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


def _default_rewards():
    return (RewardSpec("accuracy", 1.0), RewardSpec("format", 0.5))


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO (DeepSeekMath §4; R1) with DAPO's clip-higher, dynamic sampling and overlong handling,
    and Dr.GRPO's unscaled advantages and fixed-length aggregation as options (specs/grpo.md)."""

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
    scale_rewards: bool = True  # divide advantages by the group std; false = Dr.GRPO
    advantage_eps: float = 1e-4
    num_iterations: int = 1  # μ policy updates per batch of rollouts, π_old fixed at sampling
    ref_refresh_steps: int = 0  # replace π_ref by the current policy every N steps (R1-Zero); 0 never
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
    mesh: "MeshConfig" = dataclasses.field(default_factory=lambda: MeshConfig())

    def __post_init__(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

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
        need(self.ref_refresh_steps >= 0, "ref_refresh_steps", "must be >= 0")
        need(self.max_sampling_rounds >= 1, "max_sampling_rounds", "must be >= 1")
        need(0 <= self.overlong_cache_length < self.max_new_tokens or self.overlong != "soft",
             "overlong_cache_length", f"must be in [0, max_new_tokens={self.max_new_tokens})")
        need(self.logprob_chunk >= 1, "logprob_chunk", "must be >= 1")
        need(self.router_bias_update_rate >= 0, "router_bias_update_rate", "must be >= 0")
        need(self.eval_samples >= 1, "eval_samples", "must be >= 1")
        need(self.samples_every >= 0, "samples_every", "must be >= 0")
        need(len(self.rewards) >= 1, "rewards", "at least one reward function")
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
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

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
    # What judges a completion: a built-in name (answer_match: the final answer equals the gold one)
    # or `package.module:function`, called as function(gold_answer: str, completion: str) -> bool.
    verifier: str = "answer_match"
    out_dir: str = "runs/eval"
    # Device mesh for sampling (weights loaded straight into their shards; rows split over data×fsdp×
    # expert, padded). Multi-host: every process runs the same command; process 0 writes the results.
    mesh: "MeshConfig" = dataclasses.field(default_factory=lambda: MeshConfig())

    def __post_init__(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        need(bool(self.model), "model", "required: a Hugging Face directory or an r1jax checkpoint")
        need(self.prompts.kind == "prompts", "prompts.kind", f"must be 'prompts', got {self.prompts.kind!r}")
        need(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        need(self.temperature >= 0, "temperature", "must be >= 0")
        need(self.temperature > 0 or self.num_samples == 1, "num_samples",
             "greedy decoding (temperature 0) gives one distinct sample: use num_samples 1")
        for i, k in enumerate(self.ks + self.maj_ks):
            need(1 <= k <= self.num_samples, f"ks[{i}]", f"every k must be in [1, num_samples={self.num_samples}], got {k}")
        from r1jax.eval.run import resolve_verifier  # late: the table lives beside the code using it

        resolve_verifier(self.verifier)  # a bad module or function is named before any weight is read


# ---- pipeline


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a pipeline. `config` is that stage's config mapping (its `stage`/`out_dir` are
    set by the pipeline). Inside it, "@name" in `init_from` means stage `name`'s final checkpoint and,
    in `data.sources`, stage `name`'s dataset (a rejection stage's output)."""

    name: str
    kind: Literal["pretrain", "sft", "grpo", "rejection", "distill"]
    config: FrozenDict = dataclasses.field(default_factory=FrozenDict)

    def __post_init__(self):
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"name: must be a non-empty word (letters, digits, _ or -), got {self.name!r}")


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

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: at least one stage")
        names = [st.name for st in self.stages]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ConfigError(f"stages[{i}].name: {n!r} is used twice")
        if self.eval_samples < 1:
            raise ConfigError(f"eval_samples: must be >= 1, got {self.eval_samples}")
        if self.eval_prompts is not None and self.eval_prompts.kind != "prompts":
            raise ConfigError(f"eval_prompts.kind: must be 'prompts', got {self.eval_prompts.kind!r}")


# stage name -> config class (`r1jax train` reads `stage` first).
STAGES = {"pretrain": TrainConfig, "sft": TrainConfig, "grpo": GRPOConfig}


def load_stage(path, overrides: list[str] = ()):
    """Load any stage's config: the `stage` key picks the dataclass."""
    d = read_yaml(path)
    stage = apply_overrides({"stage": d.get("stage")}, [o for o in overrides if o.startswith("stage=")])["stage"]
    if stage not in STAGES:
        raise ConfigError(f"stage: must be one of {sorted(STAGES)}, got {stage!r}")
    return load(STAGES[stage], path, overrides)


# ---- mesh

# Mesh axes, outermost first: `tensor` is innermost so its collectives (every layer, both passes) use
# the fastest links; `data` is outermost because data parallelism only reduces gradients once per step.
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Data-center-network factors for multi-slice (TPU) or multi-node (GPU) meshes: the `data`, `fsdp` and
# `expert` axes are each the product of an in-slice (ICI) factor and a cross-slice (DCN) factor. Tensor
# parallelism never crosses slices.
DCN_AXES = {"dcn_data": "data", "dcn_fsdp": "fsdp", "dcn_expert": "expert"}

# Logical axis name -> mesh axes it is split over. Every logical name in model/params.py has a row, plus
# the activation names the model constrains at block boundaries. The order is a priority: when two dims
# of one array ask for the same mesh axis, the dim whose name comes first here gets it, and the other
# dim keeps only its remaining axes. A dim that would not divide evenly by a mesh axis is replicated
# over that axis instead (see r1jax/parallel/rules.py).
DEFAULT_RULES = {
    # activations
    "batch": ("data", "fsdp", "expert"),  # tokens are split over every axis that is not tensor
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    # parameters: experts over `expert`, Megatron-style splits over `tensor`, and the model dim (or,
    # for matrices without one, the low-rank dim) over `fsdp` and `expert` (ZeRO-3 over both).
    "expert": ("expert",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "expert_mlp": ("tensor",),
    "vocab": ("tensor",),
    "embed": ("fsdp", "expert"),
    "q_lora": ("fsdp", "expert"),
    "kv_lora": ("fsdp", "expert"),
    "mtp_concat": (),
    "router_experts": (),
    "qk_dim": (),
    "kv_dim": (),
    "v_dim": (),
    "layers": (),  # the scan axis: every device holds its share of every layer
    "norm": (),
}


def _rule_axes(value, key: str) -> tuple[str, ...]:
    """A rule's value as a tuple of mesh axes: null/[] (replicated), a name, or a list of names."""
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else value
    if not isinstance(axes, (list, tuple)) or not all(isinstance(a, str) for a in axes):
        raise ConfigError(f"{key}: expected a mesh axis name, a list of them, or null, got {value!r}")
    for a in axes:
        if a not in MESH_AXES:
            raise ConfigError(f"{key}: unknown mesh axis {a!r}; valid: {', '.join(MESH_AXES)}")
    if len(set(axes)) != len(axes):
        raise ConfigError(f"{key}: names a mesh axis twice: {list(axes)}")
    return tuple(axes)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes of the `data`, `fsdp`, `expert` and `tensor` axes (one of them may be -1:
    all remaining devices), cross-slice factors, and the logical-axis rules.

    `rules` maps logical axis names to mesh axes; a YAML/override value replaces that name's row of
    `DEFAULT_RULES` and keeps the rest (`mesh.rules.vocab=null`, `mesh.rules.embed=[fsdp]`).
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    rules: FrozenDict = dataclasses.field(default_factory=lambda: FrozenDict(DEFAULT_RULES))

    def __post_init__(self):
        for key in MESH_AXES + tuple(DCN_AXES):
            v = getattr(self, key)
            if v != -1 and v < 1:
                raise ConfigError(f"{key}: must be >= 1 or -1 (fill the remaining devices), got {v}")
        for group, what in ((MESH_AXES, "in-slice"), (tuple(DCN_AXES), "cross-slice")):
            fill = [k for k in group if getattr(self, k) == -1]
            if len(fill) > 1:
                raise ConfigError(f"{fill[1]}: only one {what} axis may be -1, got {', '.join(fill)}")
        rules = dict(DEFAULT_RULES)
        for name, value in dict(self.rules or {}).items():
            if name not in DEFAULT_RULES:
                raise ConfigError(f"rules.{name}: unknown logical axis; valid: {', '.join(DEFAULT_RULES)}")
            rules[name] = _rule_axes(value, f"rules.{name}")
        object.__setattr__(self, "rules", FrozenDict(rules))

    def rule_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The rules as ordered (logical name, mesh axes) pairs, highest priority first."""
        return tuple((k, tuple(v)) for k, v in self.rules.items())

    def shape(self, num_devices: int, num_slices: int = 1) -> dict[str, int]:
        """{mesh axis: size} for `num_devices` devices in `num_slices` slices; -1 filled. The ICI factors
        tile one slice, the DCN factors tile the slices."""
        dcn = _fill({k: getattr(self, k) for k in DCN_AXES}, num_slices, "slices")
        if num_devices % num_slices:
            raise ConfigError(f"dcn_data: {num_devices} devices do not split into {num_slices} equal slices")
        ici = _fill({k: getattr(self, k) for k in MESH_AXES}, num_devices // num_slices,
                    "devices" + (" per slice" if num_slices > 1 else ""))
        return {a: ici[a] * dcn.get(f"dcn_{a}", 1) for a in MESH_AXES}

    def ici_dcn(self, num_devices: int, num_slices: int) -> tuple[dict[str, int], dict[str, int]]:
        """(in-slice sizes, cross-slice sizes) per mesh axis, for building a hybrid mesh."""
        dcn = _fill({k: getattr(self, k) for k in DCN_AXES}, num_slices, "slices")
        ici = _fill({k: getattr(self, k) for k in MESH_AXES}, num_devices // num_slices, "devices per slice")
        return ici, {a: dcn.get(f"dcn_{a}", 1) for a in MESH_AXES}


def _fill(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    """Replace a -1 by what makes the product equal `total`; a wrong product names the keys."""
    known = math.prod(v for v in sizes.values() if v != -1)
    names = "×".join(sizes)
    values = "×".join(str(v) for v in sizes.values())
    fill = [k for k, v in sizes.items() if v == -1]
    if fill:
        if total % known:
            raise ConfigError(f"{fill[0]}: -1 cannot fill the mesh: {total} {what} are not divisible by the "
                              f"other axes' product {known} ({names} = {values})")
        return {k: (total // known if v == -1 else v) for k, v in sizes.items()}
    if known != total:
        raise ConfigError(f"{next(iter(sizes))}: the mesh {names} = {values} = {known} does not match the "
                          f"{total} {what} (set one axis to -1 to fill the rest)")
    return dict(sizes)


# ---- dense student

DENSE_MODEL_TYPES = ("qwen2", "llama")
DENSE_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
DENSE_ROPE_TYPES = ("default", "llama3", "yarn")
# What transformers' Qwen2Config / LlamaConfig assume for a key config.json leaves out, where that
# differs from DenseConfig's own defaults (which describe Qwen2.5-Math-1.5B, not the HF classes).
_HF_DENSE_DEFAULTS = {
    "qwen2": dict(num_key_value_heads=None, head_dim=None, max_position_embeddings=32768, tie_word_embeddings=False,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None),
    "llama": dict(num_key_value_heads=None, head_dim=None, max_position_embeddings=2048, tie_word_embeddings=False,
                  attention_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=None),
}


def _positive_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and not math.isnan(v) and v > 0


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """A dense decoder-only student (the R1-Distill bases, spec §9): Qwen2 (GQA, q/k/v biases) or Llama
    (GQA, optional biases, llama3 RoPE scaling). Field names follow HF `Qwen2Config`/`LlamaConfig`; the
    defaults are Qwen2.5-Math-1.5B, the smallest R1-Distill base."""

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
    dtype: Literal["float32", "bfloat16", "float16"] = _r1(default="float32")
    param_dtype: Literal["float32", "bfloat16", "float16"] = _r1(default="float32")
    remat_policy: str = _r1(default="none")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.attention_bias is None:
            object.__setattr__(self, "attention_bias", self.model_type == "qwen2")
        if not isinstance(self.hf_extra, FrozenDict):
            object.__setattr__(self, "hf_extra", FrozenDict(self.hf_extra or {}))
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            object.__setattr__(self, "rope_scaling", FrozenDict(self.rope_scaling))
        self.validate()

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

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    # ------------------------------------------------------------------ validation
    def validate(self):
        def need(ok, key, msg):
            if not ok:
                raise ConfigError(f"{key}: {msg}")

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
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
        self._validate_hf_extra(need)
        if self.rope_scaling is not None:
            self._validate_rope(need)
        from r1jax.model.transformer import REMAT_POLICIES

        need(self.remat_policy in REMAT_POLICIES, "remat_policy",
             f"unknown policy {self.remat_policy!r}; valid: {', '.join(sorted(REMAT_POLICIES))}")

    def _validate_hf_extra(self, need):
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

    def _validate_rope(self, need):
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
    def from_hf_config(cls, d: Mapping, **r1jax_options) -> "DenseConfig":
        """Build from a HF config.json dict (Qwen2Config or LlamaConfig); absent keys take the HF class's
        defaults, not DenseConfig's."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"config.json: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in DENSE_MODEL_TYPES:
            raise ConfigError(f"model_type: expected one of {list(DENSE_MODEL_TYPES)}, got {model_type!r}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if d.get(key) is None:
                raise ConfigError(f"{key}: required field missing from config.json")
        hf_fields = {f.name for f in dataclasses.fields(cls) if f.metadata.get("hf", True)} - {
            "hf_extra", "rope_scaling", "rope_theta"}
        if model_type == "qwen2":
            hf_fields.discard("attention_bias")  # not a Qwen2Config key: passed through untouched
        kw, extra = dict(_HF_DENSE_DEFAULTS[model_type]), {}
        for k, v in d.items():
            if k in ("rope_scaling", "rope_parameters", "rope_theta"):
                continue
            (kw if k in hf_fields else extra)[k] = v
        if isinstance(kw.get("eos_token_id"), list):
            # Llama 3 instruct lists several; the sampler stops on all of them (hf_extra keeps the list).
            extra["eos_token_id"], kw["eos_token_id"] = kw["eos_token_id"], None
        rope_key = "rope_parameters" if "rope_parameters" in d else "rope_scaling"
        rope = d.get(rope_key)
        if rope is not None and not isinstance(rope, Mapping):
            raise ConfigError(f"{rope_key}: expected a mapping or null, got {rope!r}")
        rope = dict(rope or {})
        theta = rope.pop("rope_theta", None) if rope_key == "rope_parameters" else None
        if "rope_theta" in d and rope_key == "rope_parameters":
            extra["rope_theta"] = d["rope_theta"]
        kw["rope_theta"] = d.get("rope_theta", 10000.0) if theta is None else theta
        kw["rope_scaling"] = None if d.get(rope_key) is None else rope
        kw["hf_extra"] = extra
        kw["hf_rope_key"] = rope_key
        kw.update(r1jax_options)
        return from_dict(cls, kw, "")

    def to_hf_config(self) -> dict:
        """The HF config.json dict; keys read by from_hf_config come back unchanged."""
        out = {}
        for f in dataclasses.fields(self):
            if not f.metadata.get("hf", True) or f.name in ("hf_extra", "rope_scaling", "rope_theta"):
                continue
            if f.name == "head_dim" and self.head_dim is None:
                continue  # derived, as Qwen2 configs leave it
            if f.name == "attention_bias" and self.model_type == "qwen2":
                continue  # not a Qwen2Config key
            out[f.name] = thaw(getattr(self, f.name))
        out.update(thaw(self.hf_extra))
        rope = thaw(self.rope_scaling) if self.rope_scaling is not None else None
        if self.hf_rope_key == "rope_parameters":
            out["rope_parameters"] = {**(rope if rope is not None else {"rope_type": "default"}),
                                      "rope_theta": self.rope_theta}
        else:
            out["rope_scaling"] = rope
            out["rope_theta"] = self.rope_theta
        out.setdefault("architectures", [DENSE_ARCHITECTURES[self.model_type]])
        return out

    def replace(self, **kw) -> "DenseConfig":
        return dataclasses.replace(self, **kw)


# HF model_type -> the config class of its architecture.
MODEL_CONFIGS = {"deepseek_v3": ModelConfig, "deepseek_v2": ModelConfig, "qwen2": DenseConfig, "llama": DenseConfig}


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


def load_model(path, overrides: list[str] = ()) -> Union[ModelConfig, DenseConfig]:
    """A model YAML (configs/model/*.yaml) of either architecture, plus dotted overrides."""
    return model_from_dict(apply_overrides(read_yaml(path), list(overrides)))
