"""DeepSeekMoE: shared experts + fine-grained routed experts (V2 §2.2, V3 §2.1.2).

Legend: B batch · T positions · N tokens (B·T) · D model · E routed experts · k experts per token
· G expert groups · F expert ffn hidden · C capacity per expert · S segments · M token copies (N·k)
· K blocks · R rows per block.

`route` picks experts; a dispatch strategy from `DISPATCH` runs them (`moe_dispatch: auto`, the
default, takes the one measured fastest among the dropless strategies on the backend it is traced
for: `AUTO_DISPATCH`); `apply` adds the shared experts and returns load statistics for balancing.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

import r1jax.model.experts as experts
from r1jax.model.kernels import platform
from r1jax.config import ModelConfig, MoeDispatch, check_names
from r1jax.model.layers import swiglu


# --------------------------------------------------------------------------- routing


def _group_mask(scores: jax.Array, cfg: ModelConfig, group_score) -> jax.Array:
    """Keep the topk_group best groups: scores [N,E] -> bool [N,E]."""
    N, E = scores.shape
    grouped = scores.reshape(N, cfg.n_group, E // cfg.n_group)
    _, best = jax.lax.top_k(group_score(grouped), cfg.topk_group)  # [N, topk_group]
    keep = jnp.zeros((N, cfg.n_group), bool).at[jnp.arange(N)[:, None], best].set(True)
    return jnp.repeat(keep, E // cfg.n_group, axis=1)


def route(p: dict, x: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router in fp32. x [N,D] -> weights [N,k] f32, expert ids [N,k] i32, scores [N,E] f32."""
    logits = jnp.einsum("ND,DE->NE", x.astype(jnp.float32), p["router"].astype(jnp.float32))
    k = cfg.num_experts_per_tok
    if cfg.scoring_func == "sigmoid":  # V3: sigmoid gate, bias for selection only (V3 eq. 16)
        scores = jax.nn.sigmoid(logits)
        choice = scores + jax.lax.stop_gradient(p["router_bias"].astype(jnp.float32))
        # Group score = sum of its top-2 biased scores (node-limited routing, V3 §2.1.2).
        keep = _group_mask(choice, cfg, lambda g: jax.lax.top_k(g, 2)[0].sum(-1))
        _, ids = jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), k)
        weights = jnp.take_along_axis(scores, ids, axis=-1)
    else:  # V2: softmax gate
        scores = jax.nn.softmax(logits, axis=-1)
        choice = scores
        if cfg.topk_method == "group_limited_greedy":
            choice = jnp.where(_group_mask(scores, cfg, lambda g: g.max(-1)), scores, 0.0)
        weights, ids = jax.lax.top_k(choice, k)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids.astype(jnp.int32), scores


# --------------------------------------------------------------------------- dispatch strategies
# Each: (experts params, x [N,D], weights [N,k], ids [N,k], cfg) -> (y [N,D] f32, dropped i32).
# `ragged` and `capacity` take the expert FFN as `ffn`, so expert parallelism can swap in an exchange.


def _dense(p, x, weights, ids, cfg):
    """Reference: every expert on every token, then keep the chosen ones. O(E) compute."""
    N = x.shape[0]
    gate = jnp.einsum("ND,EDF->NEF", x, p["gate"])
    up = jnp.einsum("ND,EDF->NEF", x, p["up"])
    out = jnp.einsum("NEF,EFD->NED", jax.nn.silu(gate) * up, p["down"])
    combine = jnp.zeros((N, cfg.n_routed_experts), jnp.float32).at[jnp.arange(N)[:, None], ids].add(weights)
    return jnp.einsum("NED,NE->ND", out.astype(jnp.float32), combine), jnp.int32(0)


def _ragged_ffn(p, xs, sizes):
    """One grouped matmul per projection. xs [M,D] sorted by expert, sizes [E] -> [M,D]."""
    h = jax.nn.silu(jax.lax.ragged_dot(xs, p["gate"], sizes)) * jax.lax.ragged_dot(xs, p["up"], sizes)
    return jax.lax.ragged_dot(h, p["down"], sizes)


def _local_ragged_ffn(p, xs, sizes):
    """All experts here: every copy runs, none is dropped."""
    return _ragged_ffn(p, xs, sizes), jnp.int32(0)


