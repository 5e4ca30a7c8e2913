"""GRPO's policy update: one rollout's rows split into `rollout_batches` mini-batches of
`optimizer.grad_accum_steps` micro-batches each, one optimizer step per mini-batch, μ = num_iterations
passes over the mini-batches, π_old fixed for the whole rollout (docs/grpo.md, "Rollout mini-batches").

Legend: N rollout rows (P prompts × G) · M mini-batches · A micro-batches per mini-batch · K = M·A
· n = N / K rows per micro-batch · L completion tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from r1jax.config import GRPOConfig, ModelConfig
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import rules as rules_lib
from r1jax.rl import grpo
from r1jax.train.step import update_router_bias


@flax.struct.dataclass
class GRPOState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array
    ref_params: dict  # π_ref (empty when beta = 0)


def micro_batches(cfg: GRPOConfig) -> int:
    """K = rollout_batches × optimizer.grad_accum_steps micro-batches per rollout."""
    return cfg.rollout_batches * cfg.optimizer.grad_accum_steps


def optimizer_steps(cfg: GRPOConfig) -> int:
    """Optimizer steps per rollout (per GRPO `step`): one per mini-batch per pass, M · μ."""
    return cfg.rollout_batches * cfg.num_iterations


def needs_old_logprobs(cfg: GRPOConfig) -> bool:
    """π_old's log-probs need their own pass once a rollout has more than one optimizer step; with one,
    π_old is the updated params themselves (the update's forward, detached). TRL decides the same."""
    return optimizer_steps(cfg) > 1


def row_order(n_rows: int, cfg: GRPOConfig, step: int) -> np.ndarray:
    """The order the rollout's rows are laid out in for the update: a random split into mini-batches
    (R1 §2.3, TRL shuffles too; seeded by (seed, step), so every process agrees), interleaved so that
    micro-batch k is rows k, k+K, k+2K, …: a device's contiguous rows then hold its share of every
    micro-batch, and slicing one out moves no data. Identity with one micro-batch."""
    K = micro_batches(cfg)
    if K == 1:
        return np.arange(n_rows)
    perm = np.random.default_rng((cfg.seed, step)).permutation(n_rows) if cfg.rollout_batches > 1 else np.arange(n_rows)
    return perm.reshape(K, n_rows // K).T.reshape(-1)


def batch_shapes(cfg: GRPOConfig) -> dict:
    """Global shapes of one rollout's training batch: N = prompts.batch_size × num_generations rows."""
    N, Lp, M = cfg.prompts.batch_size * cfg.num_generations, cfg.prompts.seq_len, cfg.max_new_tokens
    S = jax.ShapeDtypeStruct
    shapes = {k: S((N, Lp + M), jnp.int32) for k in ("tokens", "positions", "segment_ids")}
    shapes.update(completion_mask=S((N, M), jnp.bool_), advantages=S((N,), jnp.float32),
                  sample_mask=S((N,), jnp.bool_))
    if needs_old_logprobs(cfg):
        shapes["old_logp"] = S((N, M), jnp.float32)
    if cfg.beta > 0:
        shapes["ref_logp"] = S((N, M), jnp.float32)
    return shapes


def batch_shardings(shapes: dict, mesh, rules) -> dict:
    """Rows over the `batch` rule's axes (data×fsdp×expert), positions over `length`'s."""
    return rules_lib.batch_shardings(shapes, mesh, rules)


def init_state(params: dict, tx: optax.GradientTransformation, cfg: GRPOConfig) -> GRPOState:
    # copy: π_ref must not share buffers with the params the update donates.
    ref = jax.tree.map(jnp.copy, params) if cfg.beta > 0 else {}
    return GRPOState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(cfg.seed), ref)


def check_mesh(cfg: GRPOConfig, model_cfg, shape: dict[str, int]) -> None:
    """What must divide, before anything is compiled: experts and heads, the rollout rows over the batch
    axes (sampling), and each micro-batch's rows over them too (the update)."""
    mesh_lib.check_model(model_cfg, shape)
    rows = cfg.prompts.batch_size * cfg.num_generations
    mesh_lib.check_batch(rows, shape, "prompts.batch_size × num_generations", cfg.mesh)
    if micro_batches(cfg) > 1:
        mesh_lib.check_batch(rows // micro_batches(cfg), shape, "prompts.batch_size × num_generations / "
                             "(rollout_batches × optimizer.grad_accum_steps)", cfg.mesh)


def _split(batch: dict, M: int, A: int) -> dict:
    """[N, ...] laid out by `row_order` -> [M, A, N/(M·A), ...], rows still over the batch axes."""
    def one(x):
        n = x.shape[0] // (M * A)
        y = x.reshape((n, M, A) + x.shape[1:])
        y = jnp.moveaxis(y, 0, 2)
        return rules_lib.constrain(y, (None, None, "batch", "length")[: y.ndim])
    return jax.tree.map(one, batch)


def _normalisers(split: dict, gcfg: GRPOConfig):
    """Per mini-batch: its completion rows [M] (sequence_mean, fixed_length); the rollout's tokens / M
    (token_mean: TRL's DAPO normaliser, the rollout's mean tokens per mini-batch)."""
    mask = split["completion_mask"]
    M = mask.shape[0]
    if "sample_mask" in split:
        rows = split["sample_mask"].astype(jnp.float32)
    else:
        rows = jnp.ones(mask.shape[:3], jnp.float32)
    if gcfg.masked_rows == "skip" and gcfg.loss_aggregation == "sequence_mean":
        rows = rows * mask.any(-1)  # only rows with a token to train count (r1jax before TRL parity)
    tokens = mask.astype(jnp.float32).sum() / M
    return rows.sum((1, 2)), tokens


def _mini_batch_grads(params, mini: dict, rows, tokens, cfg: ModelConfig, gcfg: GRPOConfig):
    """Σ over the A micro-batches of the gradient of their share of the mini-batch loss (the shares add
    up to the mini-batch's loss: the normalisers are the mini-batch's). -> grads, metrics."""
    grad_fn = jax.value_and_grad(functools.partial(grpo.loss_fn, cfg=cfg, gcfg=gcfg, rows=rows, tokens=tokens),
                                 has_aux=True)
    A = jax.tree.leaves(mini)[0].shape[0]
    if A == 1:
        (_, metrics), grads = grad_fn(params, jax.tree.map(lambda x: x[0], mini))
        return grads, metrics

    def body(acc, micro):
        (_, m), g = grad_fn(params, micro)
        return jax.tree.map(jnp.add, acc, (g, m)), None

    first = jax.tree.map(lambda x: x[0], mini)
    (_, m0), g0 = grad_fn(params, first)
    (grads, metrics), _ = jax.lax.scan(body, (g0, m0), jax.tree.map(lambda x: x[1:], mini))
    # The loss and MoE load are sums over micro-batches; the per-token statistics become their mean.
    metrics = {k: v if k in ("loss", "moe_load") else v / A for k, v in metrics.items()}
    return grads, metrics


def update(state: GRPOState, batch: dict, *, cfg: ModelConfig, gcfg: GRPOConfig, tx):
    """Every optimizer step of one rollout: μ passes over its M mini-batches (TRL's order), each step
    on one mini-batch's micro-batches, π_old = the batch's old_logp (absent: the params themselves, one
    step per rollout), then step + 1. The batch's rows are laid out by `row_order`.
    -> new state, metrics of every optimizer step, stacked [μ·M]."""
    M, A = gcfg.rollout_batches, gcfg.optimizer.grad_accum_steps
    split = _split(batch, M, A)
    rows, tokens = _normalisers(split, gcfg)

    def one(st, m):
        mini = jax.tree.map(lambda x: x[m], split)
        grads, metrics = _mini_batch_grads(st.params, mini, rows[m], tokens, cfg, gcfg)
        updates, opt_state = tx.update(grads, st.opt_state, st.params)
        metrics["grad_norm"] = optax.global_norm(grads)
        params = optax.apply_updates(st.params, updates)
        # V3's aux-loss-free balancing keeps running in RL: b_i += γ·sign(mean load − load_i).
        load = metrics.pop("moe_load", None)
        params = update_router_bias(params, None if load is None else {"load": load}, gcfg.router_bias_update_rate)
        return st.replace(params=params, opt_state=opt_state), metrics

    order = jnp.tile(jnp.arange(M), gcfg.num_iterations)
    state, metrics = jax.lax.scan(one, state, order)
    return state.replace(step=state.step + 1), metrics


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled pieces of a GRPO step on one mesh (call them inside its sharding_context)."""

    logprobs: Callable  # (params, batch) -> completion log-probs [N, M] at the sampling temperature
    update: Callable  # (state, batch) -> (state, metrics [μ·M]); donates the state
    refresh: Callable  # params -> a copy for π_ref


def make_steps(model_cfg, cfg: GRPOConfig, tx, state_sh: GRPOState, batch_sh: dict, mesh) -> Steps:
    replicated = NamedSharding(mesh, PartitionSpec())
    inputs = {k: v for k, v in batch_sh.items() if k not in ("old_logp", "ref_logp")}
    logprobs = jax.jit(functools.partial(grpo.completion_logprobs, cfg=model_cfg, gcfg=cfg),
                       in_shardings=(state_sh.params, inputs),
                       out_shardings=batch_sh["completion_mask"])  # [N, M], laid out like the mask
    step = jax.jit(functools.partial(update, cfg=model_cfg, gcfg=cfg, tx=tx), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, replicated), donate_argnums=0)
    refresh = jax.jit(lambda p: jax.tree.map(jnp.copy, p), in_shardings=(state_sh.params,),
                      out_shardings=state_sh.params)
    return Steps(logprobs, step, refresh)
