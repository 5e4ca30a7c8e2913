"""The one table of every parameter: shape, initializer, logical axes and Hugging Face name.

Init, sharding rules, HF conversion and checkpoints all read `param_table(cfg)`; nothing else
declares a parameter. Layers of one kind are stacked on a leading `layers` axis so the forward pass
can `jax.lax.scan` over them; routed experts are stacked on an `expert` axis. This file holds the
DeepSeek table; a dense student's (DenseConfig) is in `model/dense.py`, built from the helpers here,
and the functions below dispatch on the config type.

Legend: D model · V vocab · Q q latent · L kv latent · R rope dim · N nope dim · K qk head dim (N+R)
· H heads · Vh value head dim · F dense ffn hidden · Fm expert ffn hidden · Fs shared ffn hidden
· E routed experts.

Layout: r1jax stores every linear map input-first (`x @ w`), split into heads where the einsum wants
them: `q_b [Q,H,K]`, `kv_b [L,H,N+Vh]`, `o [H,Vh,D]`. HF stores `[out, in]`; `fan_in` says how many
leading dims of one tensor form `in`, which is all conversion needs (transpose + reshape).
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import jax
import jax.numpy as jnp

from r1jax.config import DenseConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical axis names, one per dim
    init: str  # "normal" (std = initializer_range) | "ones" | "zeros"
    hf: str  # HF tensor name; inside a layer it is relative ("self_attn.o_proj.weight"), {e} = expert
    # > 0: a linear map stored [out, in] by HF; the first `fan_in` dims of one HF tensor's slice (after
    # the leading `layers`/`expert` stacking dims) form `in`.
    fan_in: int = 0
    dtype: str | None = None  # fixed storage dtype regardless of param_dtype (router bias: float32)

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.hf, self.shape, self.axes)


def _linear(shape, axes, hf, fan_in=1):
    return ParamSpec(tuple(shape), tuple(axes), "normal", hf, fan_in)


def _norm(dim, hf):
    return ParamSpec((dim,), ("norm",), "ones", hf)


def _bias(dim, axis, hf):
    return ParamSpec((dim,), (axis,), "zeros", hf)


def attention_specs(cfg: ModelConfig) -> dict:
    D, H, K = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
    L, R, Vh = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
    p = "self_attn."
    s = {}
    if cfg.q_lora_rank is None:
        s["q"] = _linear((D, H, K), ("embed", "heads", "qk_dim"), p + "q_proj.weight")
    else:
        Q = cfg.q_lora_rank
        s["q_a"] = _linear((D, Q), ("embed", "q_lora"), p + "q_a_proj.weight")
        s["q_a_norm"] = _norm(Q, p + "q_a_layernorm.weight")
        s["q_b"] = _linear((Q, H, K), ("q_lora", "heads", "qk_dim"), p + "q_b_proj.weight")
        if cfg.attention_bias:
            s["q_a_bias"] = _bias(Q, "q_lora", p + "q_a_proj.bias")
    s["kv_a"] = _linear((D, L + R), ("embed", "kv_lora"), p + "kv_a_proj_with_mqa.weight")
    s["kv_a_norm"] = _norm(L, p + "kv_a_layernorm.weight")
    s["kv_b"] = _linear((L, H, cfg.qk_nope_head_dim + Vh), ("kv_lora", "heads", "kv_dim"), p + "kv_b_proj.weight")
    s["o"] = _linear((H, Vh, D), ("heads", "v_dim", "embed"), p + "o_proj.weight", fan_in=2)
    if cfg.attention_bias:
        s["kv_a_bias"] = _bias(L + R, "kv_lora", p + "kv_a_proj_with_mqa.bias")
        s["o_bias"] = _bias(D, "embed", p + "o_proj.bias")
    return s


def mlp_specs(D: int, F: int, prefix: str, axis: str = "mlp") -> dict:
    return {
        "gate": _linear((D, F), ("embed", axis), prefix + "gate_proj.weight"),
        "up": _linear((D, F), ("embed", axis), prefix + "up_proj.weight"),
        "down": _linear((F, D), (axis, "embed"), prefix + "down_proj.weight"),
    }


def moe_specs(cfg: ModelConfig) -> dict:
    D, E, Fm = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    s = {
        "router": _linear((D, E), ("embed", "router_experts"), "mlp.gate.weight"),
        "experts": {
            k: ParamSpec((E,) + v.shape, ("expert",) + v.axes, "normal", v.hf, v.fan_in)
            for k, v in mlp_specs(D, Fm, "mlp.experts.{e}.", "expert_mlp").items()
        },
    }
    if cfg.topk_method == "noaux_tc":
        # Selection-only bias of the aux-loss-free balancing (V3 report §2.1.2); never trained by
        # gradient, kept in fp32 like HF's `_keep_in_fp32_modules_strict`.
        s["router_bias"] = ParamSpec((E,), ("router_experts",), "zeros", "mlp.gate.e_score_correction_bias",
                                     dtype="float32")
    if cfg.n_shared_experts > 0:
        s["shared"] = mlp_specs(D, cfg.shared_intermediate_size, "mlp.shared_experts.")
    return s


def block_specs(cfg: ModelConfig, moe: bool) -> dict:
    D = cfg.hidden_size
    return {
        "input_norm": _norm(D, "input_layernorm.weight"),
        "attn": attention_specs(cfg),
        "post_attn_norm": _norm(D, "post_attention_layernorm.weight"),
        "mlp": moe_specs(cfg) if moe else mlp_specs(D, cfg.intermediate_size, "mlp."),
    }


def mtp_specs(cfg: ModelConfig) -> dict:
    D, V = cfg.hidden_size, cfg.vocab_size
    s = block_specs(cfg, moe=cfg.mtp_is_moe)
    s.update(
        enorm=_norm(D, "enorm.weight"),
        hnorm=_norm(D, "hnorm.weight"),
        # V3 report §2.2: h' = M [norm(emb) ; norm(h)], embedding half first in the release.
        eh_proj=_linear((2 * D, D), ("mtp_concat", "embed"), "eh_proj.weight"),
        head_norm=_norm(D, "shared_head.norm.weight"),
        head=_linear((D, V), ("embed", "vocab"), "shared_head.head.weight"),
    )
    return s


def _stack(tree, n: int):
    return jax.tree.map(
        lambda s: dataclasses.replace(s, shape=(n,) + s.shape, axes=("layers",) + s.axes),
        tree,
        is_leaf=lambda x: isinstance(x, ParamSpec),
    )


def _dense():
    """model/dense.py, imported on use: it builds its table from this file's helpers."""
    from r1jax.model import dense

    return dense


