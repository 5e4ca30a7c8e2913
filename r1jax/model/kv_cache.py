"""Attention at decode time, over a KV cache: the cache modes of each architecture and the attention of
T new tokens over the cached entries and themselves. The sampler (`r1jax.infer`) runs it inside
`decoder.layer`, in place of the training attention.

Legend: B batch · T new positions · S cached positions · D model · H heads · N nope dim · R rope dim
· K qk head dim (N+R) · V value head dim · L kv latent · G kv heads · J query heads per kv head (H/G).

Cache modes, per architecture (`arch.py`; `CACHES`, the first listed is the default):
- DeepSeek "latent": MLA absorbed decode (DeepSeek-V2 §2.1.2). The cache holds the normalized latent
  c [L] and the rotated shared rope key [R] per token and layer; kv_b's key part is folded into the
  query (q_nope → latent space) and its value part into the output, so keys/values are never expanded.
- DeepSeek "expanded": per-head keys [H,K] and values [H,V], as the training form computes them.
  Reference.
- dense "gqa": rotated keys and values per kv head [G,K]; each is read by its J query heads.

Keys carry their rope rotation, so a cache slot need not equal the token's position. The modes reuse
the model's projections (`attention.queries/latent_kv/output`, `dense.project/scores/mix/output`); only
attention over the cache is here. A mode's `scores` and `mix` are also what the blockwise attention of
the prefill (flash.py, `attention_impl`) runs over blocks of the prompt.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import r1jax.model.attention as attention
import r1jax.model.dense as dense
import r1jax.model.flash as flash
import r1jax.model.rope as rope
from r1jax.config import DenseConfig, ModelConfig
from r1jax.errors import ConfigError
from r1jax.model.arch import architecture

# --------------------------------------------------------------------------- cache modes


def _split_kv_b(p: dict, cfg: ModelConfig):
    """kv_b [L,H,N+V] -> key part [L,H,N], value part [L,H,V]."""
    return p["kv_b"][..., : cfg.qk_nope_head_dim], p["kv_b"][..., cfg.qk_nope_head_dim:]


def _latent_entry(p, c, k_rope, cfg):
    return {"c": c, "k_rope": k_rope}


def _latent_query(p, q_nope, q_rope, cfg):
    # q_nope·k_nope = q_nope·(c W_k) = (q_nope W_kᵀ)·c  (V2 eq. 10 absorbed into W_q).
    w_k, _ = _split_kv_b(p, cfg)
    return jnp.einsum("BTHN,LHN->BTHL", q_nope, w_k), q_rope


def _latent_scores(q, entry):
    q_lat, q_rope = q
    s = jnp.einsum("BTHL,BSL->BTHS", q_lat, entry["c"], preferred_element_type=jnp.float32)
    return s + jnp.einsum("BTHR,BSR->BTHS", q_rope, entry["k_rope"], preferred_element_type=jnp.float32)


def _latent_mix(weights, entry):
    return jnp.einsum("BTHS,BSL->BTHL", weights.astype(entry["c"].dtype), entry["c"])


def _latent_finish(p, ctx, cfg):
    # Σ_s w_s v_s = (Σ_s w_s c_s) W_v: the value projection moves after the weighted sum (V2 eq. 11).
    _, w_v = _split_kv_b(p, cfg)
    return jnp.einsum("BTHL,LHV->BTHV", ctx, w_v)


def _expanded_entry(p, c, k_rope, cfg):
    kv = jnp.einsum("BSL,LHC->BSHC", c, p["kv_b"])
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
    shared = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])
    return {"k": jnp.concatenate([k_nope, shared], axis=-1), "v": v}


def _expanded_query(p, q_nope, q_rope, cfg):
    return jnp.concatenate([q_nope, q_rope], axis=-1)


def _expanded_scores(q, entry):
    return jnp.einsum("BTHK,BSHK->BTHS", q, entry["k"], preferred_element_type=jnp.float32)


def _expanded_mix(weights, entry):
    return jnp.einsum("BTHS,BSHV->BTHV", weights.astype(entry["v"].dtype), entry["v"])


def _expanded_finish(p, ctx, cfg):
    return ctx


def _latent_heads(q, entry):
    # Plain heads for the fused kernels: one kv head (MQA) over [c, k_rope], values c.
    q_lat, q_rope = q
    k = jnp.concatenate([entry["c"], entry["k_rope"]], -1)[:, :, None]
    return jnp.concatenate([q_lat, q_rope], -1), k, entry["c"][:, :, None]


def _expanded_heads(q, entry):
    return q, entry["k"], entry["v"]


def _latent_widths(cfg: ModelConfig) -> dict:
    return {"c": (cfg.kv_lora_rank,), "k_rope": (cfg.qk_rope_head_dim,)}


def _expanded_widths(cfg: ModelConfig) -> dict:
    H = cfg.num_attention_heads
    return {"k": (H, cfg.qk_head_dim), "v": (H, cfg.v_head_dim)}


def _gqa_project(p, x, cos, sin, cfg):
    q, k, v = dense.project(p, x, cos, sin, cfg)
    return dense.grouped(q, cfg.num_key_value_heads), {"k": k, "v": v}


def _gqa_output(p, ctx, cfg):
    return dense.output(p, ctx)


def _gqa_widths(cfg: DenseConfig) -> dict:
    G, K = cfg.num_key_value_heads, cfg.attn_head_dim
    return {"k": (G, K), "v": (G, K)}


@dataclasses.dataclass(frozen=True)
class CacheMode:
    project: callable  # (attn params, x [B,T,D], cos, sin, cfg) -> query in the cache's key space, new entry
    # Scores are laid out [B,T,H,S]: on CPU, XLA's batched dots run about 2x faster than with [B,H,T,S].
    scores: callable  # (query, entry) -> [B,T,H,S] f32, unscaled
    mix: callable  # (weights [B,T,H,S], entry) -> context in the cache's value space
    output: callable  # (attn params, context, cfg) -> [B,T,D]
    widths: callable  # cfg -> {name: per-token trailing shape}
    scale: callable  # cfg -> softmax scale
    heads: callable = None  # (query, entry) -> plain q [B,T,H,K], k [B,S,G,K], v [B,S,G,V] (kernels.py)


def _mla_mode(entry, query, scores, mix, finish, widths, heads) -> CacheMode:
    """An MLA cache: `entry` maps the latent c [B,T,L] and k_rope [B,T,R] to what is cached, `query`
    maps q_nope/q_rope into the cache's key space, `finish` maps the mixed context to [B,T,H,V]."""
    def project(p, x, cos, sin, cfg):
        q_nope, q_rope = attention.queries(p, x, cos, sin, cfg)
        return query(p, q_nope, q_rope, cfg), entry(p, *attention.latent_kv(p, x, cos, sin, cfg), cfg)

    def output(p, ctx, cfg):
        return attention.output(p, finish(p, ctx, cfg))

    return CacheMode(project, scores, mix, output, widths, rope.softmax_scale, heads)


