"""The jitted train step: micro-batch gradient accumulation, one optimizer update, then the
aux-loss-free router-bias update (V3 §2.1.2) outside the gradient.

Legend: A accumulation micro-steps · B batch rows · T positions · L MoE layers · E routed experts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from r1jax.config import ModelConfig
from r1jax.model.params import param_shapes
from r1jax.parallel import rules as parallel_rules
from r1jax.train import losses


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The static knobs of a train step (hashable: part of the jit cache key)."""

    mtp_weight: float = 0.3
    balance_alpha: float = 1e-4
    bias_rate: float = 0.001  # γ of the router-bias update; 0 turns it off
    grad_accum_steps: int = 1


def init_state(params: dict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key(seed))


def update_router_bias(params: dict, moe_stats: dict | None, rate: float, group: str = "moe_layers") -> dict:
    """b_i += γ·sign(mean_load − load_i) per MoE layer, over the step's tokens (V3 eq. after 16)."""
    if moe_stats is None or rate == 0 or group not in params or "router_bias" not in params[group]["mlp"]:
        return params
    load = moe_stats["load"]  # [L, E]
    delta = rate * jnp.sign(load.mean(-1, keepdims=True) - load)
    mlp = dict(params[group]["mlp"])
    mlp["router_bias"] = mlp["router_bias"] + delta.astype(mlp["router_bias"].dtype)
    return {**params, group: {**params[group], "mlp": mlp}}


def _split_micro(batch: dict, a: int) -> dict:
    return jax.tree.map(lambda x: x.reshape((a, x.shape[0] // a) + x.shape[1:]), batch)


def grads_and_aux(params, batch, cfg: ModelConfig, opts: StepOptions):
    """Mean gradient over A micro-batches (token-weighted CE across micro-batches) and summed stats."""
    loss_fn = functools.partial(losses.lm_loss, cfg=cfg, mtp_weight=opts.mtp_weight,
                                balance_alpha=opts.balance_alpha)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if opts.grad_accum_steps == 1:
        (_, aux), grads = grad_fn(params, batch)
        return grads, aux
    a = opts.grad_accum_steps
    micro = _split_micro(batch, a)
    total_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, ce_denominator=total_tokens, other_scale=1.0 / a), has_aux=True)

    def body(carry, mb):
        g_acc, aux_acc = carry
        (_, aux), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, aux_acc, aux)), None

    (_, aux0), g0 = grad_fn(params, jax.tree.map(lambda x: x[0], micro))
    (grads, aux), _ = jax.lax.scan(body, (g0, aux0), jax.tree.map(lambda x: x[1:], micro))
    for k in ("mtp_ce", "balance_loss"):  # summed over micro-batches; report means
        if k in aux:
            aux[k] = aux[k] / a
    aux["loss"] = (aux["ce"] + opts.mtp_weight * aux.get("mtp_ce", 0.0)
                   + opts.balance_alpha * aux.get("balance_loss", 0.0))
    return grads, aux


def load_metrics(load: jax.Array, prefix: str) -> dict:
    """Expert-load summary per MoE layer: max/min ratio, std/mean (0 = perfectly even)."""
    mean = jnp.maximum(load.mean(-1), 1e-9)
    return {
        f"{prefix}/load_max_over_mean": load.max(-1) / mean,
        f"{prefix}/load_min_over_mean": load.min(-1) / mean,
        f"{prefix}/load_cv": load.std(-1) / mean,
    }


def train_step(state: TrainState, batch: dict, *, cfg: ModelConfig, tx: optax.GradientTransformation,
               opts: StepOptions):
    """One optimizer update. -> new state, metrics (scalars and per-layer vectors)."""
    grads, aux = grads_and_aux(state.params, batch, cfg, opts)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = update_router_bias(params, aux.get("moe"), opts.bias_rate, "moe_layers")
    params = update_router_bias(params, aux.get("mtp_moe"), opts.bias_rate, "mtp")
    metrics = {k: aux[k] for k in ("loss", "ce", "mtp_ce", "balance_loss", "tokens") if k in aux}
    metrics["grad_norm"] = optax.global_norm(grads)
    metrics["param_norm"] = optax.global_norm(params)
    if "moe" in aux:
        metrics.update(load_metrics(aux["moe"]["load"], "moe"))
        metrics["moe/dropped"] = aux["moe"]["dropped"].sum()
        if "router_bias" in params["moe_layers"]["mlp"]:
            metrics["moe/bias_norm"] = jnp.linalg.norm(params["moe_layers"]["mlp"]["router_bias"], axis=-1)
    metrics["finite"] = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    # A non-finite step leaves params and optimizer state untouched: the last good values survive.
    keep = lambda n, o: jnp.where(metrics["finite"], n, o)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where a sharded step's inputs and outputs live: the state (params by the rules, Adam moments like
    their params, the rest replicated), the batch (rows over the batch axes) and replicated metrics."""

    state: Any
    batch: dict
    metrics: Any


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The TrainState's shapes and dtypes, nothing allocated."""
    return jax.eval_shape(lambda p: init_state(p, tx, seed), param_shapes(cfg))


def step_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh, rules,
                   batch_shapes: dict) -> tuple[TrainState, StepShardings]:
    """(abstract state, shardings) of a train step on `mesh` under `rules` (a MeshConfig or pairs)."""
    state = abstract_state(cfg, tx, seed)
    params = parallel_rules.param_shardings(cfg, mesh, rules)
    return state, StepShardings(state=parallel_rules.state_shardings(state, params, mesh),
                                batch=parallel_rules.batch_shardings(batch_shapes, mesh, rules),
                                metrics=NamedSharding(mesh, PartitionSpec()))


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, opts: StepOptions,
                    shardings: StepShardings | None = None):
    """The jitted step; with `shardings`, compiled for them (call it inside
    `parallel.rules.sharding_context` so the activation constraints and expert exchange see the mesh)."""
    fn = functools.partial(train_step, cfg=cfg, tx=tx, opts=opts)
    if shardings is None:
        return jax.jit(fn, donate_argnums=0)
    return jax.jit(fn, in_shardings=(shardings.state, shardings.batch),
                   out_shardings=(shardings.state, shardings.metrics), donate_argnums=0)
