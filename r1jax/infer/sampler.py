"""Batched autoregressive sampling with a KV cache: jitted prefill + `lax.while_loop` decode.

Legend: B batch · T new positions this call · P prompt bucket · S cache slots (P + max_new - 1)
· D model · H heads · N nope dim · R rope dim · K qk head dim (N+R) · V value head dim
· L kv latent · G kv heads · J query heads per kv head (H/G) · Y layers in one stacked group · W vocab.

Cache layout. Prompts are right-padded to a power-of-two bucket P and written to slots 0..P-1; the
i-th generated token (i ≥ 1 is fed back) goes to slot P+i-1 in every row, while its rope position is
row_len+i-1, so every row writes the same slot (one dynamic_update_slice) and the holes between a
row's prompt and slot P are masked. Keys carry their rope rotation, so slot ≠ position is harmless.

Cache modes, per architecture. DeepSeek (ModelConfig, `CACHES`):
- "latent": MLA absorbed decode (DeepSeek-V2 §2.1.2). The cache holds the normalized latent c [L]
  and the rotated shared rope key [R] per token and layer; kv_b's key part is folded into the query
  (q_nope → latent space) and its value part into the output, so keys/values are never expanded.
- "expanded": per-head keys [H,K] and values [H,V], as the training form computes them. Reference.
Dense students (DenseConfig, `DENSE_CACHES`):
- "gqa": rotated keys and values per kv head [G,K]; each is read by its J query heads.
The first mode listed is the architecture's default.

The decoder layer reuses the model's pieces (`attention.queries/latent_kv/output`, `dense.project/
output`, `rms_norm`, `moe.apply`, `swiglu`, `cast_tree`, `transformer.embed/head`); only attention
over the cache is here.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from r1jax.config import DenseConfig, ModelConfig
from r1jax.errors import ConfigError, DataError
from r1jax.model import attention, dense, moe, rope, transformer
from r1jax.model.layers import cast_tree, rms_norm, swiglu
from r1jax.parallel import experts
from r1jax.parallel import rules as rules_lib

MIN_BUCKET = 8
# Incremented each time the generation loop is traced (tests check that buckets avoid recompiles).
TRACE_COUNT = {"generate": 0}


# --------------------------------------------------------------------------- cache modes


def _split_kv_b(p: dict, cfg: ModelConfig):
    """kv_b [L,H,N+V] -> key part [L,H,N], value part [L,H,V]."""
    return p["kv_b"][..., : cfg.qk_nope_head_dim], p["kv_b"][..., cfg.qk_nope_head_dim:]


def _latent_entry(p, c, k_rope, cfg):
    return {"c": c, "k_rope": k_rope}


def _latent_query(p, q_nope, q_rope, cfg):
    # q_nope·k_nope = q_nope·(c W_k) = (q_nope W_kᵀ)·c  (V2 eq. 10 absorbed into W_q).
    w_k, _ = _split_kv_b(p, cfg)
    return jnp.einsum("BTHN,LHN->BTHL", q_nope, w_k), q_rope


def _latent_scores(q, entry):
    q_lat, q_rope = q
    s = jnp.einsum("BTHL,BSL->BTHS", q_lat, entry["c"], preferred_element_type=jnp.float32)
    return s + jnp.einsum("BTHR,BSR->BTHS", q_rope, entry["k_rope"], preferred_element_type=jnp.float32)


def _latent_mix(weights, entry):
    return jnp.einsum("BTHS,BSL->BTHL", weights.astype(entry["c"].dtype), entry["c"])


def _latent_finish(p, ctx, cfg):
    # Σ_s w_s v_s = (Σ_s w_s c_s) W_v: the value projection moves after the weighted sum (V2 eq. 11).
    _, w_v = _split_kv_b(p, cfg)
    return jnp.einsum("BTHL,LHV->BTHV", ctx, w_v)


def _expanded_entry(p, c, k_rope, cfg):
    kv = jnp.einsum("BSL,LHC->BSHC", c, p["kv_b"])
    k_nope, v = kv[..., : cfg.qk_nope_head_dim], kv[..., cfg.qk_nope_head_dim:]
    shared = jnp.broadcast_to(k_rope[:, :, None, :], k_nope.shape[:3] + k_rope.shape[-1:])
    return {"k": jnp.concatenate([k_nope, shared], axis=-1), "v": v}


def _expanded_query(p, q_nope, q_rope, cfg):
    return jnp.concatenate([q_nope, q_rope], axis=-1)


def _expanded_scores(q, entry):
    return jnp.einsum("BTHK,BSHK->BTHS", q, entry["k"], preferred_element_type=jnp.float32)


def _expanded_mix(weights, entry):
    return jnp.einsum("BTHS,BSHV->BTHV", weights.astype(entry["v"].dtype), entry["v"])


def _expanded_finish(p, ctx, cfg):
    return ctx


def _latent_widths(cfg: ModelConfig) -> dict:
    return {"c": (cfg.kv_lora_rank,), "k_rope": (cfg.qk_rope_head_dim,)}


def _expanded_widths(cfg: ModelConfig) -> dict:
    H = cfg.num_attention_heads
    return {"k": (H, cfg.qk_head_dim), "v": (H, cfg.v_head_dim)}


def _gqa_project(p, x, cos, sin, cfg):
    q, k, v = dense.project(p, x, cos, sin, cfg)
    return dense.grouped(q, cfg.num_key_value_heads), {"k": k, "v": v}


def _gqa_scores(q, entry):
    B, T, G, J, _ = q.shape
    s = jnp.einsum("BTGJK,BSGK->BTGJS", q, entry["k"], preferred_element_type=jnp.float32)
    return s.reshape(B, T, G * J, -1)


def _gqa_mix(weights, entry):
    B, T, H, S = weights.shape
    G = entry["v"].shape[2]
    w = weights.reshape(B, T, G, H // G, S).astype(entry["v"].dtype)
    return jnp.einsum("BTGJS,BSGK->BTGJK", w, entry["v"]).reshape(B, T, H, -1)


def _gqa_output(p, ctx, cfg):
    return dense.output(p, ctx)


def _gqa_widths(cfg: DenseConfig) -> dict:
    G, K = cfg.num_key_value_heads, cfg.attn_head_dim
    return {"k": (G, K), "v": (G, K)}


@dataclasses.dataclass(frozen=True)
class CacheMode:
    project: callable  # (attn params, x [B,T,D], cos, sin, cfg) -> query in the cache's key space, new entry
    # Scores are laid out [B,T,H,S]: on CPU, XLA's batched dots run about 2x faster than with [B,H,T,S].
    scores: callable  # (query, entry) -> [B,T,H,S] f32, unscaled
    mix: callable  # (weights [B,T,H,S], entry) -> context in the cache's value space
    output: callable  # (attn params, context, cfg) -> [B,T,D]
    widths: callable  # cfg -> {name: per-token trailing shape}
    scale: callable  # cfg -> softmax scale


def _mla_mode(entry, query, scores, mix, finish, widths) -> CacheMode:
    """An MLA cache: `entry` maps the latent c [B,T,L] and k_rope [B,T,R] to what is cached, `query`
    maps q_nope/q_rope into the cache's key space, `finish` maps the mixed context to [B,T,H,V]."""
    def project(p, x, cos, sin, cfg):
        q_nope, q_rope = attention.queries(p, x, cos, sin, cfg)
        return query(p, q_nope, q_rope, cfg), entry(p, *attention.latent_kv(p, x, cos, sin, cfg), cfg)

    def output(p, ctx, cfg):
        return attention.output(p, finish(p, ctx, cfg))

    return CacheMode(project, scores, mix, output, widths, rope.softmax_scale)


