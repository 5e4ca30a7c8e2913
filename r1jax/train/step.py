"""The jitted train step: micro-batch gradient accumulation, one optimizer update, then the
aux-loss-free router-bias update (V3 §2.1.2) outside the gradient. With logit distillation the step
also takes the frozen teacher's params; its forward runs outside the gradient (train/distill.py).

Legend: A accumulation micro-steps · B batch rows · T positions · L MoE layers · E routed experts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from r1jax.config import DistillConfig, ModelConfig
from r1jax.model.params import param_shapes
from r1jax.model.sharding import param_shardings
from r1jax.parallel import rules as parallel_rules
from r1jax.train import distill, losses


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
    distill: Optional[DistillConfig] = None  # set: the step takes the teacher's params as a third argument
    loss_chunk: int = 0  # positions per vocabulary projection in the LM loss; 0: all at once

    @classmethod
    def of(cls, cfg) -> "StepOptions":
        """The step options a TrainConfig asks for."""
        return cls(mtp_weight=cfg.mtp_loss_weight, balance_alpha=cfg.balance_loss_alpha,
                   bias_rate=cfg.router_bias_update_rate, grad_accum_steps=cfg.optimizer.grad_accum_steps,
                   distill=cfg.distill, loss_chunk=cfg.loss_chunk)


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


def _objective(cfg: ModelConfig, opts: StepOptions, teacher_cfg):
    """(params, batch, teacher features or None, **scaling) -> (loss, aux): lm_loss, or the
    distillation loss when opts.distill is set."""
    common = dict(mtp_weight=opts.mtp_weight, balance_alpha=opts.balance_alpha)
    if opts.distill is None:
        return lambda p, b, _, **kw: losses.lm_loss(p, b, cfg, **common, loss_chunk=opts.loss_chunk, **kw)
    return lambda p, b, t, **kw: distill.distill_loss(p, b, t, cfg, teacher_cfg, opts.distill, **common, **kw)


def grads_and_aux(params, batch, cfg: ModelConfig, opts: StepOptions, teacher=None, teacher_cfg=None):
    """Mean gradient over A micro-batches (token-weighted CE across micro-batches) and summed stats.
    With opts.distill, `teacher` holds the teacher's params (config `teacher_cfg`); its forward for each
    micro-batch runs outside the gradient."""
    objective = _objective(cfg, opts, teacher_cfg)

    def features(b):
        return None if opts.distill is None else distill.teacher_features(teacher, b, teacher_cfg)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if opts.grad_accum_steps == 1:
        (_, aux), grads = grad_fn(params, batch, features(batch))
        return grads, aux
    a = opts.grad_accum_steps
    micro = _split_micro(batch, a)
    total_tokens = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    grad_fn = jax.value_and_grad(
        functools.partial(objective, ce_denominator=total_tokens, other_scale=1.0 / a), has_aux=True)

    def body(carry, mb):
        g_acc, aux_acc = carry
        (_, aux), g = grad_fn(params, mb, features(mb))
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, aux_acc, aux)), None

    mb0 = jax.tree.map(lambda x: x[0], micro)
    (_, aux0), g0 = grad_fn(params, mb0, features(mb0))
    (grads, aux), _ = jax.lax.scan(body, (g0, aux0), jax.tree.map(lambda x: x[1:], micro))
    for k in ("mtp_ce", "balance_loss"):  # summed over micro-batches; report means
        if k in aux:
            aux[k] = aux[k] / a
    main = aux["ce"] if opts.distill is None else distill.mix(aux["ce"], aux["kl"], opts.distill.alpha)
    aux["loss"] = (main + opts.mtp_weight * aux.get("mtp_ce", 0.0)
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


def train_step(state: TrainState, batch: dict, teacher: dict | None = None, *, cfg: ModelConfig,
               tx: optax.GradientTransformation, opts: StepOptions, teacher_cfg=None):
    """One optimizer update (`teacher`: the frozen teacher's params under distillation).
    -> new state, metrics (scalars and per-layer vectors)."""
    grads, aux = grads_and_aux(state.params, batch, cfg, opts, teacher, teacher_cfg)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = update_router_bias(params, aux.get("moe"), opts.bias_rate, "moe_layers")
    params = update_router_bias(params, aux.get("mtp_moe"), opts.bias_rate, "mtp")
    metrics = {k: aux[k] for k in ("loss", "ce", "mtp_ce", "balance_loss", "tokens") if k in aux}
    if opts.distill is not None:
        metrics["loss/ce"] = metrics.pop("ce")
        metrics["loss/kl"] = aux["kl"]
        metrics["distill/top1_agreement"] = aux["top1_agreement"]
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
    their params, the rest replicated), the batch (rows over the batch axes), replicated metrics, and
    under distillation the teacher's params (by the same rules)."""

    state: Any
    batch: dict
    metrics: Any
    teacher: Any = None


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The TrainState's shapes and dtypes, nothing allocated."""
    return jax.eval_shape(lambda p: init_state(p, tx, seed), param_shapes(cfg))


def step_shardings(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh, rules,
                   batch_shapes: dict, teacher_cfg=None) -> tuple[TrainState, StepShardings]:
    """(abstract state, shardings) of a train step on `mesh` under `rules` (a MeshConfig or pairs)."""
    state = abstract_state(cfg, tx, seed)
    params = param_shardings(cfg, mesh, rules)
    teacher = None if teacher_cfg is None else param_shardings(teacher_cfg, mesh, rules)
    return state, StepShardings(state=parallel_rules.state_shardings(state, params, mesh),
                                batch=parallel_rules.batch_shardings(batch_shapes, mesh, rules),
                                metrics=NamedSharding(mesh, PartitionSpec()), teacher=teacher)


def make_train_step(cfg: ModelConfig, tx: optax.GradientTransformation, opts: StepOptions,
                    shardings: StepShardings | None = None, teacher_cfg=None):
    """The jitted step `(state, batch) -> (state, metrics)`, or with opts.distill
    `(state, batch, teacher_params) -> ...` for a teacher of config `teacher_cfg`; with `shardings`,
    compiled for them (call it inside `parallel.rules.sharding_context` so the activation constraints
    and expert exchange see the mesh)."""
    if (opts.distill is None) != (teacher_cfg is None):
        raise ValueError("make_train_step: teacher_cfg is given exactly when opts.distill is set")
    fn = functools.partial(train_step, cfg=cfg, tx=tx, opts=opts, teacher_cfg=teacher_cfg)
    if shardings is None:
        return jax.jit(fn, donate_argnums=0)
    ins = (shardings.state, shardings.batch) + (() if teacher_cfg is None else (shardings.teacher,))
    return jax.jit(fn, in_shardings=ins, out_shardings=(shardings.state, shardings.metrics), donate_argnums=0)
