"""Model FLOPs per token and the machine's measured matmul rate, for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from r1jax.config import ModelConfig
from r1jax.model.params import count_params


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6·(weights one token is multiplied by) + 6·(attention layers)·H·(K+V)·T for QKᵀ and AV over a
    row of T positions (PaLM appendix B; no causal halving). The input embedding is a lookup, not a
    matmul: it is left out unless tied to the output head. The MTP modules run a whole block each, so
    their attention counts too."""
    active = count_params(cfg, active=True)
    if not cfg.tie_word_embeddings:
        active -= cfg.vocab_size * cfg.hidden_size
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    attn = 6 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len
    return 6.0 * active + attn


def measured_matmul_flops(n: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Best observed FLOP/s of one n×n×n matmul on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best
