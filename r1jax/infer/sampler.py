"""Batched autoregressive sampling with a KV cache: jitted prefill + `lax.while_loop` decode.

Legend: B batch · T new positions this call · P prompt bucket · S cache slots (P + max_new - 1)
· D model · H heads · N nope dim · R rope dim · K qk head dim (N+R) · V value head dim
· L kv latent · G kv heads · J query heads per kv head (H/G) · Y layers in one stacked group · W vocab.

Cache layout. Prompts are right-padded to a power-of-two bucket P and written to slots 0..P-1; the
i-th generated token (i ≥ 1 is fed back) goes to slot P+i-1 in every row, while its rope position is
row_len+i-1, so every row writes the same slot (one dynamic_update_slice) and the holes between a
row's prompt and slot P are masked. Keys carry their rope rotation, so slot ≠ position is harmless.

Every layer is the model's `decoder.layer` with attention over the cache (`model/kv_cache.py`: the
cache modes of each architecture, "latent"/"expanded" for DeepSeek, "gqa" for dense students) in place
of the training attention; the stacked groups come from the architecture's layout (`model/arch.py`).
Token choice is in tokens.py; the `r1jax sample` command (prompts from a file) in `r1jax/sample.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import r1jax.model.decoder as decoder
import r1jax.model.experts as experts
import r1jax.model.moe as moe
import r1jax.model.rope as rope
from r1jax.config import DenseConfig, ModelConfig
from r1jax.errors import ConfigError, DataError
from r1jax.infer.tokens import choose_tokens, step_keys
from r1jax.model.arch import architecture
from r1jax.model.kv_cache import CacheMode, attend_cached, cache_modes, resolve_cache
from r1jax.model.params import param_shapes
from r1jax.model.sharding import param_shardings
from r1jax.parallel import rules as rules_lib

MIN_BUCKET = 8
# Incremented each time the generation loop is traced (tests check that buckets avoid recompiles).
TRACE_COUNT = {"generate": 0}


# --------------------------------------------------------------------------- the cached layer stack


def _ffn(is_moe: bool, valid, cfg):
    """A layer's FFN: the MoE (its statistics unused here) or SwiGLU."""
    if is_moe:
        return lambda p, x: (moe.apply(p, x, valid.astype(jnp.int32), cfg)[0], None)
    return decoder.dense_ffn


def _layers(params, h, positions, valid, cache, old_mask, cfg, mode: CacheMode):
    """Every decoder group of the architecture, each a lax.scan over its stacked params (and cache
    slices). -> h [B,T,D], {group: new entries stacked [Y,B,T,...]}."""
    rot = rope.tables(positions, cfg)  # same positions in every layer: computed once per step
    entries = {}
    for group, g in architecture(cfg).decoder_groups(cfg).items():
        if group not in params:
            continue
        ffn = _ffn(g.moe, valid, cfg)

        def body(carry, xs, ffn=ffn):
            p, old = xs
            attend = lambda pa, x: attend_cached(pa, x, *rot, valid, old, old_mask, cfg, mode)  # noqa: E731
            h, new, _ = decoder.layer(p, carry, cfg, attend, ffn, hidden_axes=None)
            return h, new

        old = None if cache is None else cache[group]
        h, entries[group] = decoder.scan(body, h, (params[group], old))
    return h, entries


def _logits(params, h, cfg):
    return decoder.head(decoder.lm_head_weight(params), params["final_norm"], h, cfg)


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
    return cfg.replace(moe_dispatch="ragged_ep", ragged_buffer_factor=None)


# Token-dropping MoE dispatch strategy -> (cfg, platform) -> the dropless config the sampler runs.
DROPLESS = {
    "capacity": lambda cfg, platform: cfg.replace(moe_dispatch="auto"),
    "capacity_ep": _dropless_expert_parallel,
    # A bounded receive buffer (ragged_buffer_factor) drops; the worst-case one does not.
    "ragged_ep": lambda cfg, platform: cfg.replace(ragged_buffer_factor=None),
}


def dropless(cfg: ModelConfig | DenseConfig, mesh=None) -> ModelConfig | DenseConfig:
    """cfg with a dropless MoE dispatch for sampling on `mesh`'s devices (default backend without one)."""
    if not architecture(cfg).has_moe or cfg.moe_dispatch not in DROPLESS:
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
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    h, entries = _layers(params, decoder.embed(params, tokens, cfg), positions, valid, None, None, cfg, mode)
    last = h[jnp.arange(B), lengths - 1][:, None]
    return _logits(params, last, cfg)[:, 0], entries


def _decode(params, tok, i, lengths, kv, P: int, cfg: ModelConfig, mode: CacheMode):
    """Feed generated token i (tok [B]) at position len+i, slot P+i. -> logits [B,W], updated cache."""
    B = tok.shape[0]
    slots = jnp.arange(jax.tree.leaves(kv)[0].shape[2])[None]
    old_mask = (slots < lengths[:, None]) | ((slots >= P) & (slots < P + i))
    h, new = _layers(params, decoder.embed(params, tok[:, None], cfg), (lengths + i)[:, None],
                     jnp.ones((B, 1), bool), kv, old_mask, cfg, mode)
    kv = jax.tree.map(lambda c, e: jax.lax.dynamic_update_slice_in_dim(c, e, P + i, axis=2), kv, new)
    return _logits(params, h, cfg)[:, 0], kv


