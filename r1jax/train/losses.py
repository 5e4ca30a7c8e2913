"""Training losses: masked next-token cross-entropy, the MTP loss (V3 §2.2), and the complementary
sequence-wise balance loss (V3 §2.1.2).

Legend: B batch · T positions · V vocab · M MTP depth · L MoE layers · E routed experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax import model
from r1jax.model.layers import cast_tree


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed token CE and token count. logits [...,V] (any float), targets/mask [...]."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum((lse - picked) * mask), jnp.sum(mask)


def head_cross_entropy(w: jax.Array, norm_w: jax.Array, h: jax.Array, targets: jax.Array, mask: jax.Array,
                       cfg, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`cross_entropy(model.head(w, norm_w, h, cfg), targets, mask)` with the logits made `chunk`
    positions at a time under jax.checkpoint, forward and backward: [B,chunk,V] at once, never
    [B,T,V] (12.7 GB per chip for V3's 129k vocabulary at T = 4096 with the MTP head). h [B,T,D]."""
    B, T, _ = h.shape
    pad = (-T) % chunk
    h, targets, mask = (jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)) for a in (h, targets, mask))
    split = lambda a: jnp.moveaxis(a.reshape((B, -1, chunk) + a.shape[2:]), 1, 0)  # noqa: E731

    @jax.checkpoint
    def one(xs):
        hc, tc, mc = xs
        return cross_entropy(model.head(w, norm_w, hc, cfg), tc, mc)

    sums, counts = jax.lax.map(one, (split(h), split(targets), split(mask)))
    return sums.sum(), counts.sum()


def _mtp_loss_mask(out: dict, loss_mask: jax.Array) -> jax.Array:
    """Depth k at position i predicts token i+k+1, i.e. the target at i+k: train it only where the
    main loss would (assistant tokens in SFT). -> [M,B,T]."""
    M, _, T = out["mtp_mask"].shape
    idx = jnp.arange(T)
    shifted = jnp.stack([jnp.take(loss_mask, jnp.minimum(idx + k, T - 1), axis=1) for k in range(1, M + 1)])
    valid = (idx[None, None, :] + jnp.arange(1, M + 1)[:, None, None]) < T
    return out["mtp_mask"] & (shifted > 0) & valid


def lm_loss(params: dict, batch: dict, cfg: ModelConfig, *, mtp_weight: float, balance_alpha: float,
            ce_denominator=None, other_scale: float = 1.0, loss_chunk: int = 0):
    """Total loss and its parts for one batch {inputs, targets, segment_ids, positions, loss_mask}.

    total = CE + mtp_weight/M · Σ_k CE_k + balance_alpha · Σ_layers L_bal
    Returns (total, aux) where aux holds the parts, token counts and the per-layer MoE stats.
    Under gradient accumulation over A micro-batches, `ce_denominator` (the whole step's loss-token
    count) makes the micro-batch CE terms sum to the exact full-batch token mean, and
    `other_scale` = 1/A turns the summed MTP and balance terms into means. `loss_chunk` > 0 projects to
    the vocabulary that many positions at a time (`head_cross_entropy`), the main and the MTP heads.
    """
    with_mtp = mtp_weight > 0 and cfg.num_nextn_predict_layers > 0
    out = model.apply(params, batch["inputs"], cfg, batch["positions"], batch["segment_ids"],
                      with_mtp=with_mtp, logits=not loss_chunk)
    mtp_sums = None
    if loss_chunk:
        ce_sum, n = head_cross_entropy(model.lm_head_weight(params), params["final_norm"], out["hidden"],
                                       batch["targets"], batch["loss_mask"], cfg, loss_chunk)
        if "mtp_hidden" in out:
            mtp_sums = _mtp_chunked(params, out, batch, cfg, loss_chunk)
    else:
        ce_sum, n = cross_entropy(out["logits"], batch["targets"], batch["loss_mask"])
    ce = ce_sum / jnp.maximum(n if ce_denominator is None else ce_denominator, 1.0)
    extra, parts = auxiliary_losses(out, batch, cfg, mtp_weight=mtp_weight, balance_alpha=balance_alpha,
                                    other_scale=other_scale, mtp_sums=mtp_sums)
    total = ce + extra
    aux = {"ce": ce, "tokens": n, **parts, "loss": total}
    return total, aux


def _mtp_chunked(params: dict, out: dict, batch: dict, cfg: ModelConfig, chunk: int):
    """Per-depth (summed CE [M], token count [M]) of the MTP heads, a chunk of positions at a time. Each
    module's head and norm are cast to the compute dtype first, as `transformer.mtp` does for its logits."""
    heads = cast_tree({k: params["mtp"][k] for k in ("head", "head_norm")}, jnp.dtype(cfg.dtype))
    mask = _mtp_loss_mask(out, batch["loss_mask"])
    per_depth = lambda w, n, h, t, m: head_cross_entropy(w, n, h, t, m, cfg, chunk)  # noqa: E731
    return jax.vmap(per_depth)(heads["head"], heads["head_norm"], out["mtp_hidden"], out["mtp_targets"], mask)


def auxiliary_losses(out: dict, batch: dict, cfg: ModelConfig, *, mtp_weight: float, balance_alpha: float,
                     other_scale: float = 1.0, mtp_sums=None):
    """The terms besides the main head's, from `model.apply`'s outputs: the MTP CE (when out holds MTP
    logits, or from `mtp_sums`, the per-depth (CE sums, token counts) of chunked heads) and the balance
    loss (MoE models). -> (other_scale · their weighted sum, aux parts)."""
    total = 0.0
    aux = {}
    moe_stats = [s for s in (out["moe"], out.get("mtp_moe")) if s is not None]
    if "mtp_logits" in out and mtp_sums is None:
        mask = _mtp_loss_mask(out, batch["loss_mask"])
        mtp_sums = jax.vmap(cross_entropy)(out["mtp_logits"], out["mtp_targets"], mask)
    if mtp_sums is not None:
        s, c = mtp_sums
        per_depth = s / jnp.maximum(c, 1.0)
        mtp = jnp.mean(per_depth)
        total = total + other_scale * mtp_weight * mtp
        aux["mtp_ce"] = mtp
    if out["moe"] is not None:
        bal = sum(jnp.sum(st["balance_loss"]) for st in moe_stats)
        total = total + other_scale * balance_alpha * bal
        aux["balance_loss"] = bal
        aux["moe"] = out["moe"]
        if out.get("mtp_moe") is not None and cfg.mtp_is_moe:
            aux["mtp_moe"] = out["mtp_moe"]
    return total, aux
