"""optax optimizer from OptimizerConfig: AdamW, warmup + cosine/linear/constant schedule,
global-norm clipping, no weight decay on norms and biases, frozen router bias; Adam's moments stored in
fp32 (optax as is) or bf16 (DeepSeek-V3 §3.3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from r1jax.config import OptimizerConfig


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    decay_steps = max((cfg.decay_steps or total_steps) - cfg.warmup_steps, 1)
    end = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == "linear":
        main = optax.linear_schedule(cfg.learning_rate, end, decay_steps)
    else:
        main = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps == 0:
        return main
    warm = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optax.join_schedules([warm, main], [cfg.warmup_steps])


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def decay_mask(params):
    """Weight decay only on matrices: not on norms, biases or the router bias. Names decide, not ndim
    alone: a norm or bias stacked over layers is 2-D."""
    return jax.tree_util.tree_map_with_path(
        lambda p, a: a.ndim > 1 and not _leaf_name(p).endswith(("norm", "bias")), params)


def trainable_labels(params):
    """'frozen' for the router bias, which moves by the balancing rule, never by gradient (V3 §2.1.2)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, a: "frozen" if _leaf_name(p) == "router_bias" else "train", params)


def scale_by_adam_stored(b1: float, b2: float, eps: float, dtype) -> optax.GradientTransformation:
    """optax.scale_by_adam with μ and ν stored in `dtype`: each update upcasts them to fp32, runs
    optax's own update there (moments, bias correction, μ̂/(√ν̂+ε) all in fp32) and rounds the new μ,
    ν to `dtype` for storage. optax's mu_dtype alone would not do: its ν stays in the params' dtype, and
    with a bf16 state its `b·m` would be computed in bf16 before the fp32 add."""
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def stored(state, to):
        cast = lambda t: t.astype(to)  # noqa: E731
        return state._replace(mu=jax.tree.map(cast, state.mu), nu=jax.tree.map(cast, state.nu))

    def update(updates, state, params=None):
        updates, new = inner.update(updates, stored(state, jnp.float32), params)
        return updates, stored(new, dtype)

    return optax.GradientTransformation(lambda params: stored(inner.init(params), dtype), update)


def adamw(cfg: OptimizerConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    """optax.adamw for fp32 moments (bit-identical to before the option); for bf16, the same chain
    (adam, masked decay, learning rate) with the adam step storing its moments in bf16."""
    if cfg.moment_dtype == "float32":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                           mask=decay_mask)
    return optax.chain(scale_by_adam_stored(cfg.b1, cfg.b2, cfg.eps, jnp.dtype(cfg.moment_dtype)),
                       optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                       optax.scale_by_learning_rate(lr))


def build(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(adamw(cfg, lr))
    train = optax.chain(*parts)
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, trainable_labels)
