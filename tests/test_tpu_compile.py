"""r1jax compiled by the real TPU compiler (libtpu) for TPU slices that are not attached, on this CPU host.

libtpu describes a slice by name and hands out compile-only devices with the chips' torus coordinates
(r1jax/parallel/topology.py); the meshes are laid over them and XLA:TPU compiles the train step. The
tests that need libtpu are skipped, with the reason, only when it is not importable (it installs on
linux x86_64 only: the `test` extra pins jax 0.10.2's libtpu there).
"""

import importlib.util
import itertools
import math
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


def test_plan_names_a_bad_topology_before_reading_the_config(capsys):
    assert cli.main(["plan", "no/such/config.yaml", "--topology", "v9-8"]) == 2
    assert "r1jax plan: error: --topology: unknown topology 'v9-8'" in capsys.readouterr().err
    assert cli.main(["plan", "no/such/config.yaml", "--slices", "2"]) == 2
    assert "--slices: only with --topology" in capsys.readouterr().err


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


@needs_libtpu
def test_slices_without_cross_slice_factors_are_refused():
    with pytest.raises(ConfigError, match=r"mesh.dcn_data: the devices are 2 TPU slices.*mesh.dcn_data=2"):
        mesh_lib.build_mesh(MeshConfig(data=2, fsdp=2, expert=2), _devices("v5p:2x2x1", slices=2))


def test_cpu_meshes_are_unchanged():
    cfg = MeshConfig(data=2, fsdp=2, expert=2)
    mesh = mesh_lib.build_mesh(cfg, jax.devices()[:8])
    ref = jax.make_mesh((2, 2, 2, 1), ("data", "fsdp", "expert", "tensor"), devices=jax.devices()[:8])
    assert (mesh.devices == ref.devices).all()


# --------------------------------------------------------------------------- the train step through XLA:TPU


