"""r1jax compiled by the real TPU compiler (libtpu) for TPU slices that are not attached, on this CPU host.

libtpu describes a slice by name and hands out compile-only devices with the chips' torus coordinates
(r1jax/parallel/topology.py); the meshes are laid over them and XLA:TPU compiles the train step. The
tests that need libtpu are skipped, with the reason, only when it is not importable (it installs on
linux x86_64 only: the `test` extra pins jax 0.10.2's libtpu there).
"""

import contextlib
import importlib.util
import io
import itertools
import math
import os
import re

import jax
import pytest

from r1jax import cli
from r1jax.config import MeshConfig
from r1jax.errors import ConfigError
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import topology as topology_lib

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the TPU compiler) is not installed: pip install 'libtpu==0.0.42.*'")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _devices(name, slices=1):
    return topology_lib.topology_devices(topology_lib.parse_topology(name, slices))


# --------------------------------------------------------------------------- names (no libtpu needed)


@pytest.mark.parametrize("name, layout", [("v5p-128", "v5p:4x4x4"), ("v5p-512", "v5p:4x8x8"), ("v4-8", "v4:2x2x1"),
                                          ("v5e-16", "v5e:4x4"), ("v5litepod-16", "v5e:4x4"), ("v6e-64", "v6e:8x8"),
                                          ("v5p:2x2x1", "v5p:2x2x1"), ("v5:4x4x8", "v5:4x4x8")])
def test_slice_names_resolve_to_libtpu_layouts(name, layout):
    assert topology_lib.parse_topology(name).layout == layout


@pytest.mark.parametrize("name, match", [("v5p-100", "unknown slice 'v5p-100'"), ("v7x-8", "unknown topology"),
                                         ("v5p:4x4", "3-D torus"), ("v5e:4x4x4", "2-D torus")])
def test_unknown_topologies_are_named(name, match):
    with pytest.raises(ConfigError, match=f"--topology: .*{re.escape(match)}"):
        topology_lib.parse_topology(name)


def test_missing_libtpu_is_named_before_the_config_is_read(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "libtpu" else real(n, *a))
    with pytest.raises(ConfigError, match="--topology: .*needs libtpu.*pip install"):
        from r1jax.plan import plan_command

        plan_command("no/such/config.yaml", topology="v5p-128")


# --------------------------------------------------------------------------- meshes on real tori


def _factorizations(n, k):
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    for head in itertools.product(divisors, repeat=k - 1):
        if n % math.prod(head) == 0:
            yield head + (n // math.prod(head),)


@needs_libtpu
def test_every_mesh_of_64_devices_builds_on_a_v5p_128():
    """All 84 ways to split 64 chips over data×fsdp×expert×tensor. 8 is no product of 4x4x4's axes, so
    e.g. fsdp=8, expert=8 splits a physical axis; fsdp=16, expert=4 maps onto whole axes (3 rings)."""
    devices = _devices("v5p:4x4x4")
    meshes = list(_factorizations(64, 4))
    assert len(meshes) == 84
    for d, f, e, t in meshes:
        mesh = mesh_lib.build_mesh(MeshConfig(data=d, fsdp=f, expert=e, tensor=t), devices)
        assert dict(mesh.shape) == {"data": d, "fsdp": f, "expert": e, "tensor": t}
        assert sorted(x.id for x in mesh.devices.flat) == sorted(x.id for x in devices)
    # Whole physical axes when they exist: each expert group of 4 chips is one line of the torus.
    mesh = mesh_lib.build_mesh(MeshConfig(data=1, fsdp=16, expert=4), devices)
    for row in mesh.devices.reshape(16, 4):
        coords = [c.coords for c in row]
        assert sum(len({c[i] for c in coords}) == 1 for i in range(3)) == 2, coords


@needs_libtpu
def test_two_slices_build_a_hybrid_mesh_with_data_across_slices():
    devices = _devices("v5p:2x2x1", slices=2)
    assert len(devices) == 8 and {d.slice_index for d in devices} == {0, 1}
    mesh = mesh_lib.build_mesh(MeshConfig(data=1, fsdp=2, expert=2, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
    # The outer data index is the slice: only the data axis crosses the data-center network.
    assert [{x.slice_index for x in mesh.devices[i].flat} for i in range(2)] == [{0}, {1}]


def test_cpu_meshes_are_unchanged():
    cfg = MeshConfig(data=2, fsdp=2, expert=2)
    mesh = mesh_lib.build_mesh(cfg, jax.devices()[:8])
    ref = jax.make_mesh((2, 2, 2, 1), ("data", "fsdp", "expert", "tensor"), devices=jax.devices()[:8])
    assert (mesh.devices == ref.devices).all()
