"""The params' shardings on a mesh: each leaf's logical axes (the param table) resolved by the rules
(`parallel/rules.py`, which knows nothing of the model)."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding

from r1jax.config import ModelConfig
from r1jax.model.params import param_table
from r1jax.model.specs import is_spec
from r1jax.parallel.rules import as_pairs, logical_spec, mesh_sizes, resolve


def param_specs(cfg: ModelConfig, mesh, rules=None):
    """Pytree of PartitionSpec mirroring the params, from the param table's logical axes."""
    sizes = mesh_sizes(mesh)
    return jax.tree.map(lambda s: logical_spec(s.axes, s.shape, rules, sizes), param_table(cfg), is_leaf=is_spec)


def param_shardings(cfg: ModelConfig, mesh, rules=None):
    """Pytree of NamedSharding mirroring the params (`rules`: a MeshConfig, mapping or pairs;
    None: the default table)."""
    return jax.tree.map(lambda p: NamedSharding(mesh, p), param_specs(cfg, mesh, rules))


def replicated_dims(cfg: ModelConfig, mesh, rules=None) -> list[str]:
    """Dims replicated over a mesh axis (of size > 1) that their rule names, because the dim does not
    divide by it (axes taken by a higher-priority dim of the same array are not listed)."""
    sizes = mesh_sizes(mesh)
    table = dict(as_pairs(rules))
    out = []
    flat = jax.tree_util.tree_flatten_with_path(param_table(cfg), is_leaf=is_spec)[0]
    for path, s in flat:
        got = resolve(s.axes, s.shape, rules, sizes)
        used = {a for axes in got for a in axes}
        for dim, name in enumerate(s.axes):
            missing = [a for a in table.get(name, ()) if a not in used and sizes.get(a, 1) > 1]
            for a in missing:
                out.append(f"{jax.tree_util.keystr(path)}[{dim}] ({name}={s.shape[dim]}): not split over "
                           f"{a}={sizes[a]}")
    return out