CACHES = {
    "latent": _mla_mode(_latent_entry, _latent_query, _latent_scores, _latent_mix, _latent_finish, _latent_widths),
    "expanded": _mla_mode(_expanded_entry, _expanded_query, _expanded_scores, _expanded_mix, _expanded_finish,
                          _expanded_widths),
}
DENSE_CACHES = {
    "gqa": CacheMode(_gqa_project, _gqa_scores, _gqa_mix, _gqa_output, _gqa_widths, dense.softmax_scale),
}


def cache_modes(cfg: ModelConfig | DenseConfig) -> dict[str, CacheMode]:
    """The cache modes of cfg's architecture, its default first."""
    return DENSE_CACHES if isinstance(cfg, DenseConfig) else CACHES


def resolve_cache(cfg: ModelConfig | DenseConfig, cache: str | None) -> str:
    """The cache mode's name: `cache`, or the architecture's default when None."""
    modes = cache_modes(cfg)
    if cache is None:
        return next(iter(modes))
    if cache not in modes:
        raise ConfigError(f"cache: unknown mode {cache!r} for {cfg.model_type}; valid: {', '.join(sorted(modes))}")
    return cache


def cache_bytes_per_token(cfg: ModelConfig | DenseConfig, cache: str | None = None) -> int:
    """Bytes one token occupies in the cache, summed over all layers."""
    per_layer = sum(int(np.prod(w)) for w in cache_modes(cfg)[resolve_cache(cfg, cache)].widths(cfg).values())
    return per_layer * cfg.num_hidden_layers * jnp.dtype(cfg.dtype).itemsize


