"""The params pytree of a config: its table of ParamSpecs (specs.py, picked by `arch`), abstract shapes,
random init and counts. Init, sharding (`model/sharding.py`), HF conversion and checkpoints all read
`param_table(cfg)`.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp

from r1jax.config import DenseConfig, ModelConfig
from r1jax.model.arch import architecture
from r1jax.model.specs import ParamSpec, is_spec


def stack_layout(cfg: ModelConfig | DenseConfig) -> dict[str, tuple[int, int]]:
    """Stacked group → (first HF layer index, number of layers); empty groups are left out."""
    return {name: (g.first, g.count) for name, g in architecture(cfg).layout(cfg).items()}


def param_table(cfg: ModelConfig | DenseConfig) -> dict:
    """Nested dict of ParamSpec mirroring the params pytree."""
    return architecture(cfg).param_table(cfg)


def param_axes(cfg: ModelConfig):
    """Pytree of logical-axis tuples, same structure as params."""
    return jax.tree.map(lambda s: s.axes, param_table(cfg), is_leaf=is_spec)


def param_dtype(spec: ParamSpec, cfg: ModelConfig):
    return jnp.dtype(spec.dtype or cfg.param_dtype)


def param_shapes(cfg: ModelConfig):
    """Pytree of jax.ShapeDtypeStruct (for abstract init, planning, checkpoint restore)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, param_dtype(s, cfg)), param_table(cfg),
                        is_leaf=is_spec)


def init_params(cfg: ModelConfig, key: jax.Array, out_shardings=None) -> dict:
    """Random params, built in one compiled computation (and directly into `out_shardings` when
    given, so a large model is never materialized on one device). Each leaf's key is folded from
    its path, so adding a parameter elsewhere does not change the others' values."""
    return jax.jit(_init, static_argnums=0, out_shardings=out_shardings)(cfg, key)


def _init(cfg: ModelConfig, key: jax.Array) -> dict:
    table = param_table(cfg)
    flat = jax.tree_util.tree_flatten_with_path(table, is_leaf=is_spec)[0]
    leaves = []
    for path, spec in flat:
        name = jax.tree_util.keystr(path)
        dtype = param_dtype(spec, cfg)
        if spec.init == "ones":
            leaves.append(jnp.ones(spec.shape, dtype))
        elif spec.init == "zeros":
            leaves.append(jnp.zeros(spec.shape, dtype))
        else:
            k = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
            leaves.append((cfg.initializer_range * jax.random.normal(k, spec.shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(jax.tree.structure(table, is_leaf=is_spec), leaves)


def count_params(cfg: ModelConfig, active: bool = False) -> int:
    """Total parameters (or, with active=True, those one token touches: k of E routed experts)."""
    total = 0
    for path, spec in jax.tree_util.tree_flatten_with_path(param_table(cfg), is_leaf=is_spec)[0]:
        n = math.prod(spec.shape)
        if active and "expert" in spec.axes:
            n = n // cfg.n_routed_experts * cfg.num_experts_per_tok
        total += n
    return total
