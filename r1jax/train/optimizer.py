"""optax optimizer from OptimizerConfig: AdamW, warmup + cosine/linear/constant schedule,
global-norm clipping, no weight decay on norms and biases, frozen router bias."""

from __future__ import annotations

import jax
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


def build(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    lr = schedule(cfg, total_steps)
    parts = []
    if cfg.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    train = optax.chain(*parts)
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, trainable_labels)
