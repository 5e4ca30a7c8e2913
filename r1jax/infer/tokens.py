"""Token choice for the sampler: greedy or temperature sampling with top-k then top-p truncation, and the
per-row random keys that make a row's sample independent of the rest of its batch.

Legend: B batch · W vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def truncate_logits(scaled: jax.Array, top_p, top_k) -> jax.Array:
    """Mask to -inf what top-k then top-p remove. scaled [B,W] (already divided by temperature).

    Order as in transformers: top-k first (top_k = 0 keeps all; ties with the k-th value are kept),
    then top-p on the renormalized survivors: keep the smallest prefix of tokens sorted by
    probability whose mass reaches top_p (a token is kept if the mass before it is < top_p).
    """
    W = scaled.shape[-1]
    ordered = jnp.sort(scaled, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, W), W)
    ordered = jnp.where(jnp.arange(W) < k, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    # ≥ 1: the first token has 0 mass before it. top_p = 1 means off: fp32 cumulative mass can round
    # to 1 before the tail (dropping tiny tokens) or stay under 1 past the k-th (keeping removed ones).
    kept = jnp.where(top_p < 1, jnp.minimum(jnp.sum(before < top_p, axis=-1, keepdims=True), k), k)
    threshold = jnp.take_along_axis(ordered, kept - 1, axis=-1)
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


def choose_tokens(logits, keys, temperature, top_p, top_k, *, greedy: bool, truncate: bool):
    """Pick one token per row. logits [B,W] f32, keys [B] -> tokens [B] i32, logprobs [B] f32.

    The log-prob is log_softmax(logits / temperature) at the chosen token (plain log_softmax when
    greedy), taken before top-p/top-k truncation: it is the policy's probability, which GRPO
    recomputes with the same temperature.
    """
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
    else:
        scaled = logits / temperature
        logp = jax.nn.log_softmax(scaled, axis=-1)
        masked = truncate_logits(scaled, top_p, top_k) if truncate else scaled
        tokens = jax.vmap(jax.random.categorical)(keys, masked)
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def step_keys(row_keys, step):
    """Row keys [B] -> the keys of decode step `step` [B]."""
    return jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
