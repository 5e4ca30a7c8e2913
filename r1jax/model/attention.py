"""Multi-head Latent Attention (DeepSeek-V2 §2.1, V3 §2.1.1), training / prefill form.

Legend: B batch · T query positions · S key positions · D model · H heads · K qk head dim (N+R)
· N nope dim · R rope dim · V value head dim · L kv latent · Q q latent.

Keys and values come from a per-token latent c [B,S,L] (plus one shared rope key [B,S,R]); this form
expands c through kv_b to per-head keys and values. The absorbed decode form over a latent cache is in
kv_cache.py and reuses `queries` and `latent_kv`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import r1jax.model.flash as flash
import r1jax.model.rope as rope
from r1jax.config import ModelConfig
from r1jax.model.layers import rms_norm
from r1jax.parallel.rules import constrain

# Per-head activations are split like the heads of the weights (tensor parallelism); no-ops without a mesh.
PER_HEAD = ("batch", "length", "act_heads", None)

NEG_INF = flash.NEG_INF


def queries(p: dict, x: jax.Array, cos, sin, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """x [B,T,D] -> q_nope [B,T,H,N], q_rope [B,T,H,R] (rotated)."""
    if cfg.q_lora_rank is None:
        q = jnp.einsum("BTD,DHK->BTHK", x, p["q"])
    else:
        qa = jnp.einsum("BTD,DQ->BTQ", x, p["q_a"])
        if "q_a_bias" in p:
            qa = qa + p["q_a_bias"]
        q = jnp.einsum("BTQ,QHK->BTHK", rms_norm(p["q_a_norm"], qa, cfg.rms_norm_eps), p["q_b"])
    q = constrain(q, PER_HEAD)
    q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
    return q_nope, rope.rotate(q_rope, cos, sin, cfg.rope_interleave)


def latent_kv(p: dict, x: jax.Array, cos, sin, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """x [B,S,D] -> normalized latent c [B,S,L], shared rotated rope key k_rope [B,S,R]."""
    ckv = jnp.einsum("BSD,DL->BSL", x, p["kv_a"])
    if "kv_a_bias" in p:
        ckv = ckv + p["kv_a_bias"]
    c, k_rope = ckv[..., : cfg.kv_lora_rank], ckv[..., cfg.kv_lora_rank:]
    return rms_norm(p["kv_a_norm"], c, cfg.rms_norm_eps), rope.rotate(k_rope, cos, sin, cfg.rope_interleave)


def mask(segment_ids: jax.Array) -> jax.Array:
    """Causal within a segment: [B,T] -> bool [B,1,T,S] (T = S; packed rows never see each other)."""
    T = segment_ids.shape[1]
    causal = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def scores(q: tuple, kv: dict) -> jax.Array:
    """(q_nope [B,T,H,N], q_rope [B,T,H,R]) · (k_nope [B,S,H,N], shared k_rope [B,S,R]) -> [B,T,H,S] f32,
    unscaled: the blockwise implementations' form of the scores `attend` computes."""
    q_nope, q_rope = q
    s = jnp.einsum("BTHN,BSHN->BTHS", q_nope, kv["k_nope"], preferred_element_type=jnp.float32)
    return s + jnp.einsum("BTHR,BSR->BTHS", q_rope, kv["k_rope"], preferred_element_type=jnp.float32)


def mix(weights: jax.Array, kv: dict) -> jax.Array:
    """weights [B,T,H,S] · v [B,S,H,V] -> [B,T,H,V]."""
    return jnp.einsum("BTHS,BSHV->BTHV", weights.astype(kv["v"].dtype), kv["v"])


def heads(q: tuple, kv: dict):
    """The plain heads the fused kernels take (kernels.py): q [B,T,H,N+R], k [B,S,H,N+R] (the shared rope
    key repeated per head), v [B,S,H,V]."""
    q_nope, q_rope = q
    k_rope = jnp.broadcast_to(kv["k_rope"][:, :, None], kv["k_nope"].shape[:3] + kv["k_rope"].shape[-1:])
    return (jnp.concatenate([q_nope, q_rope], -1), jnp.concatenate([kv["k_nope"], k_rope], -1), kv["v"])


def output(p: dict, ctx: jax.Array) -> jax.Array:
    """ctx [B,T,H,V] -> [B,T,D]."""
    y = jnp.einsum("BTHV,HVD->BTD", ctx, p["o"])
    return y + p["o_bias"] if "o_bias" in p else y


def attend(p: dict, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, cfg: ModelConfig) -> jax.Array:
    """MLA over x [B,T,D] with rope positions [B,T] and segment ids [B,T] -> [B,T,D]."""
    cos, sin = rope.tables(positions, cfg)
    q_nope, q_rope = queries(p, x, cos, sin, cfg)
    c, k_rope = latent_kv(p, x, cos, sin, cfg)
    kv = constrain(jnp.einsum("BSL,LHC->BSHC", c, p["kv_b"]), PER_HEAD)
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
    impl = flash.blockwise(cfg)
    if impl is not None:
        ctx = impl((q_nope, q_rope), {"k_nope": k_nope, "k_rope": k_rope, "v": v}, scores, mix,
                   segment_ids, segment_ids, rope.softmax_scale(cfg), heads=heads)
        return output(p, constrain(ctx, PER_HEAD))
    # q·k = q_nope·k_nope + q_rope·k_rope; the rope key is one head shared by all (docs/deepseek_v3.md §3).
    s = jnp.einsum("BTHN,BSHN->BHTS", q_nope, k_nope, preferred_element_type=jnp.float32)
    s += jnp.einsum("BTHR,BSR->BHTS", q_rope, k_rope, preferred_element_type=jnp.float32)
    s = jnp.where(mask(segment_ids), s * rope.softmax_scale(cfg), NEG_INF)
    weights = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return output(p, constrain(jnp.einsum("BHTS,BSHV->BTHV", weights, v), PER_HEAD))