# --------------------------------------------------------------------------- one decoder layer


def attend_cached(p, x, cos, sin, new_mask, old, old_mask, cfg: ModelConfig, mode: CacheMode):
    """Attention for T new tokens over the cached entries `old` (None at prefill) and themselves.

    x [B,T,D], cos/sin [B,T,R/2] of the new positions, new_mask [B,T,T] (causal, valid keys),
    old_mask [B,S] -> y [B,T,D], the new tokens' cache entries.
    """
    q, new = mode.project(p, x, cos, sin, cfg)
    blocks = [(new, new_mask[:, :, None, :])]
    if old is not None:
        blocks.append((old, old_mask[:, None, None, :]))
    scale = mode.scale(cfg)
    scores = [jnp.where(m, mode.scores(q, e) * scale, attention.NEG_INF) for e, m in blocks]
    weights = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)  # fp32 (spec §10)
    ctx, start = 0, 0
    for (e, _), s in zip(blocks, scores):
        ctx = ctx + mode.mix(weights[..., start : start + s.shape[-1]], e)
        start += s.shape[-1]
    return mode.output(p, ctx, cfg), new


def _block(p, h, rot, valid, new_mask, old, old_mask, cfg: ModelConfig, mode: CacheMode, is_moe: bool):
    """One decoder layer (spec §2) with cached attention. h [B,T,D], rot = (cos, sin) -> h, new entries."""
    p = cast_tree(p, jnp.dtype(cfg.dtype))
    x = rms_norm(p["input_norm"], h, cfg.rms_norm_eps)
    a, new = attend_cached(p["attn"], x, *rot, new_mask, old, old_mask, cfg, mode)
    h = h + a
    x = rms_norm(p["post_attn_norm"], h, cfg.rms_norm_eps)
    y = moe.apply(p["mlp"], x, valid.astype(jnp.int32), cfg)[0] if is_moe else swiglu(p["mlp"], x)
    return h + y, new


LAYER_GROUPS = (("dense_layers", False), ("moe_layers", True), ("layers", False))  # the last: dense students


def _layers(params, h, positions, valid, new_mask, cache, old_mask, cfg, mode):
    """Every layer group, each a lax.scan over its stacked params (and cache slices).
    -> h [B,T,D], {group: new entries stacked [Y,B,T,...]}."""
    rot = rope.tables(positions, cfg)  # same positions in every layer: computed once per step
    entries = {}
    for group, is_moe in LAYER_GROUPS:
        if group not in params:
            continue

        def body(carry, xs, is_moe=is_moe):
            p, old = xs
            return _block(p, carry, rot, valid, new_mask, old, old_mask, cfg, mode, is_moe)

        old = None if cache is None else cache[group]
        h, entries[group] = jax.lax.scan(body, h, (params[group], old))
    return h, entries


def _logits(params, h, cfg):
    return transformer.head(transformer.lm_head_weight(params), params["final_norm"], h, cfg)


# --------------------------------------------------------------------------- token choice


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


def _step_keys(row_keys, step):
    return jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)


# --------------------------------------------------------------------------- dropless MoE
# Inference is dropless (V3 §2.1.2): capacity drops would make a row's tokens depend on the rest of
# its batch (and on how the batch is split over devices).