def _start(params, tokens, lengths, M: int, cfg, mode: CacheMode, mesh, axes):
    """Prefill, then its entries padded to the cache of P + M - 1 slots and split over the batch axes.
    -> logits [B,W], cache {group: [Y,B,S,...]}."""
    logits, entries = _prefill(params, tokens, lengths, cfg, mode)
    # Slots P..P+M-2 receive generated tokens 0..M-2 (the last one is never fed back).
    pad = lambda a: jnp.pad(a, [(0, 0), (0, 0), (0, M - 1)] + [(0, 0)] * (a.ndim - 3))
    return logits, _constrain(jax.tree.map(pad, entries), mesh, axes)


def _step(params, tok, i, lengths, kv, P: int, cfg, mode: CacheMode, mesh, axes):
    """One decode step with the cache kept split over the batch axes. -> logits [B,W], cache."""
    logits, kv = _decode(params, tok, i, lengths, kv, P, cfg, mode)
    return logits, _constrain(kv, mesh, axes)


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

    logits, kv = _start(params, tokens, lengths, M, cfg, mode, mesh, axes)
    state = {"kv": kv, "done": jnp.zeros((B,), bool),
             "tokens": jnp.full((B, M), fill_id, jnp.int32), "logprobs": jnp.zeros((B, M), jnp.float32),
             "lengths": jnp.zeros((B,), jnp.int32)}
    if with_logits:
        state["logits"] = jnp.zeros((B, M, cfg.vocab_size), jnp.float32)
    state = _record_step(state, 0, *choose(logits, step_keys(row_keys, 0)), logits, stopped, fill_id)

    def body(carry):
        i, s = carry
        logits, kv = _step(params, s["tok"], i, lengths, s["kv"], P, cfg, mode, mesh, axes)
        s = _record_step(dict(s, kv=kv), i + 1,
                         *choose(logits, step_keys(row_keys, i + 1)), logits, stopped, fill_id)
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


def check_prompts(prompts, cfg: ModelConfig, max_new_tokens: int, label=lambda b: f"prompts[{b}]") -> list[np.ndarray]:
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


def check_token_id(name: str, value, cfg: ModelConfig) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < cfg.vocab_size:
        raise ConfigError(f"{name}: must be a token id in [0, {cfg.vocab_size}), got {value!r}")
    return int(value)


def check_options(max_new_tokens, temperature, top_p, top_k, cache, seed, modes):
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


def stop_table_of(stop_ids, eos_id, batch: int, cfg: ModelConfig) -> np.ndarray:
    """[B, X] stop ids per row, -1 padded. stop_ids: None, ids for every row, or one list per row."""
    if stop_ids is None:
        per_row = [[] for _ in range(batch)]
    elif all(isinstance(s, (int, np.integer)) for s in stop_ids):
        per_row = [list(stop_ids)] * batch
    else:
        if len(stop_ids) != batch:
            raise ConfigError(f"stop_ids: {len(stop_ids)} per-row lists for a batch of {batch}")
        per_row = [list(s) for s in stop_ids]
    rows = [([eos_id] if eos_id is not None else []) + [check_token_id(f"stop_ids[{b}]", t, cfg) for t in r]
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


def _placement(mesh, rules):
    """How `sample_rows` lays a batch on `mesh`: the rules as pairs (None: the enclosing
    `sharding_context`'s, else the defaults), the batch axes and the row multiple it pads to."""
    rules = rules_lib.as_pairs(rules if rules is not None else rules_lib.active_rules())
    axes = _batch_axes(mesh, rules)
    return rules, axes, int(np.prod([mesh.shape[a] for a in axes]))


def _on_mesh(params, mesh) -> bool:
    return all(isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
               for x in jax.tree.leaves(params))


def _place_params(params, cfg, mesh, rules):
    """Params already laid out on `mesh` (a training state's) are used where they are, so rollout and
    training share one copy; others are split by the rules like a training state's."""
    if _on_mesh(params, mesh):
        return params
    return jax.device_put(params, param_shardings(cfg, mesh, rules))


def sample_rows(params, cfg, rows, *, max_new_tokens, temperature, top_p, top_k, seed, eos_id, stop_table, cache,
                mesh, row_ids, with_logits=False, bucket=MIN_BUCKET, rules=None) -> SampleOutput:
    """`sample` on rows already checked (`check_prompts`), with their stop table (`stop_table_of`) and
    row ids (the random key of row b is folded from row_ids[b])."""
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
        rules, axes, multiple = _placement(mesh, rules)
        batch = _pad_rows(batch, multiple)
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
    check_options(max_new_tokens, temperature, top_p, top_k, cache, seed, cache_modes(config))
    if isinstance(bucket, bool) or not isinstance(bucket, (int, np.integer)) or bucket < 1:
        raise ConfigError(f"bucket: must be an int >= 1, got {bucket!r}")
    if eos_id is not None:
        check_token_id("eos_id", eos_id, config)
    rows = check_prompts(prompts, config, max_new_tokens)
    table = stop_table_of(stop_ids, eos_id, len(rows), config)
    return sample_rows(params, config, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       top_k=top_k, seed=seed, eos_id=eos_id, stop_table=table, cache=cache, mesh=mesh, rules=rules,
                       bucket=prompt_bucket(int(bucket)), row_ids=np.arange(len(rows)),
                       with_logits=bool(return_logits))


def generate(params, config, prompts, *, max_new_tokens, temperature=0.0, top_p=1.0, seed=0,
             eos_id=None) -> np.ndarray:
    """New tokens int32 [batch, max_new_tokens]; greedy when temperature == 0. eos_id None = never
    stop early; after a row emits eos_id the rest of the row is eos_id."""
    return sample(params, config, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                  seed=seed, eos_id=eos_id).tokens


# --------------------------------------------------------------------------- lowering (planning)
# The two halves of `_generate` as programs of their own, for `r1jax plan`: `_start` and `_step` are
# what its trace runs, on the inputs `sample_rows` would place. Every param is an argument (kept when
# unused, like the MTP modules) since the params are resident while sampling; the decode step donates
# its cache, as the while loop updates it in place.


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "cache", "mesh", "axes"), keep_unused=True)
def _prefill_program(params, tokens, lengths, *, cfg, max_new_tokens: int, cache: str, mesh, axes):
    return _start(params, tokens, lengths, max_new_tokens, cfg, cache_modes(cfg)[cache], mesh, axes)


