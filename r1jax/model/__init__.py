"""The model as pure functions over a params pytree, for either architecture (`arch.architecture(cfg)`):
DeepSeek-V3/V2 (`transformer`, configured by a ModelConfig) or a dense R1-Distill student (`dense`, a
DenseConfig). Both keep one contract, so callers (losses, GRPO, the sampler, the API) pass the config
and need not know which: `apply` -> {"logits", "moe"}, `hidden` -> (h before the final norm, MoE stats
or None), `head`, `lm_head_weight`.

Inside the package, modules import each other by full module path (`import r1jax.model.rope as rope`),
never through this package, which imports them.
"""

from __future__ import annotations

import functools

import jax

import r1jax.model.dense as dense
import r1jax.model.transformer as transformer
from r1jax.model.arch import architecture as _arch
from r1jax.model.decoder import head, lm_head_weight

# Architecture name (arch.py) -> the module that runs it: apply, hidden, block, and mtp where it has one.
IMPLEMENTATIONS = {"deepseek": transformer, "dense": dense}


def architecture(cfg):
    """The module that implements cfg's architecture: `transformer` or `dense`."""
    return IMPLEMENTATIONS[_arch(cfg).name]


def apply(params: dict, tokens: jax.Array, cfg, positions=None, segment_ids=None, with_mtp: bool = False,
          logits: bool = True) -> dict:
    """tokens [B,T] -> {"logits" [B,T,V] f32, "moe": stats or None, and the MTP outputs with_mtp};
    `logits=False`: the states the heads would project ("hidden", "mtp_hidden") instead of logits."""
    return architecture(cfg).apply(params, tokens, cfg, positions, segment_ids, with_mtp=with_mtp, logits=logits)


def hidden(params: dict, tokens: jax.Array, cfg, positions=None, segment_ids=None):
    """Every layer, before the final norm. -> h [B,T,D], MoE stats (None for a dense model)."""
    return architecture(cfg).hidden(params, tokens, cfg, positions, segment_ids)


@functools.partial(jax.jit, static_argnames="cfg")
def forward_jit(params, tokens, cfg, positions=None, segment_ids=None):
    """Jitted logits [B,T,V] f32 of either architecture."""
    return apply(params, tokens, cfg, positions, segment_ids)["logits"]


__all__ = ["IMPLEMENTATIONS", "apply", "architecture", "forward_jit", "head", "hidden", "lm_head_weight"]
