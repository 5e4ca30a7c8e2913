"""Every parameter of both architectures, declared once: shape, initializer, logical axes and Hugging
Face name. Init, sharding rules, HF conversion and checkpoints all read the table that `arch` picks
for a config (`params.param_table`); nothing else declares a parameter. Layers of one kind are stacked
on a leading `layers` axis so the forward pass can `jax.lax.scan` over them; routed experts are
stacked on an `expert` axis.

Legend: D model · V vocab · Q q latent · L kv latent · R rope dim · N nope dim · K qk head dim (N+R;
a dense head's width) · H heads · G kv heads · Vh value head dim · F dense ffn hidden · Fm expert ffn
hidden · Fs shared ffn hidden · E routed experts.

Layout: r1jax stores every linear map input-first (`x @ w`), split into heads where the einsum wants
them: MLA's `q_b [Q,H,K]`, `kv_b [L,H,N+Vh]`, `o [H,Vh,D]`; GQA's `q [D,H,K]`, `k`/`v [D,G,K]`,
`o [H,K,D]`. HF stores `[out, in]`; `fan_in` says how many leading dims of one tensor form `in`, which
is all conversion needs (transpose + reshape). GQA biases stay flat as HF stores them (`[H·K]`,
`[G·K]`), so conversion copies them as they are; the forward views them per head.
"""

from __future__ import annotations

import dataclasses

import jax

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


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def linear(shape, axes, hf, fan_in=1) -> ParamSpec:
    return ParamSpec(tuple(shape), tuple(axes), "normal", hf, fan_in)


def norm(dim, hf) -> ParamSpec:
    return ParamSpec((dim,), ("norm",), "ones", hf)


def bias(dim, axis, hf) -> ParamSpec:
    return ParamSpec((dim,), (axis,), "zeros", hf)


def stack(tree, n: int):
    """Every spec of `tree` with a leading `layers` axis of n."""
    return jax.tree.map(lambda s: dataclasses.replace(s, shape=(n,) + s.shape, axes=("layers",) + s.axes),
                        tree, is_leaf=is_spec)


def mlp_specs(D: int, F: int, prefix: str, axis: str = "mlp") -> dict:
    return {
        "gate": linear((D, F), ("embed", axis), prefix + "gate_proj.weight"),
        "up": linear((D, F), ("embed", axis), prefix + "up_proj.weight"),
        "down": linear((F, D), (axis, "embed"), prefix + "down_proj.weight"),
    }


