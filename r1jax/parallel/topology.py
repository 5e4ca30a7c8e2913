"""TPU topologies that are not attached: their devices, for compiling with the real TPU compiler here.

libtpu (the TPU PJRT plugin, `pip install r1jax[test]` on linux x86_64) describes any slice by name
and hands out compile-only devices with the real chip coordinates; `parallel.mesh.build_mesh` lays a
mesh over them and `jit(...).lower(...).compile()` runs XLA:TPU, whose `memory_analysis()` is the
per-chip memory the step will need. No TPU is touched; JAX_PLATFORMS may stay `cpu`.

Names: a libtpu topology string (`v5p:4x4x4`, `v5e:4x4`, `v6e:8x8`, `v4:2x2x4`: chips along each
torus axis) or a Cloud TPU slice name (`v5p-128`, `v4-32`: TensorCores, two per v4/v5p chip;
`v5e-16`, `v5litepod-16`, `v6e-64`: chips).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from r1jax.errors import ConfigError

GiB = 2**30

# HBM per chip a program may use, as XLA:TPU (libtpu 0.0.42) allows it: the "available HBM" of its
# out-of-memory refusal (compile-only devices have no memory_stats()). The documented totals are v4
# 32 GiB, v5e 16 GiB, v5p 95.74 GiB, v6e 32 GiB; the runtime keeps the difference for itself.
HBM_BYTES = {"TPU v4": 30.75 * GiB, "TPU v5": 95.74 * GiB, "TPU v5 lite": 15.75 * GiB, "TPU v6 lite": 31.25 * GiB}

# Chips -> torus layout of the standard slices (the Cloud TPU tables). 3-D: v4 and v5p; 2-D: v5e, v6e.
_CUBE = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
         512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_PLANE = {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# Slice-name generation -> (libtpu generation, cores per chip in the slice name, layouts).
_FAMILIES = {"v4": ("v4", 2, _CUBE), "v5p": ("v5p", 2, _CUBE), "v5e": ("v5e", 1, _PLANE),
             "v5litepod": ("v5e", 1, _PLANE), "v6e": ("v6e", 1, _PLANE)}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # as the user wrote it
    layout: str  # libtpu's topology string, e.g. v5p:4x4x4
    slices: int = 1


def parse_topology(name: str, slices: int = 1, key: str = "--topology") -> Topology:
    """A slice name or topology string checked and resolved (no libtpu needed); errors name `key`."""
    if slices < 1:
        raise ConfigError(f"--slices: must be >= 1, got {slices}")
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if m:
        gen, per_chip, layouts = _FAMILIES[m[1]]
        chips, rest = divmod(int(m[2]), per_chip)
        if rest or chips not in layouts:
            sizes = ", ".join(f"{m[1]}-{c * per_chip}" for c in layouts)
            raise ConfigError(f"{key}: unknown slice {name!r}; known {m[1]} slices: {sizes} (or a topology "
                              f"string like {gen}:{layouts[64]})")
        return Topology(name, f"{gen}:{layouts[chips]}", slices)
    m = re.fullmatch(r"(v4|v5|v5p|v5e|v6e):(\d+(?:x\d+){1,2})", name)
    if m:
        dims = 2 if m[1] in ("v5e", "v6e") else 3
        if m[2].count("x") + 1 != dims:
            raise ConfigError(f"{key}: {m[1]} chips form a {dims}-D torus, got {name!r}")
        return Topology(name, name, slices)
    raise ConfigError(f"{key}: unknown topology {name!r}; expected a slice name (v5p-128, v4-32, v5e-16, "
                      f"v5litepod-16, v6e-64) or a topology string (v5p:4x4x4, v5e:4x4, v6e:8x8)")


def require_libtpu(key: str = "--topology") -> None:
    """Fail early, naming `key`, when the TPU compiler is not installed."""
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"{key}: compiling for a TPU topology needs libtpu, the TPU compiler: "
                          f"pip install 'libtpu==0.0.42.*' (jax 0.10.2's pair; in r1jax's `test` extra)")


def topology_devices(topo: Topology) -> list:
    """The compile-only devices of `topo` (all slices), from libtpu."""
    require_libtpu()
    # Another process may hold an attached TPU's libtpu lock; describing a topology needs no TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    # v4's chips show one device each (megacore), as on a v4 VM; v5p is megacore by default.
    kw = {"chip_config_name": "megacore"} if topo.layout.startswith("v4:") else {}
    if topo.slices > 1:
        kw["num_slices"] = topo.slices
    try:
        return list(topologies.get_topology_desc(topology_name=topo.layout, platform="tpu", **kw).devices)
    except Exception as e:  # libtpu's JaxRuntimeError: an invalid layout for this generation
        raise ConfigError(f"--topology: libtpu rejects {topo.layout!r}: {str(e).splitlines()[0]}") from None


def hbm_bytes(device) -> float:
    """HBM of the chip behind `device` (the documented figure; see HBM_BYTES)."""
    if device.device_kind not in HBM_BYTES:
        raise ConfigError(f"--topology: no HBM figure for {device.device_kind!r}; known: {', '.join(HBM_BYTES)}")
    return HBM_BYTES[device.device_kind]
