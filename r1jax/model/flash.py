"""Memory-efficient attention: softmax(q·k·scale + mask)·v computed a block of queries × a block of
keys at a time with a running max and sum (online softmax, FlashAttention-2), and a backward that
recomputes each block's scores from the saved output and log-sum-exp. Memory grows linearly in T,
forward and backward; the `dot` form materializes [B,H,T,S] fp32 scores (43 GB forward+backward per
chip at T = 4096 with 128 heads).

Legend: B batch · T query positions · S key positions (T = S: the sequence attends to itself)
· H heads (query heads) · C query block · E key block · NQ, NK number of query / key blocks.

The attention is generic over how scores and the weighted sum are formed, as the KV-cache modes
(`kv_cache.CacheMode`) are: `q` and `kv` are pytrees of [B,T,...] / [B,S,...] arrays, `scores(q, kv)`
-> [B,T,H,S] fp32 unscaled, `mix(weights [B,T,H,S], kv)` -> context [B,T,H,...]. So MLA's two-part
key (per-head nope + one shared rope head), K ≠ V, grouped-query heads and the absorbed latent cache
all run through the same loop, and the backward takes their gradients with `jax.vjp` per block.

Mask: query i sees key j iff j ≤ i and both carry the same segment id (`attention.mask`; segment 0,
padding, is a segment like any other, so a padding query sees the padding before it). A row whose
every key is masked (a prefill row of length 0) gets, as under `dot`'s softmax over NEG_INF scores,
the uniform average of all S keys' values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

import r1jax.model.kernels as kernels
from r1jax.config import AttentionImpl, check_names

NEG_INF = -1e30  # finite, so a fully masked row (padding) gives uniform weights instead of NaN
_Q_PAD, _K_PAD = -1, -2  # segment ids of the rows/keys added to round T up to a block (never equal)


def _block(tree, start, size: int):
    """Rows [start, start+size) along axis 1 of every leaf."""
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=1), tree)


def _pad(tree, to: int, value=0):
    return jax.tree.map(
        lambda a: jnp.pad(a, [(0, 0), (0, to - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=value), tree)


def _expand(x: jax.Array, like: jax.Array) -> jax.Array:
    """[B,C,H] -> broadcastable against [B,C,H,...]."""
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def _masked(s, q_seg, k_seg, q0, k0, scale):
    """Scaled scores of one block [B,C,H,E], masked to NEG_INF (the `dot` form's order: scale, then where)."""
    qi = q0 + jnp.arange(q_seg.shape[1])
    kj = k0 + jnp.arange(k_seg.shape[1])
    keep = (qi[:, None] >= kj[None, :])[None] & (q_seg[:, :, None] == k_seg[:, None, :])  # [B,C,E]
    return jnp.where(keep[:, :, None, :], s * scale, NEG_INF), keep[:, :, None, :]


def _forward(scores, mix, scale, bq, bk, q, kv, q_seg, k_seg):
    """Padded inputs (T, S multiples of bq, bk) -> out [B,T,H,...] (mix's dtype), lse [B,T,H] fp32."""
    T, S = q_seg.shape[1], k_seg.shape[1]
    nk = S // bk
    q0, kv0 = _block(q, 0, bq), _block(kv, 0, bk)
    ctx_shape = jax.eval_shape(lambda a, b: mix(jnp.zeros(jax.eval_shape(scores, a, b).shape), b), q0, kv0)

    def q_block(i):
        qi, qs = _block(q, i * bq, bq), _block(q_seg, i * bq, bq)

        def step(j, carry):
            m, l, acc = carry
            kj = _block(kv, j * bk, bk)
            s, _ = _masked(scores(qi, kj), qs, _block(k_seg, j * bk, bk), i * bq, j * bk, scale)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            acc = acc * _expand(alpha, acc) + mix(p, kj).astype(jnp.float32)
            return m_new, l * alpha + p.sum(-1), acc

        rows = ctx_shape.shape[:3]
        init = (jnp.full(rows, -jnp.inf), jnp.zeros(rows), jnp.zeros(ctx_shape.shape, jnp.float32))
        # Causal: key blocks past this query block's last row are all masked; they are skipped.
        last = jnp.minimum(((i + 1) * bq - 1) // bk + 1, nk)
        m, l, acc = lax.fori_loop(0, last, step, init)
        return (acc / _expand(l, acc)).astype(ctx_shape.dtype), m + jnp.log(l)

    out, lse = lax.map(q_block, jnp.arange(T // bq))  # [NQ,B,C,H,...]
    unblock = lambda a: jnp.moveaxis(a, 0, 1).reshape((a.shape[1], T) + a.shape[3:])  # noqa: E731
    return unblock(out), unblock(lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _flash(scores, mix, scale, bq, bk, q, kv, q_seg, k_seg):
    return _forward(scores, mix, scale, bq, bk, q, kv, q_seg, k_seg)


def _flash_fwd(scores, mix, scale, bq, bk, q, kv, q_seg, k_seg):
    out, lse = _forward(scores, mix, scale, bq, bk, q, kv, q_seg, k_seg)
    return (out, lse), (q, kv, q_seg, k_seg, out, lse)  # saved: inputs, output, lse — no [T,S] array


def _flash_bwd(scores, mix, scale, bq, bk, res, g):
    """FlashAttention-2's backward: per key block, over the query blocks that see it, recompute
    p = exp(s - lse); dv = pᵀ·do, ds = p ⊙ (do·vᵀ - rowsum(do ⊙ out)), dq += ds·k, dk += dsᵀ·q (the
    dot products through jax.vjp of `scores` and `mix`). lse's cotangent is ignored: callers use it
    only under stop_gradient."""
    q, kv, q_seg, k_seg, out, lse = res
    do = g[0]
    T, S = q_seg.shape[1], k_seg.shape[1]
    nq = T // bq
    delta = (do.astype(jnp.float32) * out.astype(jnp.float32)).sum(tuple(range(3, out.ndim)))  # [B,T,H]
    f32 = lambda t: jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), t)  # noqa: E731

    def k_block(dq, j):
        kj, ks = _block(kv, j * bk, bk), _block(k_seg, j * bk, bk)

        def step(i, carry):
            dq, dkj = carry
            qi = _block(q, i * bq, bq)
            s, scores_vjp = jax.vjp(scores, qi, kj)
            s, keep = _masked(s, _block(q_seg, i * bq, bq), ks, i * bq, j * bk, scale)
            p = jnp.exp(s - _block(lse, i * bq, bq)[..., None])
            _, mix_vjp = jax.vjp(mix, p, kj)
            dp, dkj_mix = mix_vjp(_block(do, i * bq, bq))
            ds = jnp.where(keep, p * (dp - _block(delta, i * bq, bq)[..., None]) * scale, 0.0)
            dqi, dkj_scores = scores_vjp(ds)
            dq = jax.tree.map(
                lambda a, d: lax.dynamic_update_slice_in_dim(a, _block(a, i * bq, bq) + d, i * bq, axis=1), dq, dqi)
            dkj = jax.tree.map(lambda a, x, y: a + x + y, dkj, dkj_mix, dkj_scores)
            return dq, dkj

        # Causal: query blocks before the first one holding row j·bk see none of these keys.
        return lax.fori_loop((j * bk) // bq, nq, step, (dq, f32(kj)))

    dq, dk = lax.scan(k_block, f32(q), jnp.arange(S // bk))  # dk: [NK,B,E,...] per leaf
    dk = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape((a.shape[1], S) + a.shape[3:]), dk)
    cast = lambda d, x: d.astype(x.dtype)  # noqa: E731
    return jax.tree.map(cast, dq, q), jax.tree.map(cast, dk, kv), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


BLOCK = 512  # queries and keys per block: [B,512,H,512] fp32 scores fit in VMEM/cache-sized pieces


def chunked(q, kv, scores, mix, q_segment_ids, kv_segment_ids, scale: float, block_q: int = BLOCK,
            block_k: int = BLOCK, *, heads=None):
    """Causal, segment-masked attention of q over kv (T = S), a block of block_q queries × block_k keys
    at a time, fp32 accumulation. q: pytree of [B,T,...]; kv: pytree of [B,S,...]; segment ids [B,T],
    [B,S] int (≥ 0); scores/mix as in the module docstring (static: hashable functions); `heads`, the
    plain-heads form the fused kernels take (kernels.py), is not needed here.
    -> context [B,T,H,...] in mix's dtype."""
    del heads
    T, S = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    if T != S:
        raise ValueError(f"chunked attention: queries and keys must be the same sequence, got T={T}, S={S}")
    bq, bk = min(block_q, T), min(block_k, S)
    Tp, Sp = -(-T // bq) * bq, -(-S // bk) * bk
    out, lse = _flash(scores, mix, float(scale), bq, bk, _pad(q, Tp), _pad(kv, Sp),
                      _pad(q_segment_ids, Tp, _Q_PAD), _pad(kv_segment_ids, Sp, _K_PAD))
    out, lse = out[:, :T], lax.stop_gradient(lse[:, :T])
    # A row with no visible key has lse ≈ NEG_INF; `dot` gives it softmax(all NEG_INF) = the uniform
    # average over all S keys, which mix is linear in: one [B,1,H,S] row of 1/S, not [B,T,H,S].
    H = lse.shape[2]
    uniform = mix(jnp.full((out.shape[0], 1, H, S), 1.0 / S, jnp.float32), kv)
    return jnp.where(_expand(lse < NEG_INF / 2, out), uniform.astype(out.dtype), out)


def auto(q, kv, scores, mix, q_segment_ids, kv_segment_ids, scale: float, *, heads=None):
    """The platform's kernel, chosen at trace time: splash on TPU, cudnn on a GPU where it applies
    (dtype, head dim: `kernels.cudnn_unsupported`), chunked elsewhere and for a caller without `heads`."""
    where = kernels.platform()
    impl = chunked
    if heads is not None and where == "tpu":
        impl = kernels.splash
    elif heads is not None and where == "gpu":
        qh, _, vh = jax.eval_shape(heads, q, kv)
        if kernels.cudnn_unsupported(where, qh.dtype, qh.shape[-1], vh.shape[-1]) is None:
            impl = kernels.cudnn
    return impl(q, kv, scores, mix, q_segment_ids, kv_segment_ids, scale, heads=heads)


# attention_impl name -> the full-sequence attention with `chunked`'s signature (plus `heads`, the
# plain-heads form of the caller's q/kv that the fused kernels take), or None for "dot": each caller
# keeps its own materialized softmax in its own layout, so the default computes exactly what it always
# did. The fused kernels (Pallas splash on TPU, cuDNN on GPU) are in kernels.py.
IMPLEMENTATIONS = {"dot": None, "chunked": chunked, "splash": kernels.splash, "cudnn": kernels.cudnn, "auto": auto}
check_names(IMPLEMENTATIONS, AttentionImpl, "attention_impl")


def blockwise(cfg):
    """cfg's attention implementation, or None when it is the caller's materialized `dot` form."""
    return IMPLEMENTATIONS[cfg.attention_impl]
