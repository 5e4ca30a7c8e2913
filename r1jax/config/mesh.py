"""The device mesh: its axes, the logical-axis rules that map array dimensions onto them, and MeshConfig
(axis sizes, one of which may fill the remaining devices). r1jax/parallel/mesh.py builds the mesh."""

from __future__ import annotations

import dataclasses
import math

from r1jax.config.loader import FrozenDict, need
from r1jax.errors import ConfigError

# Mesh axes, outermost first: `tensor` is innermost so its collectives (every layer, both passes) use
# the fastest links; `data` is outermost because data parallelism only reduces gradients once per step.
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Data-center-network factors for multi-slice (TPU) or multi-node (GPU) meshes: the `data`, `fsdp` and
# `expert` axes are each the product of an in-slice (ICI) factor and a cross-slice (DCN) factor. Tensor
# parallelism never crosses slices.
DCN_AXES = {"dcn_data": "data", "dcn_fsdp": "fsdp", "dcn_expert": "expert"}

# Logical axis name -> mesh axes it is split over. Every logical name in model/params.py has a row, plus
# the activation names the model constrains at block boundaries. The order is a priority: when two dims
# of one array ask for the same mesh axis, the dim whose name comes first here gets it, and the other
# dim keeps only its remaining axes. A dim that would not divide evenly by a mesh axis is replicated
# over that axis instead (see r1jax/parallel/rules.py).
DEFAULT_RULES = {
    # activations
    "batch": ("data", "fsdp", "expert"),  # tokens are split over every axis that is not tensor
    "length": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    # parameters: experts over `expert`, Megatron-style splits over `tensor`, and the model dim (or,
    # for matrices without one, the low-rank dim) over `fsdp` and `expert` (ZeRO-3 over both).
    "expert": ("expert",),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "expert_mlp": ("tensor",),
    "vocab": ("tensor",),
    "embed": ("fsdp", "expert"),
    "q_lora": ("fsdp", "expert"),
    "kv_lora": ("fsdp", "expert"),
    "mtp_concat": (),
    "router_experts": (),
    "qk_dim": (),
    "kv_dim": (),
    "v_dim": (),
    "layers": (),  # the scan axis: every device holds its share of every layer
    "norm": (),
}


def _rule_axes(value, key: str) -> tuple[str, ...]:
    """A rule's value as a tuple of mesh axes: null/[] (replicated), a name, or a list of names."""
    if value is None:
        return ()
    axes = (value,) if isinstance(value, str) else value
    need(isinstance(axes, (list, tuple)) and all(isinstance(a, str) for a in axes), key,
         f"expected a mesh axis name, a list of them, or null, got {value!r}")
    for a in axes:
        need(a in MESH_AXES, key, f"unknown mesh axis {a!r}; valid: {', '.join(MESH_AXES)}")
    need(len(set(axes)) == len(axes), key, f"names a mesh axis twice: {list(axes)}")
    return tuple(axes)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes of the `data`, `fsdp`, `expert` and `tensor` axes (one of them may be -1:
    all remaining devices), cross-slice factors, and the logical-axis rules.

    `rules` maps logical axis names to mesh axes; a YAML/override value replaces that name's row of
    `DEFAULT_RULES` and keeps the rest (`mesh.rules.vocab=null`, `mesh.rules.embed=[fsdp]`).
    """

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_expert: int = 1
    rules: FrozenDict = dataclasses.field(default_factory=lambda: FrozenDict(DEFAULT_RULES))

    def __post_init__(self):
        for key in MESH_AXES + tuple(DCN_AXES):
            v = getattr(self, key)
            need(v == -1 or v >= 1, key, f"must be >= 1 or -1 (fill the remaining devices), got {v}")
        for group, what in ((MESH_AXES, "in-slice"), (tuple(DCN_AXES), "cross-slice")):
            fill = [k for k in group if getattr(self, k) == -1]
            if len(fill) > 1:
                raise ConfigError(f"{fill[1]}: only one {what} axis may be -1, got {', '.join(fill)}")
        rules = dict(DEFAULT_RULES)
        for name, value in dict(self.rules or {}).items():
            need(name in DEFAULT_RULES, f"rules.{name}", f"unknown logical axis; valid: {', '.join(DEFAULT_RULES)}")
            rules[name] = _rule_axes(value, f"rules.{name}")
        object.__setattr__(self, "rules", FrozenDict(rules))

    def rule_pairs(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The rules as ordered (logical name, mesh axes) pairs, highest priority first."""
        return tuple((k, tuple(v)) for k, v in self.rules.items())

    def shape(self, num_devices: int, num_slices: int = 1) -> dict[str, int]:
        """{mesh axis: size} for `num_devices` devices in `num_slices` slices; -1 filled. The ICI factors
        tile one slice, the DCN factors tile the slices."""
        dcn = _fill({k: getattr(self, k) for k in DCN_AXES}, num_slices, "slices")
        if num_devices % num_slices:
            raise ConfigError(f"dcn_data: {num_devices} devices do not split into {num_slices} equal slices")
        ici = _fill({k: getattr(self, k) for k in MESH_AXES}, num_devices // num_slices,
                    "devices" + (" per slice" if num_slices > 1 else ""))
        return {a: ici[a] * dcn.get(f"dcn_{a}", 1) for a in MESH_AXES}

    def ici_dcn(self, num_devices: int, num_slices: int) -> tuple[dict[str, int], dict[str, int]]:
        """(in-slice sizes, cross-slice sizes) per mesh axis, for building a hybrid mesh."""
        dcn = _fill({k: getattr(self, k) for k in DCN_AXES}, num_slices, "slices")
        ici = _fill({k: getattr(self, k) for k in MESH_AXES}, num_devices // num_slices, "devices per slice")
        return ici, {a: dcn.get(f"dcn_{a}", 1) for a in MESH_AXES}


def _fill(sizes: dict[str, int], total: int, what: str) -> dict[str, int]:
    """Replace a -1 by what makes the product equal `total`; a wrong product names the keys."""
    known = math.prod(v for v in sizes.values() if v != -1)
    names = "×".join(sizes)
    values = "×".join(str(v) for v in sizes.values())
    fill = [k for k, v in sizes.items() if v == -1]
    if fill:
        if total % known:
            raise ConfigError(f"{fill[0]}: -1 cannot fill the mesh: {total} {what} are not divisible by the "
                              f"other axes' product {known} ({names} = {values})")
        return {k: (total // known if v == -1 else v) for k, v in sizes.items()}
    if known != total:
        raise ConfigError(f"{next(iter(sizes))}: the mesh {names} = {values} = {known} does not match the "
                          f"{total} {what} (set one axis to -1 to fill the rest)")
    return dict(sizes)


