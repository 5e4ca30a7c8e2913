"""GRPO: group-relative advantages, chunked token log-probs and the clipped policy loss with a k3
KL penalty (DeepSeekMath §4.1; R1; DAPO and Dr.GRPO options). Facts: docs/grpo.md.

Legend: N completions (P prompts × G) · T sequence positions · C chunk of positions · D model
· V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from r1jax.config import GRPOConfig, ModelConfig
from r1jax import model

LOG_RATIO_CLAMP = 20.0  # keeps exp() finite when policies drift far apart


def advantages(rewards: jax.Array, valid: jax.Array, *, scale: str, eps: float) -> jax.Array:
    """Group-centred rewards. rewards, valid [P,G] -> [P,G]. Invalid samples (total reward None) take
    no part in the statistics and get advantage 0. `scale`: "group" divides by each group's std (GRPO),
    "batch" by the std of every valid reward of the rollout (TRL's `scale_rewards: batch`), "none" not
    at all (Dr.GRPO). Stds use Bessel's correction; a std of fewer than two rewards counts as 0."""
    v = valid.astype(rewards.dtype)
    n = v.sum(-1, keepdims=True)
    mean = (rewards * v).sum(-1, keepdims=True) / jnp.maximum(n, 1.0)
    centred = (rewards - mean) * v
    if scale == "none":
        return centred
    if scale == "group":
        std = jnp.sqrt((centred ** 2).sum(-1, keepdims=True) / jnp.maximum(n - 1.0, 1.0))
    elif scale == "batch":
        nb = v.sum()
        dev = (rewards - (rewards * v).sum() / jnp.maximum(nb, 1.0)) * v
        std = jnp.sqrt((dev ** 2).sum() / jnp.maximum(nb - 1.0, 1.0))
    else:
        raise ValueError(f"scale_rewards {scale!r}")
    return centred / (std + eps)


def token_logprobs(params: dict, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                   cfg: ModelConfig, *, temperature: float, chunk: int, with_entropy: bool = False):
    """log π(tokens[t+1] | tokens[..t]) / temperature-scaled, for t = 0..T-2 -> [N, T-1]; with
    `with_entropy`, (log-probs, policy entropy per position, the forward's MoE stats or None). Logits are made C positions at a time under jax.checkpoint, so a
    full [N, T, V] block never exists, forward or backward."""
    h, moe_stats = model.hidden(params, tokens, cfg, positions, segment_ids)
    h = h[:, :-1]
    targets = tokens[:, 1:]
    N, T1, D = h.shape
    pad = (-T1) % chunk
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    w = model.lm_head_weight(params)

    @jax.checkpoint
    def one(hc, tc):
        logits = model.head(w, params["final_norm"], hc, cfg) / temperature  # [N,C,V] f32
        lse = jax.nn.logsumexp(logits, axis=-1)
        lp = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0] - lse
        ent = lse - jnp.sum(jax.nn.softmax(logits, -1) * logits, -1) if with_entropy else jnp.zeros_like(lse)
        return lp, ent

    hs = h.reshape(N, -1, chunk, D).transpose(1, 0, 2, 3)
    ts = targets.reshape(N, -1, chunk).transpose(1, 0, 2)
    lp, ent = jax.lax.map(lambda xs: one(*xs), (hs, ts))
    lp = lp.transpose(1, 0, 2).reshape(N, -1)[:, :T1]
    ent = ent.transpose(1, 0, 2).reshape(N, -1)[:, :T1]
    return (lp, ent, moe_stats) if with_entropy else lp