def _full_capacity(cfg: ModelConfig) -> ModelConfig:
    # A token picks k distinct experts, so no expert receives more copies than there are tokens:
    # capacity_factor E/k gives C = ceil(N) slots, which nothing can overflow.
    return cfg.replace(capacity_factor=max(cfg.capacity_factor, cfg.n_routed_experts / cfg.num_experts_per_tok))


def _dropless_expert_parallel(cfg: ModelConfig, platform: str) -> ModelConfig:
    """ragged_ep where XLA has the ragged all-to-all; elsewhere (CPU) capacity_ep with full capacity:
    still expert parallel and dropless, at E/k times the expert FFN work of the slots actually used."""
    if platform in experts.NO_RAGGED_ALL_TO_ALL:
        return _full_capacity(cfg)
    return cfg.replace(moe_dispatch="ragged_ep")


# Token-dropping MoE dispatch strategy -> (cfg, platform) -> the dropless config the sampler runs.
DROPLESS = {
    "capacity": lambda cfg, platform: cfg.replace(moe_dispatch="ragged"),
    "capacity_ep": _dropless_expert_parallel,
}


def dropless(cfg: ModelConfig | DenseConfig, mesh=None) -> ModelConfig | DenseConfig:
    """cfg with a dropless MoE dispatch for sampling on `mesh`'s devices (default backend without one)."""
    if not isinstance(cfg, ModelConfig) or cfg.moe_dispatch not in DROPLESS:
        return cfg
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    return DROPLESS[cfg.moe_dispatch](cfg, platform)


# --------------------------------------------------------------------------- the jitted loop


def _constrain(x, mesh, axes):
    """Keep the batch dim (axis 1 of cache arrays: [Y,B,...]) split over the batch axes."""
    if mesh is None:
        return x
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, PartitionSpec(None, axes))), x)


def _prefill(params, tokens, lengths, cfg: ModelConfig, mode: CacheMode):
    """The prompt attends causally among its valid tokens (padding keys masked).
    -> logits at each row's last prompt token [B,W], cache entries {group: [Y,B,P,...]}."""
    B, P = tokens.shape
    valid = jnp.arange(P)[None, :] < lengths[:, None]
    causal = jnp.tril(jnp.ones((P, P), bool))[None] & valid[:, None, :]
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    h, entries = _layers(params, transformer.embed(params, tokens, cfg), positions, valid, causal, None, None,
                         cfg, mode)
    last = h[jnp.arange(B), lengths - 1][:, None]
    return _logits(params, last, cfg)[:, 0], entries


def _decode(params, tok, i, lengths, kv, P: int, cfg: ModelConfig, mode: CacheMode):
    """Feed generated token i (tok [B]) at position len+i, slot P+i. -> logits [B,W], updated cache."""
    B = tok.shape[0]
    slots = jnp.arange(jax.tree.leaves(kv)[0].shape[2])[None]
    old_mask = (slots < lengths[:, None]) | ((slots >= P) & (slots < P + i))
    h, new = _layers(params, transformer.embed(params, tok[:, None], cfg), (lengths + i)[:, None],
                     jnp.ones((B, 1), bool), jnp.ones((B, 1, 1), bool), kv, old_mask, cfg, mode)
    kv = jax.tree.map(lambda c, e: jax.lax.dynamic_update_slice_in_dim(c, e, P + i, axis=2), kv, new)
    return _logits(params, h, cfg)[:, 0], kv


def _record_step(s: dict, i, tok, logp, logits, stopped, fill_id) -> dict:
    """Write generated token i into the outputs; rows already done get fill_id and log-prob 0."""
    tok, logp = jnp.where(s["done"], fill_id, tok), jnp.where(s["done"], 0.0, logp)
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None].astype(buf.dtype), i, axis=1)
    out = dict(s, tok=tok, tokens=put(s["tokens"], tok), logprobs=put(s["logprobs"], logp),
               lengths=s["lengths"] + (~s["done"]).astype(jnp.int32), done=s["done"] | stopped(tok))
    if "logits" in s:
        out["logits"] = put(s["logits"], logits)
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "cache", "greedy", "truncate", "with_logits",
                                             "mesh", "axes", "rules"))
