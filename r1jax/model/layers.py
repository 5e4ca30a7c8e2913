"""Small building blocks shared by attention, MoE and the layer stack.

Legend: B batch · T positions · D model · F ffn hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(w: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in fp32; the normalized value is cast back to x's dtype before the weight (docs/deepseek_v3.md §2)."""
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * normed.astype(x.dtype)


def swiglu(p: dict, x: jax.Array) -> jax.Array:
    """down(silu(gate(x)) * up(x)). x [..., D] -> [..., D]."""
    gate = jnp.einsum("...D,DF->...F", x, p["gate"].astype(x.dtype))
    up = jnp.einsum("...D,DF->...F", x, p["up"].astype(x.dtype))
    return jnp.einsum("...F,FD->...D", jax.nn.silu(gate) * up, p["down"].astype(x.dtype))


# The router runs in fp32 whatever the compute dtype (docs/deepseek_v3.md §10): its weights are never down-cast.
KEEP_FP32 = frozenset({"router", "router_bias"})


def cast_tree(tree, dtype):
    """Cast floating leaves to the compute dtype, except the fp32 router."""
    def cast(path, a):
        if getattr(path[-1], "key", None) in KEEP_FP32 or not jnp.issubdtype(a.dtype, jnp.floating):
            return a
        return a.astype(dtype)

    return jax.tree_util.tree_map_with_path(cast, tree)
