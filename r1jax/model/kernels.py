"""Fused attention kernels behind `attention_impl` (flash.py's table): "splash", jax's Pallas splash
attention for TPU, and "cudnn", cuDNN's flash attention through `jax.nn.dot_product_attention` on NVIDIA
GPUs. Both compute `chunked`'s causal, segment-masked softmax(q·k·scale)·v and take its arguments.

Legend: B batch · T query positions · S key positions (T = S) · H query heads · G kv heads (H = G·J)
· K q·k head dim · V value head dim · D max(K, V) · P T padded to the kernel's multiple.

Plain heads. A kernel takes q [B,T,H,K], k [B,S,G,K], v [B,S,G,V], not flash.py's `scores`/`mix`, so each
caller passes `heads(q, kv)` giving them (query head h reads kv head h // J; the context is the
[B,T,H,V] `mix` forms). MLA (attention.heads): q = [q_nope, q_rope], k = [k_nope, k_rope broadcast to
every head], K = 192 and V = 128 for V3; the latent cache's prefill (kv_cache): one kv head (MQA) over
[c, k_rope], K = 576, V = 512.

Segments. The kernels take one id per key and use it for the query at the same position too (it is the
same token). Where the caller's ids agree (training: one array for both) nothing changes. Where they do
not (the sampler's prefill: every query segment 1, padding keys 0), a padding query, which sees no key
under `dot`, attends the padding before it instead of `dot`'s uniform average over all keys: no row is
ever fully masked, which neither kernel defines (splash's SegmentIds docstring), and nothing reads
those rows (their keys are masked from every valid query). The tail added to reach a multiple of the
kernel's block is its own segment (-1): its rows see only the tail, valid rows never reach it (causal).

Per shard. Inside a `sharding_context` both kernels run in `shard_map` over the batch (the `batch` rule's
axes) and the heads (`act_heads`': a split that divides both H and G, so every shard's query heads read
its own kv heads; all H when G = 1), the sequence whole: each device attends its own rows and heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import r1jax.parallel.rules as rules_lib
from r1jax.errors import ConfigError

TAIL = -1  # segment id of the rows added to reach the kernel's multiple
CUDNN_DTYPES = ("bfloat16", "float16")  # cuDNN's flash attention (jax's check_layout: fp8 aside)
CUDNN_MAX_HEAD_DIM = 256  # Hopper and later; 128 before (jax's check_is_flash_attention says which at trace)


def platform() -> str:
    """The platform this computation is traced for: the context mesh's devices (compile-only TPU devices
    included), else jax's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def _plain(name, q, kv, heads):
    if heads is None:
        raise ConfigError(f"attention_impl: {name!r} needs the attention's plain heads (q, k, v); this caller "
                          f"passes no `heads` form; use 'chunked'")
    qh, kh, vh = heads(q, kv)
    if qh.shape[2] % kh.shape[2]:
        raise ValueError(f"attention heads: {qh.shape[2]} query heads do not group over {kh.shape[2]} kv heads")
    return qh, kh, vh


