"""Rotary position embedding with YaRN or llama3 scaling, as DeepSeek-V2/V3, Qwen2, Llama and
transformers compute it.

Legend: B batch · T positions · H heads · R rope dim · P rope pairs (R/2).
MLA rotates only the decoupled rope part of queries and keys (R = qk_rope_head_dim, docs/deepseek_v3.md §3); a dense
student rotates whole heads (R = head dim) in the half-split pairing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.config import DenseConfig, ModelConfig
from r1jax.model.arch import architecture


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1·mscale·ln(factor) + 1 (1 when factor ≤ 1)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _yarn_factor(cfg: ModelConfig) -> float:
    rs = cfg.rope_scaling
    factor = rs.get("factor")
    if factor is None:  # transformers: fall back to max / original max positions
        factor = cfg.max_position_embeddings / _original_max(cfg)
    return float(factor)


def _original_max(cfg: ModelConfig) -> int:
    return cfg.rope_scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings


def rope_dim(cfg: ModelConfig | DenseConfig) -> int:
    """R: the rotated width of one head (the architecture's)."""
    return architecture(cfg).rope_dim(cfg)


def llama3_frequencies(inv: np.ndarray, rs) -> np.ndarray:
    """Llama 3.1 scaling (transformers `_compute_llama3_parameters`): wavelengths longer than
    original/low_freq_factor are divided by `factor`, shorter than original/high_freq_factor kept, and
    the band between blends the two by where original/wavelength falls between the two factors."""
    factor, low, high = float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    original = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    scaled = np.where(wavelen > original / low, inv / factor, inv)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return np.where(medium, blended, scaled)


def inverse_frequencies(cfg: ModelConfig | DenseConfig) -> tuple[np.ndarray, float]:
    """inv_freq [P] (float32) and the factor cos/sin are multiplied by (docs/deepseek_v3.md §4)."""
    dim, base = rope_dim(cfg), cfg.rope_theta
    inv_extra = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if cfg.rope_type == "default":
        return inv_extra.astype(np.float32), 1.0
    if cfg.rope_type == "llama3":
        return llama3_frequencies(inv_extra, cfg.rope_scaling).astype(np.float32), 1.0
    rs = cfg.rope_scaling
    factor = _yarn_factor(cfg)
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1
    original = _original_max(cfg)

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float64)
    inv_inter = inv_extra / factor
    inv = inv_inter * ramp + inv_extra * (1 - ramp)
    return inv.astype(np.float32), float(attention_factor)


def softmax_scale(cfg: ModelConfig) -> float:
    """(nope+rope)^-0.5, times mscale(factor, mscale_all_dim)² under YaRN (docs/deepseek_v3.md §3)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.rope_type != "default":
        mscale_all = cfg.rope_scaling.get("mscale_all_dim", 0)
        if mscale_all:
            m = yarn_mscale(float(cfg.rope_scaling["factor"]), mscale_all)
            scale *= m * m
    return scale


def tables(positions: jax.Array, cfg: ModelConfig | DenseConfig) -> tuple[jax.Array, jax.Array]:
    """positions [B,T] int -> cos, sin [B,T,P] float32 (attention factor folded in)."""
    inv, factor = inverse_frequencies(cfg)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, interleave: bool) -> jax.Array:
    """x [B,T,H,R] (or [B,T,R]) rotated by pairs; cos/sin [B,T,P].

    interleave=True pairs dims (0,1),(2,3),… (DeepSeek's complex form) and returns the rotated pairs
    de-interleaved, as transformers does; q and k share the permutation, so q·k is unchanged.
    interleave=False pairs (i, i+P).
    """
    if x.ndim == cos.ndim + 1:
        cos, sin = cos[..., None, :], sin[..., None, :]
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
