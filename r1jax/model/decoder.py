"""The decoder both architectures share: embedding, one pre-norm decoder layer, a scanned stack of
them, final norm and head. Training, prefill and decode all run `layer`; what differs is passed in:
the attention (training attention over the whole sequence, or attention over a KV cache that also
returns the new cache entries) and the FFN (SwiGLU, or the MoE with its load statistics), as
DeepSeek's `Block.forward` takes its `attn` and `ffn`.

Legend: B batch · T positions · D model · V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import RematPolicy, check_names
from r1jax.model.arch import architecture
from r1jax.model.kernels import platform
from r1jax.model.layers import cast_tree, rms_norm, swiglu
from r1jax.parallel.rules import constrain

# Logical names of the residual stream and of the logits (sharding constraints; no-ops without a mesh).
HIDDEN = ("batch", "length", "act_embed")
LOGITS = ("batch", "length", "act_vocab")

# remat_policy name -> jax.checkpoint policy (None = no rematerialization).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
check_names(REMAT_POLICIES, RematPolicy, "remat_policy")


def layer(p: dict, h: jax.Array, cfg, attend, ffn, hidden_axes=HIDDEN):
    """One decoder layer (docs/deepseek_v3.md §2): h + attn(norm(h)), then + ffn(norm(·)). h [B,T,D] -> h [B,T,D],
    what `attend` returned besides its output (new cache entries, or None), what `ffn` did (MoE stats,
    or None).

    attend(attn params, x [B,T,D]) -> (y [B,T,D], extra); ffn(mlp params, x [B,T,D]) -> (y, extra).
    The residual stream is constrained to `hidden_axes` at the layer's boundaries (None: left alone,
    as the sampler's is)."""
    boundary = (lambda x: constrain(x, hidden_axes)) if hidden_axes else (lambda x: x)
    p = cast_tree(p, jnp.dtype(cfg.dtype))
    h = boundary(h)
    a, entries = attend(p["attn"], rms_norm(p["input_norm"], h, cfg.rms_norm_eps))
    h = h + a
    y, stats = ffn(p["mlp"], rms_norm(p["post_attn_norm"], h, cfg.rms_norm_eps))
    return boundary(h + y), entries, stats


def dense_ffn(p: dict, x: jax.Array):
    """SwiGLU as a layer's FFN: -> (y, None: no MoE statistics)."""
    return swiglu(p, x), None


# layer_loop "auto" -> unrolled on these platforms, scanned elsewhere. Empty for now: unrolled CPU
# training steps measured 9-12% faster (benchmarks/README.md, "Defaults per backend"), but they change
# XLA's fusion and so the rounding, and two whole-suite runs on 2026-12-02 had an XLA:CPU compile crash
# (SIGSEGV, not reproduced alone) in workers compiling them; `layer_loop: unroll` stays available.
UNROLL_ON: tuple[str, ...] = ()


def unrolled(cfg) -> bool:
    """Whether cfg's layer stacks are unrolled on the platform being traced for."""
    return cfg.layer_loop == "unroll" or (cfg.layer_loop == "auto" and platform() in UNROLL_ON)


def scan(body, h: jax.Array, xs, remat_policy: str = "none", unroll: bool = False):
    """`jax.lax.scan(body, h, xs)` over a stack's leading layer axis; under a remat policy each layer's
    activations are recomputed in the backward pass (what the policy saves is kept). `unroll` compiles
    every layer in line (the same math)."""
    if remat_policy != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
    return jax.lax.scan(body, h, xs, unroll=unroll)


def stack(params: dict, h: jax.Array, cfg, block):
    """Every decoder group of cfg's architecture in order (`arch` layout), each scanned over its stacked
    layers. block(layer params, h, is_moe) -> (h, stats or None) runs one layer. h [B,T,D] embedded ->
    h [B,T,D] before the final norm, the MoE group's stats stacked per layer (None without one)."""
    stats = None
    for name, group in architecture(cfg).decoder_groups(cfg).items():
        def body(carry, p, is_moe=group.moe):
            return block(p, carry, is_moe)

        h, out = scan(body, h, params[name], cfg.remat_policy, unrolled(cfg))
        if group.moe:
            stats = out
    return h, stats


def embed(params: dict, tokens: jax.Array, cfg) -> jax.Array:
    # Gather the table's FSDP-split model dim first (its gradient is then reduce-scattered), so the
    # lookup's rows follow the tokens' batch split rather than the table's.
    table = constrain(params["embed"], ("vocab", None))
    return constrain(jnp.take(table, tokens, axis=0).astype(jnp.dtype(cfg.dtype)), HIDDEN)


def head(w: jax.Array, norm_w: jax.Array, h: jax.Array, cfg) -> jax.Array:
    """Final norm + projection to the vocabulary. h [B,T,D] -> logits [B,T,V] float32."""
    x = rms_norm(norm_w, h, cfg.rms_norm_eps)
    return constrain(jnp.einsum("BTD,DV->BTV", x, w.astype(x.dtype), preferred_element_type=jnp.float32), LOGITS)


def lm_head_weight(params: dict) -> jax.Array:
    """[D,V]: the head, or the transposed embedding when tied."""
    return params["lm_head"] if "lm_head" in params else params["embed"].T


def default_inputs(tokens: jax.Array, positions=None, segment_ids=None):
    """Positions 0..T-1 and one segment per row, where not given."""
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    return positions, segment_ids
