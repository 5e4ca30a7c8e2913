"""The model as pure functions over a params pytree, for either architecture: DeepSeek-V3/V2
(`transformer`, configured by a ModelConfig) or a dense R1-Distill student (`dense`, a DenseConfig).
Both keep one contract, so callers (losses, GRPO, the sampler, the API) pass the config and need not
know which: `apply` -> {"logits", "moe"}, `hidden` -> (h before the final norm, MoE stats or None),
`head`, `lm_head_weight`."""

from __future__ import annotations

import functools

import jax

from r1jax.config import DenseConfig


def architecture(cfg):
    """The module that implements cfg's architecture: `dense` for a DenseConfig, else `transformer`."""
    # Imported on use: params.py and parallel/rules.py import this package, and the model imports them.
    from r1jax.model import dense, transformer

    return dense if isinstance(cfg, DenseConfig) else transformer


def apply(params: dict, tokens: jax.Array, cfg, positions=None, segment_ids=None, with_mtp: bool = False) -> dict:
    """tokens [B,T] -> {"logits" [B,T,V] f32, "moe": stats or None, and the MTP outputs with_mtp}."""
    return architecture(cfg).apply(params, tokens, cfg, positions, segment_ids, with_mtp=with_mtp)


def hidden(params: dict, tokens: jax.Array, cfg, positions=None, segment_ids=None):
    """Every layer, before the final norm. -> h [B,T,D], MoE stats (None for a dense model)."""
    return architecture(cfg).hidden(params, tokens, cfg, positions, segment_ids)


def head(w: jax.Array, norm_w: jax.Array, h: jax.Array, cfg) -> jax.Array:
    """Final norm + projection to the vocabulary (the same for both). h [B,T,D] -> logits [B,T,V] f32."""
    from r1jax.model import transformer

    return transformer.head(w, norm_w, h, cfg)


def lm_head_weight(params: dict) -> jax.Array:
    """[D,V]: the head, or the transposed embedding when tied."""
    from r1jax.model import transformer

    return transformer.lm_head_weight(params)


@functools.partial(jax.jit, static_argnames="cfg")
def forward_jit(params, tokens, cfg, positions=None, segment_ids=None):
    """Jitted logits [B,T,V] f32 of either architecture."""
    return apply(params, tokens, cfg, positions, segment_ids)["logits"]