def policy_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None, adv: jax.Array,
                mask: jax.Array, *, epsilon_low: float, epsilon_high: float, beta: float,
                aggregation: str, max_len: int, rows=None, tokens=None, importance_sampling_level: str = "token",
                delta: float | None = None, use_bias_correction_kl: bool = False):
    """Per-token ℓ = −min(w·Â, clip(r, 1−ε_low, 1+ε_high)·Â) + β·k3, aggregated; w = min(r, δ) with
    `delta` (two-sided clip), else r. r is the token's ratio π/π_old, or with importance_sampling_level
    "sequence" the geometric mean of the row's ratios (GSPO); with `use_bias_correction_kl` the k3 term
    is weighted by r (unclipped). Formulas and TRL's names: docs/grpo.md.

    logp/old_logp/ref_logp/mask [N, L] over completion tokens, adv [N]; `rows`/`tokens`: the aggregation's
    normalisers (see `aggregate`; default this batch's). -> (loss, metrics).
    """
    mask = mask.astype(logp.dtype)
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0))[:, None]
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level {importance_sampling_level!r}")
    ratio = jnp.exp(log_ratio)
    a = adv[:, None]
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high) * a
    unclipped = (ratio if delta is None else jnp.minimum(ratio, delta)) * a
    per_token = -jnp.minimum(unclipped, clipped)
    kl = jnp.zeros_like(logp)
    if beta > 0:
        d = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        kl = jnp.exp(d) - d - 1  # k3: unbiased, ≥ 0
        per_token = per_token + beta * (kl * ratio if use_bias_correction_kl else kl)
    per_token = jnp.broadcast_to(per_token, mask.shape)
    loss = aggregate(per_token, mask, aggregation, max_len, rows=rows, tokens=tokens)
    n_tok = jnp.maximum(mask.sum(), 1.0)
    is_clipped = ((ratio < 1 - epsilon_low) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
    metrics = {
        "kl": (kl * mask).sum() / n_tok,
        "clip_fraction": (is_clipped * mask).sum() / n_tok,
        "ratio_mean": (ratio * mask).sum() / n_tok,
    }
    return loss, metrics


def aggregate(per_token: jax.Array, mask: jax.Array, how: str, max_len: int, *, rows=None, tokens=None) -> jax.Array:
    """sequence_mean (GRPO): each completion's token mean, summed, / rows; token_mean (DAPO): the summed
    token losses / tokens; fixed_length (Dr.GRPO): the summed token losses / (rows · max_len).

    rows defaults to every row, tokens to the batch's unmasked tokens. The update passes the mini-batch's
    completion rows and the rollout's tokens / mini-batches, so that micro-batch losses add up to the
    mini-batch's (and padding rows, all masked, are no completions). A fully masked completion adds 0 to
    the sum but counts in `rows` (as in TRL)."""
    if how == "sequence_mean":
        rows = per_token.shape[0] if rows is None else rows
        per_seq = (per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
        return per_seq.sum() / jnp.maximum(rows, 1)
    if how == "token_mean":
        tokens = mask.sum() if tokens is None else tokens
        return (per_token * mask).sum() / jnp.maximum(tokens, 1.0)
    if how == "fixed_length":
        rows = per_token.shape[0] if rows is None else rows
        return (per_token * mask).sum() / (jnp.maximum(rows, 1) * max_len)
    raise ValueError(f"loss_aggregation {how!r}")


def completion_logprobs(params, batch: dict, cfg: ModelConfig, gcfg: GRPOConfig, with_entropy=False):
    """Log-probs of the completion tokens only: batch holds tokens [N, Lp+Lc] (prompt left-padded
    to Lp, completion after), positions, segment_ids. -> [N, Lc] (+ entropy)."""
    out = token_logprobs(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg,
                         temperature=gcfg.temperature, chunk=gcfg.logprob_chunk, with_entropy=with_entropy)
    lp_start = batch["tokens"].shape[1] - batch["completion_mask"].shape[1] - 1
    if with_entropy:
        return out[0][:, lp_start:], out[1][:, lp_start:], out[2]
    return out[:, lp_start:]


def loss_fn(params, batch: dict, cfg: ModelConfig, gcfg: GRPOConfig, rows=None, tokens=None):
    """The GRPO objective on a rollout (micro-)batch {tokens, positions, segment_ids, completion_mask,
    advantages} with optional old_logp and ref_logp; rows/tokens: the normalisers (see `aggregate`)."""
    logp, ent, moe_stats = completion_logprobs(params, batch, cfg, gcfg, with_entropy=True)
    # Without old_logp (one policy update per rollout) π_old is these very params, so its log-probs are
    # this forward's, detached: the same loss and gradient without a second forward pass (TRL does the same).
    old_logp = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
    loss, metrics = policy_loss(
        logp, old_logp, batch.get("ref_logp"), batch["advantages"], batch["completion_mask"],
        epsilon_low=gcfg.epsilon_low, epsilon_high=gcfg.epsilon_high, beta=gcfg.beta,
        aggregation=gcfg.loss_aggregation, max_len=gcfg.max_new_tokens, rows=rows, tokens=tokens,
        importance_sampling_level=gcfg.importance_sampling_level, delta=gcfg.delta,
        use_bias_correction_kl=gcfg.use_bias_correction_kl)
    m = batch["completion_mask"].astype(jnp.float32)
    metrics["entropy"] = jax.lax.stop_gradient((ent * m).sum() / jnp.maximum(m.sum(), 1.0))
    metrics["loss"] = loss
    if moe_stats is not None:  # per-expert load, for the aux-loss-free bias update (not a metric)
        metrics["moe_load"] = jax.lax.stop_gradient(moe_stats["load"])
    return loss, metrics


@functools.partial(jax.jit, static_argnames=("cfg", "gcfg"))
def rollout_logprobs(params, batch, cfg: ModelConfig, gcfg: GRPOConfig):
    return completion_logprobs(params, batch, cfg, gcfg)