@functools.partial(jax.jit, static_argnames=("prompt_len", "cfg", "cache", "mesh", "axes"), donate_argnames=("kv",),
                   keep_unused=True)
def _decode_program(params, tok, i, lengths, kv, *, prompt_len: int, cfg, cache: str, mesh, axes):
    return _step(params, tok, i, lengths, kv, prompt_len, cfg, cache_modes(cfg)[cache], mesh, axes)


def _trace_prefill(cfg, mesh, batch: int, prompt_len: int, max_new_tokens: int, cache, rules):
    """(the traced prefill, what the decode step needs to be traced alike); nothing allocated."""
    cfg = dropless(cfg, mesh)
    rules, axes, multiple = _placement(mesh, rules)
    rows = -(-batch // multiple) * multiple
    on = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)  # noqa: E731
    params = jax.tree.map(on, param_shapes(cfg), param_shardings(cfg, mesh, rules))
    split = NamedSharding(mesh, PartitionSpec(axes))
    lengths = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=split)
    tokens = jax.ShapeDtypeStruct((rows, prompt_bucket(prompt_len)), jnp.int32, sharding=split)
    static = dict(cfg=cfg, cache=resolve_cache(cfg, cache), mesh=mesh, axes=axes)
    with rules_lib.sharding_context(mesh, rules):
        traced = _prefill_program.trace(params, tokens, lengths, max_new_tokens=int(max_new_tokens), **static)
    return traced, (rules, params, lengths, tokens.shape[1], static)


def lower_prefill(cfg, mesh, batch: int, prompt_len: int, max_new_tokens: int, *, cache: str | None = None,
                  rules=None) -> jax.stages.Lowered:
    """The prefill `sample(..., mesh=mesh, rules=rules)` runs for `batch` prompts of up to `prompt_len`
    tokens (padded to its bucket, rows to the batch split) and `max_new_tokens`, lowered from abstract
    inputs on `mesh` (nothing allocated): params sharded as `_place_params` shards them, tokens and
    lengths split over the batch axes. -> Lowered; outputs: logits [B,W] and the cache {group:
    [Y,B,S,...]}, S = bucket + max_new_tokens - 1, split over the batch axes."""
    traced, context = _trace_prefill(cfg, mesh, batch, prompt_len, max_new_tokens, cache, rules)
    with rules_lib.sharding_context(mesh, context[0]):
        return traced.lower()


def lower_decode(cfg, mesh, batch: int, prompt_len: int, max_new_tokens: int, *, cache: str | None = None,
                 rules=None) -> jax.stages.Lowered:
    """One step of `sample`'s decode loop for the same shapes as `lower_prefill`: its arguments are the
    params, the token fed back [B], the step i, the prompt lengths [B] and the whole cache (donated)."""
    traced, (rules, params, lengths, P, static) = _trace_prefill(cfg, mesh, batch, prompt_len, max_new_tokens,
                                                                  cache, rules)
    cache_split = NamedSharding(mesh, PartitionSpec(None, static["axes"]))
    kv = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cache_split), traced.out_info[1])
    i = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    with rules_lib.sharding_context(mesh, rules):  # the token fed back is an int32 per row, like lengths
        return _decode_program.trace(params, lengths, i, lengths, kv, prompt_len=P, **static).lower()
