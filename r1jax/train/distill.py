"""Logit-level distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"):
the student matches the frozen teacher's temperature-softened next-token distribution, optionally
truncated to the teacher's top-k tokens, mixed with the data's cross-entropy:

    loss = alpha · τ²·KL(p_teacher,τ ‖ q_student,τ) + (1 − alpha) · CE(student, targets)

both token means over the loss mask (τ² keeps the KL's gradient scale independent of τ, Hinton §2).
Sequence-level distillation (R1-Distill: SFT on teacher samples) is the plain `sft` stage.

Legend: B batch · T positions · C chunk of positions · N chunks · D model · V vocab · K teacher top-k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from r1jax import model
from r1jax.config import DistillConfig
from r1jax.train import losses


def teacher_distribution(t_logits: jax.Array, *, temperature: float, top_k: int | None):
    """The teacher's log p_τ: [...,V] -> (log-probs [...,V], None), or with top_k the log-probs of its
    top-k tokens renormalised over them [...,K] and their ids [...,K]."""
    z = t_logits.astype(jnp.float32) / temperature
    if top_k is None:
        return jax.nn.log_softmax(z, axis=-1), None
    vals, ids = jax.lax.top_k(z, top_k)
    return jax.nn.log_softmax(vals, axis=-1), ids


def forward_kl(s_logits: jax.Array, t_logits: jax.Array, *, temperature: float, top_k: int | None) -> jax.Array:
    """τ²·KL(p_teacher,τ ‖ q_student,τ) per position: [...,V] each -> [...]. With top_k the sum runs over
    the teacher's top-k ids, p renormalised there and q the student's full softmax at those ids
    (still >= 0: Σ_K q <= 1)."""
    log_p, ids = teacher_distribution(t_logits, temperature=temperature, top_k=top_k)
    log_q = jax.nn.log_softmax(s_logits.astype(jnp.float32) / temperature, axis=-1)
    if ids is not None:
        log_q = jnp.take_along_axis(log_q, ids, axis=-1)
    p = jnp.exp(log_p)
    # 0·log 0 = 0: a teacher token of probability 0 (a -inf logit) adds nothing.
    kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
    return temperature**2 * kl


def token_terms(s_logits: jax.Array, t_logits: jax.Array, targets: jax.Array, mask: jax.Array, *,
                temperature: float, top_k: int | None) -> dict:
    """Masked sums over positions: CE (at τ = 1), τ²·KL, teacher-student top-1 agreement, tokens."""
    ce, n = losses.cross_entropy(s_logits, targets, mask)
    m = mask.astype(jnp.float32)
    kl = forward_kl(s_logits, t_logits, temperature=temperature, top_k=top_k)
    agree = jnp.argmax(s_logits, axis=-1) == jnp.argmax(t_logits, axis=-1)
    return {"ce": ce, "kl": jnp.sum(kl * m), "agree": jnp.sum(agree * m), "tokens": n}


def mix(ce: jax.Array, kl: jax.Array, alpha: float) -> jax.Array:
    return alpha * kl + (1.0 - alpha) * ce


def token_loss(s_logits: jax.Array, t_logits: jax.Array, targets: jax.Array, mask: jax.Array, *, alpha: float,
               temperature: float, top_k: int | None):
    """The mixed loss on whole logits [...,V] (token means over the mask). -> (loss, aux)."""
    t_logits = jax.lax.stop_gradient(t_logits)
    s = token_terms(s_logits, t_logits, targets, mask, temperature=temperature, top_k=top_k)
    n = jnp.maximum(s["tokens"], 1.0)
    ce, kl = s["ce"] / n, s["kl"] / n
    return mix(ce, kl, alpha), {"ce": ce, "kl": kl, "top1_agreement": s["agree"] / n, "tokens": s["tokens"]}


def teacher_features(teacher_params: dict, batch: dict, teacher_cfg) -> dict:
    """What the loss needs of the frozen teacher: its last hidden states h [B,T,D], head w [D,V] and
    final norm [D]. Call it outside the gradient; nothing of the teacher is kept for a backward pass."""
    h, _ = model.hidden(teacher_params, batch["inputs"], teacher_cfg, batch["positions"], batch["segment_ids"])
    feats = {"h": h, "w": model.lm_head_weight(teacher_params), "norm": teacher_params["final_norm"]}
    return jax.lax.stop_gradient(feats)


def chunked_terms(params: dict, h: jax.Array, teacher: dict, targets: jax.Array, mask: jax.Array, cfg,
                  teacher_cfg, *, temperature: float, top_k: int | None, chunk: int) -> dict:
    """token_terms summed over positions, C at a time: both models' logits exist one [B,C,V] chunk at a
    time, forward and backward (jax.checkpoint recomputes a chunk's logits for its gradient)."""
    B, T = targets.shape
    C = min(chunk, T)
    pad = (-T) % C
    w, norm = model.lm_head_weight(params), params["final_norm"]

    def split(x):  # [B,T,...] -> [N,B,C,...]; padded positions have mask 0
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape((B, -1, C) + x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(xs):
        hc, thc, tc, mc = xs
        s_logits = model.head(w, norm, hc, cfg)
        t_logits = model.head(teacher["w"], teacher["norm"], thc, teacher_cfg)
        return token_terms(s_logits, t_logits, tc, mc, temperature=temperature, top_k=top_k)

    parts = jax.lax.map(one, (split(h), split(teacher["h"]), split(targets), split(mask)))
    return jax.tree.map(lambda x: jnp.sum(x, axis=0), parts)


def distill_loss(params: dict, batch: dict, teacher: dict, cfg, teacher_cfg, dcfg: DistillConfig, *,
                 mtp_weight: float, balance_alpha: float, ce_denominator=None, other_scale: float = 1.0):
    """The student's loss on one batch given `teacher_features`: the mixed KL/CE of the main head plus
    the student's own MTP and balance terms (as `losses.lm_loss`; MTP trains on the data's tokens).
    `ce_denominator`/`other_scale` as in lm_loss (gradient accumulation). -> (total, aux)."""
    tokens, positions, segment_ids = batch["inputs"], batch["positions"], batch["segment_ids"]
    h, stats = model.hidden(params, tokens, cfg, positions, segment_ids)
    s = chunked_terms(params, h, teacher, batch["targets"], batch["loss_mask"], cfg, teacher_cfg,
                      temperature=dcfg.temperature, top_k=dcfg.top_k, chunk=dcfg.logit_chunk)
    n = jnp.maximum(s["tokens"] if ce_denominator is None else ce_denominator, 1.0)
    ce, kl = s["ce"] / n, s["kl"] / n
    aux = {"ce": ce, "kl": kl, "top1_agreement": s["agree"] / n, "tokens": s["tokens"]}
    out = {"moe": stats}
    if mtp_weight > 0 and cfg.num_nextn_predict_layers > 0 and "mtp" in params:
        mtp = model.architecture(cfg).mtp(params, h, tokens, positions, segment_ids, cfg)
        out.update(zip(("mtp_logits", "mtp_targets", "mtp_mask", "mtp_moe"), mtp))
    extra, parts = losses.auxiliary_losses(out, batch, cfg, mtp_weight=mtp_weight, balance_alpha=balance_alpha,
                                           other_scale=other_scale)
    total = mix(ce, kl, dcfg.alpha) + extra
    aux.update(parts)
    aux["loss"] = total
    return total, aux