def _generate(params, tokens, lengths, stop_table, row_ids, seed, temperature, top_p, top_k, fill_id, *,
              cfg: ModelConfig, max_new_tokens: int, cache: str, greedy: bool, truncate: bool, with_logits: bool,
              mesh, axes, rules) -> dict:
    """tokens [B,P] right-padded, lengths [B], stop_table [B,X] (-1 = none) -> {tokens [B,M],
    logprobs [B,M], lengths [B] (generated), done [B], and with_logits: logits [B,M,W]}. `rules` is
    only part of the cache key: the enclosing sharding_context's rules shape the trace."""
    TRACE_COUNT["generate"] += 1
    mode = cache_modes(cfg)[cache]
    B, P = tokens.shape
    M = max_new_tokens
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), row_ids)
    choose = functools.partial(choose_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               greedy=greedy, truncate=truncate)
    stopped = lambda t: jnp.any(t[:, None] == stop_table, axis=-1)

    logits, entries = _prefill(params, tokens, lengths, cfg, mode)
    # Slots P..P+M-2 receive generated tokens 0..M-2 (the last one is never fed back).
    pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, M - 1)] + [(0, 0)] * (a.ndim - 3))
    state = {"kv": _constrain(jax.tree.map(pad, entries), mesh, axes), "done": jnp.zeros((B,), bool),
             "tokens": jnp.full((B, M), fill_id, jnp.int32), "logprobs": jnp.zeros((B, M), jnp.float32),
             "lengths": jnp.zeros((B,), jnp.int32)}
    if with_logits:
        state["logits"] = jnp.zeros((B, M, cfg.vocab_size), jnp.float32)
    state = _record_step(state, 0, *choose(logits, _step_keys(row_keys, 0)), logits, stopped, fill_id)

    def body(carry):
        i, s = carry
        logits, kv = _decode(params, s["tok"], i, lengths, s["kv"], P, cfg, mode)
        s = _record_step(dict(s, kv=_constrain(kv, mesh, axes)), i + 1,
                         *choose(logits, _step_keys(row_keys, i + 1)), logits, stopped, fill_id)
        return i + 1, s

    _, state = jax.lax.while_loop(lambda c: (c[0] < M - 1) & ~jnp.all(c[1]["done"]), body, (jnp.int32(0), state))
    out = {k: v for k, v in state.items() if k not in ("kv", "tok")}
    if mesh is not None:  # replicated, so every process can read the whole batch
        out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, PartitionSpec()))
    return out


