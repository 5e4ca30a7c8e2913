"""DeepSeek-V3/V2: MLA layers (`decoder.layer` with `attention.attend`), dense then MoE layer stacks
(each a `jax.lax.scan`), final norm, head, and the multi-token prediction modules (V3 §2.2).

Legend: B batch · T positions · D model · V vocab · E routed experts · M MTP depth.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import r1jax.model.attention as attention
import r1jax.model.decoder as decoder
import r1jax.model.moe as moe
from r1jax.config import ModelConfig
from r1jax.model.decoder import default_inputs, embed, head, lm_head_weight
from r1jax.model.layers import cast_tree, rms_norm, swiglu


def _no_moe_stats(cfg: ModelConfig) -> dict:
    return {"load": jnp.zeros((cfg.n_routed_experts,), jnp.float32), "dropped": jnp.int32(0),
            "balance_loss": jnp.float32(0.0)}


def ffn(is_moe: bool, segment_ids, cfg: ModelConfig):
    """The layer's FFN for `decoder.layer`: (mlp params, x) -> (y, MoE stats; zeros for a dense FFN)."""
    if is_moe:
        return lambda p, x: moe.apply(p, x, segment_ids, cfg)
    return lambda p, x: (swiglu(p, x), _no_moe_stats(cfg))


def block(p: dict, h: jax.Array, positions, segment_ids, cfg: ModelConfig, is_moe: bool):
    """One decoder layer (docs/deepseek_v3.md §2) with MLA over the whole sequence. h [B,T,D] -> h [B,T,D],
    MoE stats."""
    attend = lambda pa, x: (attention.attend(pa, x, positions, segment_ids, cfg), None)  # noqa: E731
    h, _, stats = decoder.layer(p, h, cfg, attend, ffn(is_moe, segment_ids, cfg))
    return h, stats


def hidden(params: dict, tokens: jax.Array, cfg: ModelConfig, positions=None, segment_ids=None):
    """Embedding, the dense then the MoE layers, before the final norm. -> h [B,T,D], stats (per MoE
    layer; None without MoE layers)."""
    positions, segment_ids = default_inputs(tokens, positions, segment_ids)
    layer = lambda p, h, is_moe: block(p, h, positions, segment_ids, cfg, is_moe)  # noqa: E731
    return decoder.stack(params, embed(params, tokens, cfg), cfg, layer)


def mtp_targets(tokens: jax.Array, segment_ids: jax.Array, depth: int):
    """For module k = 1..depth at position i: input token t[i+k], target t[i+k+1], and whether both
    exist in the same segment. -> inputs, targets, mask, each [M,B,T]."""
    B, T = tokens.shape
    inputs, targets, masks = [], [], []
    idx = jnp.arange(T)
    for k in range(1, depth + 1):
        src, tgt = idx + k, idx + k + 1
        ok = tgt < T
        take = lambda a, j: jnp.take(a, jnp.minimum(j, T - 1), axis=1)
        same = (take(segment_ids, tgt) == segment_ids) & (take(segment_ids, src) == segment_ids)
        inputs.append(take(tokens, src))
        targets.append(take(tokens, tgt))
        masks.append(ok[None, :] & same & (segment_ids > 0))
    return jnp.stack(inputs), jnp.stack(targets), jnp.stack(masks)


def mtp(params: dict, h_main: jax.Array, tokens, positions, segment_ids, cfg: ModelConfig, logits: bool = True):
    """Multi-token prediction (V3 §2.2, docs/deepseek_v3.md §6). h_main [B,T,D] (pre final norm) ->
    logits [M,B,T,V] f32 for token t[i+k+1] (with `logits=False` each module's h [M,B,T,D] before its
    head), targets [M,B,T], mask [M,B,T], stats per module."""
    inputs, targets, mask = mtp_targets(tokens, segment_ids, cfg.num_nextn_predict_layers)

    def body(h_prev, xs):
        p, tok = xs
        pc = cast_tree(p, jnp.dtype(cfg.dtype))
        e = rms_norm(pc["enorm"], embed(params, tok, cfg), cfg.rms_norm_eps)
        hp = rms_norm(pc["hnorm"], h_prev, cfg.rms_norm_eps)
        x = jnp.einsum("BTC,CD->BTD", jnp.concatenate([e, hp], axis=-1), pc["eh_proj"])
        h, stats = block(p, x, positions, segment_ids, cfg, cfg.mtp_is_moe)
        return h, (head(pc["head"], pc["head_norm"], h, cfg) if logits else h, stats)

    _, (out, stats) = jax.lax.scan(body, h_main, (params["mtp"], inputs))
    return out, targets, mask, stats


def apply(params: dict, tokens: jax.Array, cfg: ModelConfig, positions=None, segment_ids=None,
          with_mtp: bool = False, logits: bool = True) -> dict:
    """Full model. tokens [B,T] -> {"logits" [B,T,V] f32, "moe": stats per MoE layer or None,
    and with_mtp: "mtp_logits", "mtp_targets", "mtp_mask", "mtp_moe"}. With `logits=False` the states
    the heads would project ("hidden" [B,T,D], "mtp_hidden" [M,B,T,D]) replace the logits, for a loss
    that projects them a chunk at a time (`train/losses.py` head_cross_entropy)."""
    positions, segment_ids = default_inputs(tokens, positions, segment_ids)
    h, stats = hidden(params, tokens, cfg, positions, segment_ids)
    out = {"moe": stats}
    out.update({"logits": head(lm_head_weight(params), params["final_norm"], h, cfg)} if logits else {"hidden": h})
    if with_mtp and "mtp" in params:
        y, targets, mask, mtp_stats = mtp(params, h, tokens, positions, segment_ids, cfg, logits)
        out.update({"mtp_logits" if logits else "mtp_hidden": y}, mtp_targets=targets, mtp_mask=mask,
                   mtp_moe=mtp_stats)
    return out


@functools.partial(jax.jit, static_argnames="cfg")
def forward_jit(params, tokens, cfg: ModelConfig, positions=None, segment_ids=None):
    return apply(params, tokens, cfg, positions, segment_ids)["logits"]