# Architecture name (arch.py) -> its cache modes, the default first.
CACHES = {
    "deepseek": {
        "latent": _mla_mode(_latent_entry, _latent_query, _latent_scores, _latent_mix, _latent_finish,
                            _latent_widths, _latent_heads),
        "expanded": _mla_mode(_expanded_entry, _expanded_query, _expanded_scores, _expanded_mix, _expanded_finish,
                              _expanded_widths, _expanded_heads),
    },
    "dense": {
        "gqa": CacheMode(_gqa_project, dense.scores, dense.mix, _gqa_output, _gqa_widths, dense.softmax_scale,
                         dense.heads),
    },
}
# Every mode name of every architecture (to check a name before the model, and so its architecture, is known).
ALL_MODES = frozenset(name for modes in CACHES.values() for name in modes)


def cache_modes(cfg: ModelConfig | DenseConfig) -> dict[str, CacheMode]:
    """The cache modes of cfg's architecture, its default first."""
    return CACHES[architecture(cfg).name]


def resolve_cache(cfg: ModelConfig | DenseConfig, cache: str | None) -> str:
    """The cache mode's name: `cache`, or the architecture's default when None."""
    modes = cache_modes(cfg)
    if cache is None:
        return next(iter(modes))
    if cache not in modes:
        raise ConfigError(f"cache: unknown mode {cache!r} for {cfg.model_type}; valid: {', '.join(sorted(modes))}")
    return cache


def cache_bytes_per_token(cfg: ModelConfig | DenseConfig, cache: str | None = None) -> int:
    """Bytes one token occupies in the cache, summed over all layers."""
    per_layer = sum(int(np.prod(w)) for w in cache_modes(cfg)[resolve_cache(cfg, cache)].widths(cfg).values())
    return per_layer * cfg.num_hidden_layers * jnp.dtype(cfg.dtype).itemsize


# --------------------------------------------------------------------------- attention over the cache


def attend_cached(p, x, cos, sin, new_valid, old, old_mask, cfg: ModelConfig, mode: CacheMode):
    """Attention for T new tokens over the cached entries `old` (None at prefill) and themselves.

    x [B,T,D], cos/sin [B,T,R/2] of the new positions, new_valid [B,T] (which new tokens are keys:
    each new token sees the valid ones up to itself), old_mask [B,S] -> y [B,T,D], the new tokens'
    cache entries. The prefill (no `old`) runs cfg's attention implementation (flash.py); a decode
    step (T = 1 over the cache) always the materialized form here.
    """
    q, new = mode.project(p, x, cos, sin, cfg)
    impl = flash.blockwise(cfg)
    if old is None and impl is not None:
        # Every query is segment 1 and the valid keys too: the causal mask over valid keys below.
        ctx = impl(q, new, mode.scores, mode.mix, jnp.ones_like(new_valid, jnp.int32),
                   new_valid.astype(jnp.int32), mode.scale(cfg), heads=mode.heads)
        return mode.output(p, ctx, cfg), new
    T = new_valid.shape[1]
    new_mask = jnp.tril(jnp.ones((T, T), bool))[None] & new_valid[:, None, :]
    blocks = [(new, new_mask[:, :, None, :])]
    if old is not None:
        blocks.append((old, old_mask[:, None, None, :]))
    scale = mode.scale(cfg)
    scores = [jnp.where(m, mode.scores(q, e) * scale, attention.NEG_INF) for e, m in blocks]
    weights = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # fp32 (docs/deepseek_v3.md §10)
    ctx, start = 0, 0
    for (e, _), s in zip(blocks, scores):
        ctx = ctx + mode.mix(weights[..., start : start + s.shape[-1]], e)
        start += s.shape[-1]
    return mode.output(p, ctx, cfg), new