def model_table(cfg, groups: dict, group_specs) -> dict:
    """Embedding, final norm, head (unless tied) and each stacked group: `group_specs(name, group)` is
    one layer's specs; `groups` is the architecture's stack layout (`arch.Group`s)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    table = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal", "model.embed_tokens.weight"),
        "final_norm": norm(D, "model.norm.weight"),
    }
    if not cfg.tie_word_embeddings:
        table["lm_head"] = linear((D, V), ("embed", "vocab"), "lm_head.weight")
    for name, group in groups.items():
        table[name] = stack(group_specs(name, group), group.count)
    return table


# --------------------------------------------------------------------------- DeepSeek (MLA + MoE)


def attention_specs(cfg: ModelConfig) -> dict:
    D, H, K = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
    L, R, Vh = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim
    p = "self_attn."
    s = {}
    if cfg.q_lora_rank is None:
        s["q"] = linear((D, H, K), ("embed", "heads", "qk_dim"), p + "q_proj.weight")
    else:
        Q = cfg.q_lora_rank
        s["q_a"] = linear((D, Q), ("embed", "q_lora"), p + "q_a_proj.weight")
        s["q_a_norm"] = norm(Q, p + "q_a_layernorm.weight")
        s["q_b"] = linear((Q, H, K), ("q_lora", "heads", "qk_dim"), p + "q_b_proj.weight")
        if cfg.attention_bias:
            s["q_a_bias"] = bias(Q, "q_lora", p + "q_a_proj.bias")
    s["kv_a"] = linear((D, L + R), ("embed", "kv_lora"), p + "kv_a_proj_with_mqa.weight")
    s["kv_a_norm"] = norm(L, p + "kv_a_layernorm.weight")
    s["kv_b"] = linear((L, H, cfg.qk_nope_head_dim + Vh), ("kv_lora", "heads", "kv_dim"), p + "kv_b_proj.weight")
    s["o"] = linear((H, Vh, D), ("heads", "v_dim", "embed"), p + "o_proj.weight", fan_in=2)
    if cfg.attention_bias:
        s["kv_a_bias"] = bias(L + R, "kv_lora", p + "kv_a_proj_with_mqa.bias")
        s["o_bias"] = bias(D, "embed", p + "o_proj.bias")
    return s


def moe_specs(cfg: ModelConfig) -> dict:
    D, E, Fm = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    s = {
        "router": linear((D, E), ("embed", "router_experts"), "mlp.gate.weight"),
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
        "input_norm": norm(D, "input_layernorm.weight"),
        "attn": attention_specs(cfg),
        "post_attn_norm": norm(D, "post_attention_layernorm.weight"),
        "mlp": moe_specs(cfg) if moe else mlp_specs(D, cfg.intermediate_size, "mlp."),
    }


def mtp_specs(cfg: ModelConfig) -> dict:
    D, V = cfg.hidden_size, cfg.vocab_size
    s = block_specs(cfg, moe=cfg.mtp_is_moe)
    s.update(
        enorm=norm(D, "enorm.weight"),
        hnorm=norm(D, "hnorm.weight"),
        # V3 report §2.2: h' = M [norm(emb) ; norm(h)], embedding half first in the release.
        eh_proj=linear((2 * D, D), ("mtp_concat", "embed"), "eh_proj.weight"),
        head_norm=norm(D, "shared_head.norm.weight"),
        head=linear((D, V), ("embed", "vocab"), "shared_head.head.weight"),
    )
    return s


def deepseek_layer_specs(cfg: ModelConfig):
    """(group name, arch.Group) -> one layer's specs: a decoder layer, or an MTP module."""
    return lambda name, group: block_specs(cfg, moe=group.moe) if group.decoder else mtp_specs(cfg)


# --------------------------------------------------------------------------- dense students (GQA)


def gqa_attention_specs(cfg: DenseConfig) -> dict:
    D, H, G, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
    p = "self_attn."
    # kv heads split over `tensor` like query heads (the rules replicate them when G does not divide).
    s = {
        "q": linear((D, H, K), ("embed", "heads", "qk_dim"), p + "q_proj.weight"),
        "k": linear((D, G, K), ("embed", "heads", "qk_dim"), p + "k_proj.weight"),
        "v": linear((D, G, K), ("embed", "heads", "v_dim"), p + "v_proj.weight"),
        "o": linear((H, K, D), ("heads", "v_dim", "embed"), p + "o_proj.weight", fan_in=2),
    }
    if cfg.attention_bias:
        s["q_bias"] = bias(H * K, "heads", p + "q_proj.bias")
        s["k_bias"] = bias(G * K, "heads", p + "k_proj.bias")
        s["v_bias"] = bias(G * K, "heads", p + "v_proj.bias")
    if cfg.o_proj_bias:
        s["o_bias"] = bias(D, "embed", p + "o_proj.bias")
    return s


def dense_layer_specs(cfg: DenseConfig):
    """(group name, arch.Group) -> one dense decoder layer's specs."""
    D = cfg.hidden_size
    return lambda name, group: {
        "input_norm": norm(D, "input_layernorm.weight"),
        "attn": gqa_attention_specs(cfg),
        "post_attn_norm": norm(D, "post_attention_layernorm.weight"),
        "mlp": mlp_specs(D, cfg.intermediate_size, "mlp."),
    }