def stack_layout(cfg: ModelConfig | DenseConfig) -> dict[str, tuple[int, int]]:
    """Stacked group → (first HF layer index, number of layers); empty groups are left out."""
    if isinstance(cfg, DenseConfig):
        return _dense().stack_layout(cfg)
    out = {
        "dense_layers": (0, cfg.num_dense_layers),
        "moe_layers": (cfg.num_dense_layers, cfg.num_moe_layers),
        "mtp": (cfg.num_hidden_layers, cfg.num_nextn_predict_layers),
    }
    return {k: v for k, v in out.items() if v[1] > 0}


def param_table(cfg: ModelConfig | DenseConfig) -> dict:
    """Nested dict of ParamSpec mirroring the params pytree."""
    if isinstance(cfg, DenseConfig):
        return _dense().param_table(cfg)
    D, V = cfg.hidden_size, cfg.vocab_size
    table = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal", "model.embed_tokens.weight"),
        "final_norm": _norm(D, "model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head"] = _linear((D, V), ("embed", "vocab"), "lm_head.weight")
    groups = {"dense_layers": lambda: block_specs(cfg, moe=False),
              "moe_layers": lambda: block_specs(cfg, moe=True),
              "mtp": lambda: mtp_specs(cfg)}
    for name, (_, n) in stack_layout(cfg).items():
        table[name] = _stack(groups[name](), n)
    return table


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig):
    """Pytree of logical-axis tuples, same structure as params."""
    return jax.tree.map(lambda s: s.axes, param_table(cfg), is_leaf=is_spec)


def param_dtype(spec: ParamSpec, cfg: ModelConfig):
    return jnp.dtype(spec.dtype or cfg.param_dtype)


def param_shapes(cfg: ModelConfig):
    """Pytree of jax.ShapeDtypeStruct (for abstract init, planning, checkpoint restore)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype(s, cfg)), param_table(cfg),
                        is_leaf=is_spec)


def init_params(cfg: ModelConfig, key: jax.Array, out_shardings=None) -> dict:
    """Random params, built in one compiled computation (and directly into `out_shardings` when
    given, so a large model is never materialized on one device). Each leaf's key is folded from
    its path, so adding a parameter elsewhere does not change the others' values."""
    return jax.jit(_init, static_argnums=0, out_shardings=out_shardings)(cfg, key)


def _init(cfg: ModelConfig, key: jax.Array) -> dict:
    table = param_table(cfg)
    flat = jax.tree_util.tree_flatten_with_path(table, is_leaf=is_spec)[0]
    leaves = []
    for path, spec in flat:
        name = jax.tree_util.keystr(path)
        dtype = param_dtype(spec, cfg)
        if spec.init == "ones":
            leaves.append(jnp.ones(spec.shape, dtype))
        elif spec.init == "zeros":
            leaves.append(jnp.zeros(spec.shape, dtype))
        else:
            k = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            leaves.append((cfg.initializer_range * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(jax.tree.structure(table, is_leaf=is_spec), leaves)


def count_params(cfg: ModelConfig, active: bool = False) -> int:
    """Total parameters (or, with active=True, those one token touches: k of E routed experts)."""
    total = 0
    for path, spec in jax.tree_util.tree_flatten_with_path(param_table(cfg), is_leaf=is_spec)[0]:
        n = math.prod(spec.shape)
        if active and "expert" in spec.axes:
            n = n // cfg.n_routed_experts * cfg.num_experts_per_tok
        total += n
    return total