def _tiled_bytes(shape, layout, itemsize):
    """Bytes of one array in a TPU layout: dims in major-to-minor order, the minor dims padded to the
    tile (e.g. (8, 128) f32: a [64, 16] shard takes [64, 128]); a scalar fills one tile."""
    dims = [shape[i] for i in layout.major_to_minor] or [1]
    tile = layout.tiling[0] if layout.tiling else ()
    for i, t in enumerate(reversed(tile)):
        if i < len(dims):
            dims[-1 - i] = -(-dims[-1 - i] // t) * t
    return math.prod(dims) * itemsize


def _argument_bytes(lowered, compiled):
    """[(tiled, unpadded) bytes per device] of each positional argument of a compiled step; None for
    an argument with a leaf the step does not read (jit drops it from the compiled inputs)."""
    out = []
    for info, sh, fmt in zip(lowered.args_info[0], compiled.input_shardings[0], compiled.input_formats[0]):
        infos, shs, fmts = jax.tree.leaves(info), jax.tree.leaves(sh), jax.tree.leaves(fmt)
        if not len(infos) == len(shs) == len(fmts):
            out.append(None)
            continue
        shards = [_physical(s.shard_shape(a.shape), a.dtype) for s, a in zip(shs, infos)]
        out.append((sum(_tiled_bytes(shape, f.layout, b) for (shape, b), f in zip(shards, fmts)),
                    sum(math.prod(shape) * b for shape, b in shards)))
    return out


def _physical(shape, dtype):
    """(shape, itemsize) as stored: a PRNG key is two uint32 words per key (threefry)."""
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(shape) + (2,), 4
    return tuple(shape), dtype.itemsize


@needs_libtpu
@pytest.mark.slow  # ~40 s: XLA:TPU's fixed cost, the model is tiny
def test_tiny_v3_train_step_compiles_for_v5p_with_dropless_expert_parallelism():
    """XLA:TPU's argument bytes are the analytic state (params + Adam μ, ν) plus the batch and the
    step's counters, each per-device shard padded to the TPU tile XLA chose for it. No factor between
    XLA's peak and the analytic estimate is asserted: at hidden 64 the temporaries are dominated by
    the lane padding of 16/32/64-wide dims to 128 (measured 47 MB against 5 MB; see BUILD.md)."""
    from r1jax.plan import analytic, load_plan_config, lower_step
    from r1jax.train.loop import BATCH_KEYS

    cfg, n = load_plan_config("configs/model/tiny_v3.yaml", ["model.moe_dispatch=ragged_ep"], "data=1,fsdp=1,expert=4",
                              seq_len=64, devices=4)
    mesh = mesh_lib.build_mesh(cfg.mesh, _devices("v5p:2x2x1"))
    lowered = lower_step(cfg, cfg.model, mesh)
    compiled = lowered.compile()
    stats = compiled.memory_analysis()
    (state_tiled, state_raw), (batch_tiled, batch_raw) = _argument_bytes(lowered, compiled)
    assert stats.argument_size_in_bytes == state_tiled + batch_tiled
    assert stats.alias_size_in_bytes == state_tiled  # the donated state comes back in place
    a = analytic(cfg, cfg.model, dict(mesh.shape))
    assert batch_raw == len(BATCH_KEYS) * 64 * 4  # one int32 row of 64 tokens per device for each key
    # Besides params and Adam's μ, ν: three int32 scalars (the step, the optimizer's counts) and the
    # step's PRNG key (8 bytes). Measured 2026-12-02: 1,155,700 bytes unpadded, 2,654,208 as tiled by XLA.
    assert state_raw - a["params"] - a["optimizer state (Adam mu, nu)"] == 3 * 4 + 8


@needs_libtpu
@pytest.mark.slow  # ~40-60 s
def test_grpo_update_compiles_for_v5p_with_its_reference_model():
    """GRPO's update with β > 0 carries π_ref beside the policy and Adam: its state on the chip is the
    analytic params + Adam + reference params, donated and returned in place."""
    from r1jax.config import GRPOConfig, load
    from r1jax.plan import lower_grpo_update, state_bytes

    cfg = load(GRPOConfig, "configs/train/tiny_grpo.yaml",
               ["beta=0.04", "prompts.batch_size=1", "num_generations=4", "prompts.seq_len=16", "max_new_tokens=16",
                "model.moe_dispatch=capacity_ep", "mesh.data=1", "mesh.expert=4"])
    mesh = mesh_lib.build_mesh(cfg.mesh, _devices("v5p:2x2x1"))
    lowered = lower_grpo_update(cfg, mesh)
    compiled = lowered.compile()
    stats = compiled.memory_analysis()
    # The batch is not summed: jit drops a key the update does not read, so the compiled inputs do not
    # pair with the batch's keys one to one.
    (state_tiled, state_raw), _ = _argument_bytes(lowered, compiled)
    assert stats.alias_size_in_bytes == state_tiled
    s = state_bytes(cfg.model, cfg.mesh, dict(mesh.shape))
    assert state_raw - 2 * s["params"] - s["optimizer"] == 3 * 4 + 8  # the counters and key, as above


@needs_libtpu
@pytest.mark.slow  # ~40 s
def test_plan_topology_through_the_cli_prints_the_fit(capsys):
    argv = ["plan", "configs/model/tiny_v3.yaml", "model.moe_dispatch=capacity_ep", "--mesh", "data=1,fsdp=1,expert=4",
            "--seq-len", "64", "--topology", "v5p:2x2x1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\| (argument|output|alias|temp|generated_code) \| ([\d,.]+) \|$", out, re.M))
    peak = (sum(float(rows[k].replace(",", "")) for k in ("argument", "output", "temp", "generated_code"))
            - float(rows["alias"].replace(",", ""))) / 1e3  # MB -> GB
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"fits: yes  peak ([\d.]+) GB of ([\d.]+) GB per chip \(([\d.]+)%\)", last)
    assert m, last
    assert float(m[2]) == pytest.approx(95.74 * 2**30 / 1e9, abs=0.006)  # v5p's HBM, printed to 10 MB
    assert float(m[1]) == pytest.approx(peak, abs=0.006)
    assert "compiled by XLA:TPU for v5p:2x2x1" in out and "compiled in " in out
