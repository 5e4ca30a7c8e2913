"""Dense decoder-only students (the R1-Distill bases, docs/deepseek_v3.md §9): Qwen2 and Llama.

A layer is `h = x + attn(rmsnorm(x)); y = h + swiglu(rmsnorm(h))`, as DeepSeek's dense layers, with
grouped-query attention in place of MLA: G key/value heads, each read by J = H/G query heads (query
head h uses kv head h // J, as HF's `repeat_kv` lays them out). RoPE rotates whole heads in the
half-split pairing (HF `rotate_half`), with llama3 or YaRN frequency scaling (rope.py). Qwen2 adds
biases to q/k/v; Llama's `attention_bias` adds them to q/k/v and o.

Legend: B batch · T query positions · S key positions · D model · H query heads · G kv heads
· J query heads per kv head (H/G) · K head dim · F ffn hidden · V vocab.

Layout: the parameters are declared with DeepSeek's in specs.py (`gqa_attention_specs`): linear maps
input-first and split into heads, `q [D,H,K]`, `k`/`v [D,G,K]`, `o [H,K,D]`; biases flat as HF stores
them. The layers are one stack, `layers`, run by `decoder.layer` like transformer.py's (same per-layer
keys, so the sampler's cached layer runs either architecture).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import r1jax.model.decoder as decoder
import r1jax.model.flash as flash
import r1jax.model.rope as rope
from r1jax.config import DenseConfig
from r1jax.model.attention import NEG_INF, PER_HEAD, mask
from r1jax.model.decoder import default_inputs, embed, head, lm_head_weight
from r1jax.parallel.rules import constrain

# --------------------------------------------------------------------------- attention


def softmax_scale(cfg: DenseConfig) -> float:
    """K^-0.5: Qwen2 and Llama keep the plain scale under every rope scaling (YaRN's temperature is
    folded into cos/sin by rope.tables)."""
    return cfg.attn_head_dim ** -0.5


def project(p: dict, x: jax.Array, cos, sin, cfg: DenseConfig):
    """x [B,T,D] -> rotated q [B,T,H,K], rotated k [B,T,G,K], v [B,T,G,K]."""
    H, G, K = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attn_head_dim
    q = jnp.einsum("BTD,DHK->BTHK", x, p["q"])
    k = jnp.einsum("BTD,DGK->BTGK", x, p["k"])
    v = jnp.einsum("BTD,DGK->BTGK", x, p["v"])
    if "q_bias" in p:
        q, k, v = q + p["q_bias"].reshape(H, K), k + p["k_bias"].reshape(G, K), v + p["v_bias"].reshape(G, K)
    q, k, v = constrain(q, PER_HEAD), constrain(k, PER_HEAD), constrain(v, PER_HEAD)
    return rope.rotate(q, cos, sin, interleave=False), rope.rotate(k, cos, sin, interleave=False), v


def grouped(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B,T,H,K] -> [B,T,G,J,K]: query head h = g·J + j reads kv head g."""
    B, T, H, K = q.shape
    return q.reshape(B, T, num_kv_heads, H // num_kv_heads, K)


def scores(q: jax.Array, kv: dict) -> jax.Array:
    """Grouped q [B,T,G,J,K] · k [B,S,G,K] -> [B,T,H,S] f32, unscaled (the cache's and the blockwise
    implementations' layout)."""
    B, T, G, J, _ = q.shape
    s = jnp.einsum("BTGJK,BSGK->BTGJS", q, kv["k"], preferred_element_type=jnp.float32)
    return s.reshape(B, T, G * J, -1)


def mix(weights: jax.Array, kv: dict) -> jax.Array:
    """weights [B,T,H,S] · v [B,S,G,K] -> [B,T,H,K] (query head h reads kv head h // J)."""
    B, T, H, S = weights.shape
    G = kv["v"].shape[2]
    w = weights.reshape(B, T, G, H // G, S).astype(kv["v"].dtype)
    return jnp.einsum("BTGJS,BSGK->BTGJK", w, kv["v"]).reshape(B, T, H, -1)


def heads(q: jax.Array, kv: dict):
    """The plain heads the fused kernels take (kernels.py): q [B,T,H,K], k and v [B,S,G,K] as they are."""
    B, T, G, J, K = q.shape
    return q.reshape(B, T, G * J, K), kv["k"], kv["v"]


def output(p: dict, ctx: jax.Array) -> jax.Array:
    """ctx [B,T,H,K] -> [B,T,D]."""
    y = jnp.einsum("BTHK,HKD->BTD", ctx, p["o"])
    return y + p["o_bias"] if "o_bias" in p else y


def attend(p: dict, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cfg: DenseConfig) -> jax.Array:
    """GQA over x [B,T,D] with rope positions [B,T] and segment ids [B,T] -> [B,T,D]."""
    cos, sin = rope.tables(positions, cfg)
    q, k, v = project(p, x, cos, sin, cfg)
    qg = grouped(q, cfg.num_key_value_heads)
    impl = flash.blockwise(cfg)
    if impl is not None:
        ctx = impl(qg, {"k": k, "v": v}, scores, mix, segment_ids, segment_ids, softmax_scale(cfg), heads=heads)
        return output(p, constrain(ctx, PER_HEAD))
    s = jnp.einsum("BTGJK,BSGK->BGJTS", qg, k, preferred_element_type=jnp.float32)
    s = jnp.where(mask(segment_ids)[:, :, None], s * softmax_scale(cfg), NEG_INF)
    weights = jax.nn.softmax(s, axis=-1).astype(v.dtype)  # fp32 softmax (docs/deepseek_v3.md §10)
    ctx = jnp.einsum("BGJTS,BSGK->BTGJK", weights, v).reshape(q.shape)
    return output(p, constrain(ctx, PER_HEAD))


# --------------------------------------------------------------------------- the layer stack


def block(p: dict, h: jax.Array, positions, segment_ids, cfg: DenseConfig) -> jax.Array:
    """One decoder layer. h [B,T,D] -> h [B,T,D]."""
    attn = lambda pa, x: (attend(pa, x, positions, segment_ids, cfg), None)  # noqa: E731
    h, _, _ = decoder.layer(p, h, cfg, attn, decoder.dense_ffn)
    return h


def hidden(params: dict, tokens: jax.Array, cfg: DenseConfig, positions=None, segment_ids=None):
    """Embedding and every layer, before the final norm. -> h [B,T,D], None (no MoE statistics)."""
    positions, segment_ids = default_inputs(tokens, positions, segment_ids)
    layer = lambda p, h, is_moe: (block(p, h, positions, segment_ids, cfg), None)  # noqa: E731
    return decoder.stack(params, embed(params, tokens, cfg), cfg, layer)


def apply(params: dict, tokens: jax.Array, cfg: DenseConfig, positions=None, segment_ids=None,
          with_mtp: bool = False, logits: bool = True) -> dict:
    """Full model. tokens [B,T] -> {"logits" [B,T,V] f32, "moe": None}; the contract of
    `transformer.apply` (a dense student has no MTP modules, so `with_mtp` adds nothing; `logits=False`
    gives "hidden" [B,T,D] instead)."""
    h, _ = hidden(params, tokens, cfg, positions, segment_ids)
    if not logits:
        return {"hidden": h, "moe": None}
    return {"logits": head(lm_head_weight(params), params["final_norm"], h, cfg), "moe": None}


@functools.partial(jax.jit, static_argnames="cfg")
def forward_jit(params, tokens, cfg: DenseConfig, positions=None, segment_ids=None):
    return apply(params, tokens, cfg, positions, segment_ids)["logits"]