def _ragged(p, x, weights, ids, cfg, ffn=_local_ragged_ffn):
    """Sort token copies by expert and run the experts on their contiguous rows. `ffn(p, xs, sizes)
    -> (rows, dropped)`: dropless here; an exchange with a bounded buffer returns zero rows for the
    copies it could not send, and counts them."""
    N, k = ids.shape
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    sizes = jnp.bincount(flat, length=cfg.n_routed_experts).astype(jnp.int32)
    rows, dropped = ffn(p, x[token], sizes)
    out = rows.astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((N, x.shape[1]), jnp.float32).at[token].add(out), dropped


def block_rows(num_copies: int, num_experts: int) -> int:
    """Rows per block of `_blocked`: a power of two near half an expert's mean share of the copies,
    8..256. Large enough that each block's matmul runs near the machine's matmul rate, small enough
    that the padding (under one block per expert) stays a fraction of the work."""
    target = min(256.0, num_copies / num_experts / 2)
    return max(8, 1 << max(0, math.floor(math.log2(max(target, 1.0)))))


def _blocked(p, x, weights, ids, cfg):
    """Dropless grouped matmul without a grouped-matmul kernel (CPU): copies sorted by expert, each
    expert's run padded to whole blocks of R rows, every block multiplied by its own expert's weights
    (one batched matmul over the K blocks, each block's weights gathered). Work: the copies plus under
    one block of padding per expert, where `ragged_dot`'s CPU lowering runs every expert on every row."""
    N, k = ids.shape
    E, M = cfg.n_routed_experts, N * k
    R = block_rows(M, E)
    K = (M + min(E, M) * (R - 1)) // R  # Σ_e ceil(size_e / R) can not exceed this
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=E)
    blocks = (sizes + R - 1) // R
    blocks_end = jnp.cumsum(blocks)
    expert = flat[order]
    rank = jnp.arange(M) - (jnp.cumsum(sizes) - sizes)[expert]  # place among its expert's copies
    slot = (blocks_end - blocks)[expert] * R + rank
    token = order // k
    buf = jnp.zeros((K * R, x.shape[1]), x.dtype).at[slot].set(x[token], unique_indices=True,
                                                                 mode="promise_in_bounds")
    # Blocks past the last expert's run hold zeros; any expert's weights do for them.
    block_expert = jnp.minimum(jnp.searchsorted(blocks_end, jnp.arange(K), side="right"), E - 1)
    w = {n: jnp.take(p[n], block_expert, axis=0, mode="clip") for n in ("gate", "up", "down")}
    buf = buf.reshape(K, R, -1)
    h = jax.nn.silu(jnp.einsum("KRD,KDF->KRF", buf, w["gate"])) * jnp.einsum("KRD,KDF->KRF", buf, w["up"])
    out = jnp.einsum("KRF,KFD->KRD", h, w["down"]).reshape(K * R, -1)
    rows = jnp.take(out, slot, axis=0, mode="clip").astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((N, x.shape[1]), jnp.float32).at[token].add(rows), jnp.int32(0)


def capacity(num_tokens: int, cfg: ModelConfig) -> int:
    """Slots per expert: ceil(capacity_factor · N·k / E)."""
    return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.num_experts_per_tok / cfg.n_routed_experts))


def _grouped_ffn(p, buf):
    """Every expert on its slots. buf [E,C,D] -> [E,C,D]."""
    h = jax.nn.silu(jnp.einsum("ECD,EDF->ECF", buf, p["gate"])) * jnp.einsum("ECD,EDF->ECF", buf, p["up"])
    return jnp.einsum("ECF,EFD->ECD", h, p["down"])


def _capacity(p, x, weights, ids, cfg, ffn=_grouped_ffn):
    """Fixed slots per expert (GShard style); first choices fill slots before second choices;
    overflow copies are dropped and counted."""
    N, k = ids.shape
    E, C = cfg.n_routed_experts, capacity(N, cfg)
    flat = ids.T.reshape(-1)  # choice-major priority
    onehot = jax.nn.one_hot(flat, E, dtype=jnp.int32)
    pos = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - 1, flat[:, None], axis=1)[:, 0]
    keep = pos < C
    slot = jnp.where(keep, flat * C + pos, E * C)  # E·C = out of range -> dropped by mode="drop"
    token = jnp.tile(jnp.arange(N), k)
    buf = jnp.zeros((E * C, x.shape[1]), x.dtype).at[slot].set(x[token], mode="drop").reshape(E, C, -1)
    out = ffn(p, buf).reshape(E * C, -1)
    got = out.at[slot].get(mode="fill", fill_value=0).astype(jnp.float32)
    w = jnp.where(keep, weights.T.reshape(-1), 0.0)[:, None]
    y = jnp.zeros((N, x.shape[1]), jnp.float32).at[token].add(got * w)
    return y, jnp.sum(~keep).astype(jnp.int32)