# --------------------------------------------------------------------------- validation (before compiling)


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two (at least MIN_BUCKET), so lengths share compiles."""
    return max(MIN_BUCKET, 1 << (length - 1).bit_length())


def _check_prompts(prompts, cfg: ModelConfig, max_new_tokens: int, label=lambda b: f"prompts[{b}]") -> list[np.ndarray]:
    """Token rows as int32 arrays; a bad row raises DataError naming it by `label(row index)`."""
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim != 2:
            raise DataError(f"prompts: expected shape [batch, seq] or a list of token lists, got {list(arr.shape)}")
        rows = list(arr)
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)):
        rows = [np.asarray(r) for r in prompts]
    else:
        raise DataError(f"prompts: expected an int array [batch, seq] or a list of token lists, "
                        f"got {type(prompts).__name__}")
    if not rows:
        raise DataError("prompts: empty batch (no rows)")
    limit = cfg.max_position_embeddings
    for b, r in enumerate(rows):
        if r.ndim != 1:
            raise DataError(f"{label(b)}: expected a flat list of token ids, got shape {list(r.shape)}")
        if r.size == 0:
            raise DataError(f"{label(b)}: empty prompt (at least one token is needed)")
        if not np.issubdtype(r.dtype, np.integer):
            raise DataError(f"{label(b)}: token ids must be integers, got dtype {r.dtype}")
        bad = np.flatnonzero((r < 0) | (r >= cfg.vocab_size))
        if bad.size:
            raise DataError(f"{label(b)}[{bad[0]}] = {int(r[bad[0]])} is outside the vocabulary "
                            f"[0, {cfg.vocab_size})")
        if r.size + max_new_tokens > limit:
            raise DataError(f"{label(b)}: {r.size} prompt tokens + max_new_tokens={max_new_tokens} exceed "
                            f"max_position_embeddings={limit}")
    return [r.astype(np.int32) for r in rows]


def _check_token_id(name: str, value, cfg: ModelConfig) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < cfg.vocab_size:
        raise ConfigError(f"{name}: must be a token id in [0, {cfg.vocab_size}), got {value!r}")
    return int(value)


def _check_options(max_new_tokens, temperature, top_p, top_k, cache, seed, modes):
    """The sampling options; `cache` is None (the architecture's default) or one of `modes`."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens: must be an int >= 1, got {max_new_tokens!r}")
    if not np.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature: must be >= 0 (0 = greedy), got {temperature!r}")
    if not (0 < top_p <= 1):
        raise ConfigError(f"top_p: must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ConfigError(f"top_k: must be an int >= 0 (0 = off), got {top_k!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed: must be an int in [0, 2**32), got {seed!r}")
    if cache is not None and cache not in modes:
        raise ConfigError(f"cache: unknown mode {cache!r}; valid: {', '.join(sorted(modes))}")


def _stop_table(stop_ids, eos_id, batch: int, cfg: ModelConfig) -> np.ndarray:
    """[B, X] stop ids per row, -1 padded. stop_ids: None, ids for every row, or one list per row."""
    if stop_ids is None:
        per_row = [[] for _ in range(batch)]
    elif all(isinstance(s, (int, np.integer)) for s in stop_ids):
        per_row = [list(stop_ids)] * batch
    else:
        if len(stop_ids) != batch:
            raise ConfigError(f"stop_ids: {len(stop_ids)} per-row lists for a batch of {batch}")
        per_row = [list(s) for s in stop_ids]
    rows = [([eos_id] if eos_id is not None else []) + [_check_token_id(f"stop_ids[{b}]", t, cfg) for t in r]
            for b, r in enumerate(per_row)]
    # Width rounded up to a power of two (≥ 4) so a few more stop ids reuse the compiled loop.
    width = max(4, 1 << (max(len(r) for r in rows) - 1).bit_length())
    return np.array([r + [-1] * (width - len(r)) for r in rows], np.int32).reshape(batch, width)


# --------------------------------------------------------------------------- public API


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """tokens [B,M] int32 (after a row stops: eos_id, or pad_token_id/0 without one); logprobs [B,M]
    float32 of the chosen tokens (0 after the stop); lengths [B] generated tokens including the stop
    token; finished [B] whether the row stopped on EOS or a stop id (False: ran out of max_new_tokens);
    logits [B,M,W] float32 raw next-token logits at each step, only with return_logits=True."""

    tokens: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finished: np.ndarray
    logits: np.ndarray | None = None

    @property
    def finish_reasons(self) -> list[str]:
        return ["stop" if f else "length" for f in self.finished]


def _batch_axes(mesh, rules) -> tuple[str, ...]:
    """The mesh axes of the `batch` rule (data×fsdp×expert by default) that this mesh has."""
    return tuple(a for a in rules_lib.axes_of("batch", rules) if a in mesh.axis_names)


def _pad_rows(arrays: list[np.ndarray], multiple: int) -> list[np.ndarray]:
    """Repeat row 0 so the batch divides the batch split (the extra rows are dropped later)."""
    extra = -arrays[0].shape[0] % multiple
    return [np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) if extra else a for a in arrays]


def _on_mesh(params, mesh) -> bool:
    return all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
               for x in jax.tree.leaves(params))


def _place_params(params, cfg, mesh, rules):
    """Params already laid out on `mesh` (a training state's) are used where they are, so rollout and
    training share one copy; others are split by the rules like a training state's."""
    if _on_mesh(params, mesh):
        return params
    return jax.device_put(params, rules_lib.param_shardings(cfg, mesh, rules))


def _sample(params, cfg, rows, *, max_new_tokens, temperature, top_p, top_k, seed, eos_id, stop_table, cache,
            mesh, row_ids, with_logits=False, bucket=MIN_BUCKET, rules=None) -> SampleOutput:
    B = len(rows)
    lengths = np.array([len(r) for r in rows], np.int32)
    P = max(prompt_bucket(int(lengths.max())), bucket)
    tokens = np.zeros((B, P), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    batch = [tokens, lengths, stop_table, np.asarray(row_ids, np.int32)]
    cfg = dropless(cfg, mesh)
    fill = eos_id if eos_id is not None else (cfg.pad_token_id or 0)
    run = functools.partial(_generate, cfg=cfg, max_new_tokens=int(max_new_tokens), cache=resolve_cache(cfg, cache),
                            greedy=temperature == 0, truncate=bool(top_p < 1 or top_k > 0), with_logits=with_logits)
    scalars = (np.uint32(seed), np.float32(temperature), np.float32(top_p), np.int32(top_k), np.int32(fill))
    if mesh is None:
        out = run(params, *batch, *scalars, mesh=None, axes=None, rules=None)
    else:
        rules = rules_lib.as_pairs(rules if rules is not None else rules_lib.active_rules())
        axes = _batch_axes(mesh, rules)
        batch = _pad_rows(batch, int(np.prod([mesh.shape[a] for a in axes])))
        split = NamedSharding(mesh, PartitionSpec(axes))
        # Every process passes the same rows (the global batch); each device takes its share.
        batch = [jax.make_array_from_process_local_data(split, a, a.shape) for a in batch]
        params = _place_params(params, cfg, mesh, rules)
        with rules_lib.sharding_context(mesh, rules):  # activation constraints and expert exchange
            out = run(params, *batch, *scalars, mesh=mesh, axes=axes, rules=rules)
    out = {k: np.asarray(jax.device_get(v))[:B] for k, v in out.items()}
    return SampleOutput(out["tokens"], out["logprobs"], out["lengths"], out["done"], out.get("logits"))


def sample(params: dict, config: ModelConfig | DenseConfig, prompts, *, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0, eos_id: int | None = None,
           stop_ids=None, cache: str | None = None, mesh=None, rules=None, bucket: int = MIN_BUCKET,
           return_logits: bool = False) -> SampleOutput:
    """Sample up to max_new_tokens per prompt. prompts: int [B,T] or a list of token-id lists (any
    lengths). temperature 0 = greedy; top_k 0 = off. A row stops at eos_id or any of stop_ids (ids
    for every row, or one list per row). Row b draws from fold_in(key(seed), b), so a row's sample
    does not depend on the rest of the batch or on the mesh. With `mesh`, the batch is split over the
    mesh axes of the `batch` rule (data×fsdp×expert; padded to a multiple of their product), params
    already on the mesh are used where they lie (no copy) and others are split by `rules` (a MeshConfig
    or pairs; None: the enclosing `sharding_context`'s, else the defaults); every process must pass the
    same prompts. Prompts are padded to at least `bucket` positions: batches whose prompts fit share
    one compile. return_logits keeps every step's logits (B·M·W floats).
    cache: a mode of the config's architecture (`cache_modes`); None = its default (latent, gqa)."""
    _check_options(max_new_tokens, temperature, top_p, top_k, cache, seed, cache_modes(config))
    if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 1:
        raise ConfigError(f"bucket: must be an int >= 1, got {bucket!r}")
    if eos_id is not None:
        _check_token_id("eos_id", eos_id, config)
    rows = _check_prompts(prompts, config, max_new_tokens)
    table = _stop_table(stop_ids, eos_id, len(rows), config)
    return _sample(params, config, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   top_k=top_k, seed=seed, eos_id=eos_id, stop_table=table, cache=cache, mesh=mesh, rules=rules,
                   bucket=prompt_bucket(int(bucket)),
                   row_ids=np.arange(len(rows)), with_logits=bool(return_logits))


def generate(params, config, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0,
             eos_id=None) -> np.ndarray:
    """New tokens int32 [batch, max_new_tokens]; greedy when temperature == 0. eos_id None = never
    stop early; after a row emits eos_id the rest of the row is eos_id."""
    return sample(params, config, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  seed=seed, eos_id=eos_id).tokens


# --------------------------------------------------------------------------- files


def _read_prompts(path, tokenizer) -> list[tuple[dict, list[int], int]]:
    """(row, token ids, line number) for each non-blank line of a prompts jsonl."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: prompts file not found") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        if "prompt_ids" in row:
            ids = row["prompt_ids"]
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise DataError(f"{path}:{n}: prompt_ids must be a list of ints")
        elif "prompt" in row:
            if tokenizer is None:
                raise DataError(f"{path}:{n}: has a text 'prompt' but the model directory has no tokenizer.json "
                                f"(give 'prompt_ids' instead)")
            ids = tokenizer.encode(row["prompt"]).ids
        else:
            raise DataError(f"{path}:{n}: needs 'prompt_ids' (or 'prompt' with a tokenizer)")
        rows.append((row, ids, n))
    if not rows:
        raise DataError(f"{path}: no prompts")
    return rows


def _default_stops(cfg: ModelConfig):
    """EOS from config.json; a list-valued eos_token_id (kept in hf_extra) adds stop ids."""
    extra = cfg.hf_extra.get("eos_token_id")
    extra = list(extra) if isinstance(extra, (list, tuple)) else []
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else (extra[0] if extra else None)
    return eos, [t for t in extra if t != eos]


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="sample", desc="sampling")


def sample_file(model_dir, prompts_jsonl, out_jsonl, *, max_new_tokens: int, temperature: float = 1.0,
                top_p: float = 1.0, top_k: int = 0, seed: int = 0, num_samples: int = 1, batch_size: int = 16,
                cache: str | None = None) -> int:
    """Sample num_samples completions for each row of a jsonl of {"prompt_ids": [...]} (or {"prompt":
    text} when model_dir has tokenizer.json) and write one row per sample: the input row's fields plus
    prompt_index, sample_index, completion_ids, completion (text, with a tokenizer), logprobs,
    finish_reason. Stops at the config's EOS. Returns the number of rows written."""
    import r1jax

    # The architecture is known only once the model is read: accept any architecture's mode name here.
    _check_options(max_new_tokens, temperature, top_p, top_k, cache, seed, {**CACHES, **DENSE_CACHES})
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples: must be an int >= 1, got {num_samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an int >= 1, got {batch_size!r}")
    tokenizer = None
    if (Path(model_dir) / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    rows = _read_prompts(prompts_jsonl, tokenizer)
    cfg, params = r1jax.load_pretrained(model_dir)
    cache = resolve_cache(cfg, cache)
    eos, extra_stops = _default_stops(cfg)
    if eos is not None:
        _check_token_id("eos_token_id (config.json)", eos, cfg)
    # Validate every prompt before the first compile.
    prompts = _check_prompts([ids for _, ids, _ in rows], cfg, max_new_tokens,
                             label=lambda b: f"{prompts_jsonl}:{rows[b][2]}: prompt")
    jobs = [(i, j) for i in range(len(rows)) for j in range(num_samples)]
    batch_size = min(batch_size, len(jobs))
    bucket = prompt_bucket(max(len(r) for r in prompts))  # one bucket for the file: one compile
    Path(out_jsonl).parent.mkdir(parents=True, exist_ok=True)
    with open(out_jsonl, "w") as f, _progress(len(jobs)) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            # Pad the last chunk to batch_size so it reuses the compiled loop; row ids are global so a
            # sample does not depend on batch_size.
            padded = chunk + [chunk[0]] * (batch_size - len(chunk))
            ids = list(range(start, start + len(padded)))
            out = _sample(params, cfg, [prompts[i] for i, _ in padded], max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, eos_id=eos,
                          stop_table=_stop_table(extra_stops, eos, len(padded), cfg), cache=cache, mesh=None,
                          row_ids=ids, bucket=bucket)
            for b, (i, j) in enumerate(chunk):
                f.write(json.dumps(_record(rows[i][0], i, j, out, b, tokenizer)) + "\n")
            bar.update(len(chunk))
    return len(jobs)


def _record(row: dict, i: int, j: int, out: SampleOutput, b: int, tokenizer) -> dict:
    n = int(out.lengths[b])
    ids = out.tokens[b, :n].tolist()
    rec = dict(row, prompt_index=i, sample_index=j, completion_ids=ids,
               logprobs=[float(x) for x in out.logprobs[b, :n]], finish_reason=out.finish_reasons[b])
    if tokenizer is not None:
        rec["completion"] = tokenizer.decode(ids, skip_special_tokens=True)
    return rec