def _padded(qh, kh, vh, seg, multiple: int):
    """Rows padded to P, a multiple of `multiple`; the tail in segment TAIL."""
    T = seg.shape[1]
    P = -(-T // multiple) * multiple
    rows = lambda a: jnp.pad(a, [(0, 0), (0, P - T)] + [(0, 0)] * (a.ndim - 2))  # noqa: E731
    return rows(qh), rows(kh), rows(vh), jnp.pad(seg.astype(jnp.int32), [(0, 0), (0, P - T)], constant_values=TAIL)


def _per_shard(body, qh, kh, vh, seg):
    """body(q, k, v, seg) on each device's rows and heads (shard_map) inside a sharding_context, else
    once over everything."""
    sizes = rules_lib.active_sizes()
    if not sizes:
        return body(qh, kh, vh, seg)
    (B, T, H, _), G = qh.shape, kh.shape[2]
    split = H if G == 1 else math.gcd(H, G)
    rows, _, head_axes, _ = rules_lib.resolve(("batch", None, "act_heads", None), (B, T, split, 1),
                                              rules_lib.active_rules(), sizes)
    q_spec = rules_lib.to_spec([rows, (), head_axes, ()])
    kv_spec = rules_lib.to_spec([rows, (), head_axes if G > 1 else (), ()])
    # check_vma off: pallas_call and cuDNN's custom call carry no varying-axes types.
    return jax.shard_map(body, in_specs=(q_spec, kv_spec, kv_spec, rules_lib.to_spec([rows, ()])),
                         out_specs=q_spec, check_vma=False)(qh, kh, vh, seg)


# --------------------------------------------------------------------------- splash (TPU)


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    """jax's splash MHA for `heads` query heads over `length` rows, causal (the segment mask is dynamic).
    Built at each trace: its block tables become the trace's constants (jax caches the numpy work)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    mask = sa.MultiHeadMask([sa.CausalMask((length, length))] * heads)  # one mask: stored once
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def splash(q, kv, scores, mix, q_segment_ids, kv_segment_ids, scale: float, *, heads=None, block: int = 512,
           interpret: bool = False):
    """`chunked`'s attention by jax's Pallas splash kernel (TPU): blocks of `block` rows (a multiple of 128,
    the lane width; shorter sequences take one block of T rounded up to 128), fp32 softmax statistics,
    its own FlashAttention-style backward. K ≠ V runs as is: the installed kernel sizes v's blocks by V.
    `interpret` runs the kernel in Pallas' interpreter (any platform; tests). -> [B,T,H,V] in v's dtype."""
    del scores, mix, q_segment_ids  # the queries take their key's segment (module docstring)
    where = platform()
    if where != "tpu" and not interpret:
        raise ConfigError(f"attention_impl: 'splash' is a Pallas TPU kernel; this computation is for {where} "
                          f"(use 'auto': splash on TPU, chunked elsewhere)")
    if block % 128:
        raise ValueError(f"splash: block must be a multiple of 128 (the TPU lane width), got {block}")
    qh, kh, vh = _plain("splash", q, kv, heads)
    T = qh.shape[1]
    block = min(block, -(-T // 128) * 128)
    # The kernel has no scale argument: it goes into q, in q's dtype (as MaxText does).
    qh = (qh * jnp.asarray(scale, qh.dtype)).astype(qh.dtype)

    def body(q, k, v, seg):
        from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

        kernel = _splash_kernel(q.shape[2], q.shape[1], block, interpret)
        heads_major = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731  [b,P,h,·] <-> [b,h,P,·]
        out = jax.vmap(kernel)(heads_major(q), heads_major(k), heads_major(v), segment_ids=SegmentIds(seg, seg))
        return heads_major(out)

    out = _per_shard(body, *_padded(qh, kh, vh, kv_segment_ids, block))
    return out[:, :T].astype(vh.dtype)


# --------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_unsupported(where: str, dtype, qk_dim: int, v_dim: int) -> str | None:
    """Why cuDNN's flash attention does not apply, or None. The GPU generation's limits (head dim 128
    before Hopper, cuDNN ≥ 9.10 for K ≠ V) are jax's own checks, raised at trace time."""
    if where != "gpu":
        return f"cuDNN's flash attention runs on NVIDIA GPUs; this computation is for {where}"
    if jnp.dtype(dtype).name not in CUDNN_DTYPES:
        return f"cuDNN's flash attention takes {' or '.join(CUDNN_DTYPES)}; the activations are {jnp.dtype(dtype).name}"
    d = max(qk_dim, v_dim)
    if d > CUDNN_MAX_HEAD_DIM or d % 8:
        return (f"cuDNN's flash attention takes head dims up to {CUDNN_MAX_HEAD_DIM}, multiples of 8; this "
                f"attention's is {d} (q·k {qk_dim}, v {v_dim})")
    return None


def cudnn(q, kv, scores, mix, q_segment_ids, kv_segment_ids, scale: float, *, heads=None,
          implementation: str = "cudnn"):
    """`chunked`'s attention by `jax.nn.dot_product_attention(..., implementation)`: "cudnn" (the table's
    entry) or "xla" (the same layout, mask and scale through XLA; tests). jax.nn takes one head dim for
    q, k and v, so K ≠ V is zero-padded to D (the extra output columns are dropped; zero q·k columns
    add nothing to the scores). The segment mask goes in as a [B,1,T,S] boolean `mask` (cuDNN receives
    it as a bias): jax.nn's `query_seq_lengths` can express one segment per row, not packing.
    Untested on a GPU here. -> [B,T,H,V] in v's dtype."""
    del scores, mix, q_segment_ids  # the queries take their key's segment (module docstring)
    qh, kh, vh = _plain("cudnn", q, kv, heads)
    if implementation == "cudnn":
        reason = cudnn_unsupported(platform(), qh.dtype, qh.shape[-1], vh.shape[-1])
        if reason:
            raise ConfigError(f"attention_impl: 'cudnn' does not apply: {reason} (use 'auto': cudnn where it "
                              f"applies, chunked elsewhere)")
    T, K, V = qh.shape[1], qh.shape[-1], vh.shape[-1]
    D = max(K, V)
    wide = lambda a: jnp.pad(a, [(0, 0)] * 3 + [(0, D - a.shape[-1])])  # noqa: E731

    def body(q, k, v, seg):
        same = (seg[:, :, None] == seg[:, None, :])[:, None]  # [b,1,P,P]; causal is is_causal's
        try:
            out = jax.nn.dot_product_attention(wide(q), wide(k), wide(v), mask=same, scale=scale, is_causal=True,
                                               implementation=implementation)
        except (NotImplementedError, RuntimeError) as e:  # jax's cuDNN checks: GPU generation, cuDNN version
            raise ConfigError(f"attention_impl: 'cudnn' does not apply: {e} (use 'auto' or 'chunked')") from None
        return out[..., :V]

    # cuDNN with a bias needs even lengths in training; the tail pads T to one.
    out = _per_shard(body, *_padded(qh, kh, vh, kv_segment_ids, 2))
    return out[:, :T].astype(vh.dtype)