# The *_ep strategies run the local ones per device inside shard_map, exchanging token copies with
# the devices that own their experts (experts.py).
DISPATCH = {
    "dense": _dense,
    "ragged": _ragged,
    "blocked": _blocked,
    "capacity": _capacity,
    "capacity_ep": experts.expert_parallel(_capacity, experts.exchange_slots(_grouped_ffn)),
    "ragged_ep": experts.expert_parallel(_ragged, experts.exchange_ragged(_ragged_ffn)),
}
# `moe_dispatch: auto` -> the strategy per backend: the fastest dropless one where it was measured
# (CPU: benchmarks/README.md, "MoE dispatch"); TPU and GPU take `ragged`, whose grouped matmul XLA
# compiles natively there (not timed here: no accelerator ran these benchmarks).
AUTO_DISPATCH = {"cpu": "blocked", "tpu": "ragged", "gpu": "ragged", "cuda": "ragged", "rocm": "ragged"}
check_names(dict(DISPATCH, auto=None), MoeDispatch, "moe_dispatch")


def dispatch_name(cfg: ModelConfig, where: str | None = None) -> str:
    """The strategy cfg runs on platform `where` (default: the one being traced for)."""
    if cfg.moe_dispatch != "auto":
        return cfg.moe_dispatch
    return AUTO_DISPATCH.get(where or platform(), "ragged")


# --------------------------------------------------------------------------- the layer


def balance_loss(scores: jax.Array, ids: jax.Array, segment_ids: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Complementary sequence-wise balance loss without α (V3 eqs. 17-20), per packed segment.

    scores [B,T,E], ids [B,T,k], segment_ids [B,T] (0 = padding, excluded) -> scalar.
    """
    B, T, E = scores.shape
    k = cfg.num_experts_per_tok
    valid = (segment_ids > 0).astype(jnp.float32)
    # Number segments 0.. by their boundaries, so any id values work; each row has at most T.
    boundary = jnp.concatenate([jnp.ones((B, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    seg = jnp.cumsum(boundary, axis=1) - 1
    rows = jnp.arange(B)[:, None]
    probs = scores / scores.sum(-1, keepdims=True) * valid[..., None]
    hits = jax.nn.one_hot(ids, E, dtype=jnp.float32).sum(2) * valid[..., None]  # [B,T,E]
    count = jnp.zeros((B, T, E)).at[rows, seg].add(hits)
    prob = jnp.zeros((B, T, E)).at[rows, seg].add(probs)
    length = jnp.zeros((B, T)).at[rows, seg].add(valid)
    present = length > 0
    safe = jnp.where(present, length, 1.0)[..., None]
    f = E / (k * safe) * count
    per_seq = jnp.sum(f * (prob / safe), axis=-1)
    return jnp.sum(jnp.where(present, per_seq, 0.0)) / jnp.maximum(present.sum(), 1)


def apply(p: dict, x: jax.Array, segment_ids: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, dict]:
    """MoE FFN. x [B,T,D] -> y [B,T,D], stats {load [E], dropped, balance_loss}."""
    B, T, D = x.shape
    flat = x.reshape(B * T, D)
    weights, ids, scores = route(p, flat, cfg)
    routed, dropped = DISPATCH[dispatch_name(cfg)](p["experts"], flat, weights, ids, cfg)
    y = routed.astype(x.dtype).reshape(B, T, D)
    if "shared" in p:
        y = y + swiglu(p["shared"], x)
    valid = (segment_ids.reshape(-1) > 0).astype(jnp.float32)
    load = jnp.zeros((cfg.n_routed_experts,), jnp.float32).at[ids].add(valid[:, None])
    stats = {
        "load": load,
        "dropped": dropped,
        "balance_loss": balance_loss(scores.reshape(B, T, -1), ids.reshape(B, T, -1), segment_ids, cfg),
    }
    return y, stats
