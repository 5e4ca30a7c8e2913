"""Logical axes -> mesh axes: shardings of optimizer state, batches and activations, and the resolution
the model's parameter shardings use (`model/sharding.py`).

Nothing here knows the model: every parameter's logical axes come from its table (`model/specs.py`), and
activations are named at block boundaries by the model (`constrain(x, ("batch", "length", "act_embed"))`).
A rules table (`MeshConfig.rules`, ordered pairs of logical name -> mesh axes) turns names into a
`PartitionSpec`:

1. Dims are served in the order their logical names appear in the rules (priority).
2. A dim takes, in order, each mesh axis of its rule that no higher-priority dim of the same array
   has taken and that keeps the dim divisible: a 576-wide `kv_lora` dim on a mesh with fsdp=32 is
   replicated over `fsdp` rather than padded. The result is the same on every mesh size, so one
   code path runs from one CPU to a pod; `model.sharding.replicated_dims` lists what fell back, for
   `r1jax plan`. Divisibility that matters for correctness or memory (experts over `expert`, heads
   over `tensor`, the batch over data×fsdp×expert) is checked up front by `parallel.mesh.check_*` as
   ConfigErrors.

Activation constraints are active only inside `sharding_context(mesh, rules)`, entered outside
`jax.jit` around the call that traces; everywhere else `constrain` returns its input unchanged.
Rules are read at trace time: a jitted function already traced under one rules table on a mesh is not
traced again for another table on the same mesh, so build jitted steps per run.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterable, Sequence

import jax
from jax.sharding import NamedSharding, PartitionSpec

from r1jax.config import MeshConfig

Rules = Sequence[tuple[str, Sequence[str]]]


def default_rules() -> Rules:
    return MeshConfig().rule_pairs()


def as_pairs(rules) -> Rules:
    """Rules as ordered (logical name, mesh axes) pairs from a MeshConfig, a mapping, pairs, or None
    (the default table)."""
    if rules is None:
        return default_rules()
    if isinstance(rules, MeshConfig):
        return rules.rule_pairs()
    if hasattr(rules, "items"):
        return tuple((k, tuple(v)) for k, v in rules.items())
    return tuple(rules)


def mesh_sizes(mesh) -> dict[str, int]:
    """{axis name: size} of a Mesh or AbstractMesh."""
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def resolve(names: Sequence[str | None], shape: Sequence[int], rules, sizes: dict[str, int]) -> list:
    """Mesh axes per dim (a tuple, possibly empty) for an array with logical `names` and `shape`."""
    rules = as_pairs(rules)
    rank = {name: i for i, (name, _) in enumerate(rules)}
    table = dict(rules)
    out: list[tuple[str, ...]] = [()] * len(names)
    used: set[str] = set()
    for i in sorted((i for i, n in enumerate(names) if n in table), key=lambda i: rank[names[i]]):
        taken, size = [], 1
        for axis in table[names[i]]:
            if axis in used or axis not in sizes or shape[i] % (size * sizes[axis]):
                continue
            taken.append(axis)
            size *= sizes[axis]
        used.update(taken)
        out[i] = tuple(taken)
    return out


def to_spec(axes: Iterable[tuple[str, ...]]) -> PartitionSpec:
    return PartitionSpec(*[a[0] if len(a) == 1 else (tuple(a) or None) for a in axes])


def logical_spec(names: Sequence[str | None], shape: Sequence[int], rules, sizes: dict[str, int]) -> PartitionSpec:
    """PartitionSpec of an array with logical axis `names` and `shape` on a mesh of `sizes`."""
    return to_spec(resolve(names, shape, rules, sizes))


# --------------------------------------------------------------------------- train state and batches


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state, params_shardings, mesh):
    """Shardings for a whole train state: `params` as given; every optimizer leaf whose path ends
    with a parameter's path and has its shape (Adam's mu and nu) like that parameter; the rest
    (step, counts, RNG key) replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    by_path = {_names(p): s for p, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]}
    shapes = {_names(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(abstract_state.params)[0]}

    def one(path, leaf):
        names = _names(path)
        for i in range(len(names)):
            if names[i:] in by_path and shapes[names[i:]] == leaf.shape:
                return by_path[names[i:]]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_state)


def batch_spec(shape: Sequence[int], rules, sizes: dict[str, int]) -> PartitionSpec:
    """Rows over the `batch` rule's axes; a second dim (positions) over `length`'s; the rest whole.
    One entry per dim, so a 1-D array (one value per row) gets a 1-entry spec."""
    names = ("batch", "length") + (None,) * max(len(shape) - 2, 0)
    return logical_spec(names[: len(shape)], shape, rules, sizes)


def batch_shardings(batch_shapes: dict, mesh, rules=None) -> dict:
    """{name: NamedSharding} for a batch dict of arrays (or ShapeDtypeStructs) of global shape."""
    sizes = mesh_sizes(mesh)
    return {k: NamedSharding(mesh, batch_spec(v.shape, rules, sizes)) for k, v in batch_shapes.items()}


def axes_of(name: str, rules) -> tuple[str, ...]:
    """The mesh axes a logical name's rule lists."""
    return tuple(dict(as_pairs(rules)).get(name, ()))


def split_of(name: str, rules, sizes: dict[str, int]) -> int:
    """How many ways a dim named `name` is split at most (the product of its rule's axis sizes)."""
    return math.prod(sizes.get(a, 1) for a in axes_of(name, rules))


# --------------------------------------------------------------------------- activations


class _Active(threading.local):
    rules: Rules | None = None


_ACTIVE = _Active()


@contextlib.contextmanager
def sharding_context(mesh, rules=None):
    """Activate `mesh` (jax.set_mesh) and the logical rules for the model's activation constraints.
    Enter it around the (first) call of a jitted function: tracing reads it."""
    previous = _ACTIVE.rules
    _ACTIVE.rules = as_pairs(rules)
    # An AbstractMesh (planning for hardware that is not here) can only be lowered for, not run on.
    use = jax.set_mesh if isinstance(mesh, jax.sharding.Mesh) else jax.sharding.use_abstract_mesh
    try:
        with use(mesh):
            yield mesh
    finally:
        _ACTIVE.rules = previous


def active_rules() -> Rules | None:
    """The rules of the enclosing `sharding_context`, or None."""
    return _ACTIVE.rules


def active_sizes() -> dict[str, int]:
    """{axis: size} of the context mesh's automatic (not shard_map-manual) axes; empty without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or _ACTIVE.rules is None:
        return {}
    manual = set(mesh.manual_axes)
    return {a: n for a, n in mesh_sizes(mesh).items() if a not in manual}


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint from logical names (one per dim); the identity outside `sharding_context`."""
    sizes = active_sizes()
    if not sizes:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(names, x.shape, _ACTIVE.rules, sizes))
