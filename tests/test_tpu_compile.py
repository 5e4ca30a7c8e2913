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



@needs_libtpu
@pytest.mark.slow  # ~30 s
def test_a_step_xla_cannot_fit_is_the_verdict_not_a_crash(capsys):
    """[rows, heads, T, T] fp32 scores of `dot` attention at T = 8192 need ~4 GiB per row and head: far
    beyond a v5e chip's 16 GiB. XLA:TPU refuses to compile; plan prints its reason and `fits: no`."""
    argv = ["plan", "configs/model/tiny_v3.yaml", "model.attention_impl=dot", "--mesh", "data=4",
            "--seq-len", "8192", "--batch", "16", "--topology", "v5e:2x2", "--no-sampler"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| total |" in out  # the analytic table is still there
    refused = re.search(r"^XLA:TPU refused to compile the train step \([\d.]+ s\): (.*)$", out, re.M)
    assert refused and "memory" in refused[1], out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"fits: no  the train step needs more than ([\d.]+) GB per chip \((.+) ([\d.]+)G > ([\d.]+)G HBM\)",
                     last)
    assert m, last
    assert float(m[1]) == pytest.approx(float(m[4]) * 2**30 / 1e9, abs=0.006)  # XLA's usable v5e HBM, GiB
    assert float(m[4]) == 15.75 and float(m[3]) > float(m[4])

# --------------------------------------------------------------------------- the sampler's programs


def _tiny_plan_config(dispatch, mesh="data=1,fsdp=1,expert=4", devices=4):
    from r1jax.plan import load_plan_config

    return load_plan_config("configs/model/tiny_v3.yaml", [f"model.moe_dispatch={dispatch}"], mesh, seq_len=64,
                            devices=devices)[0]


def _sampler_arguments(cfg, mesh, lowered, compiled, rows_per_device, slots):
    """Check a decode step's compiled arguments against the analytic params + cache; -> XLA's bytes."""
    from r1jax.model.kv_cache import cache_bytes_per_token
    from r1jax.plan import state_bytes

    params, tok, i, lengths, kv = _argument_bytes(lowered, compiled)
    assert params[1] == state_bytes(cfg.model, cfg.mesh, dict(mesh.shape))["params"]  # every param, MTP included
    assert kv[1] == cache_bytes_per_token(cfg.model) * rows_per_device * slots
    assert tok[1] == lengths[1] == 4 * rows_per_device and i[1] == 4  # int32 per row; the step
    stats = compiled.memory_analysis()
    assert stats.argument_size_in_bytes == params[0] + tok[0] + i[0] + lengths[0] + kv[0]
    assert stats.alias_size_in_bytes == kv[0]  # the donated cache is updated in place, as in the loop
    return params, kv


def test_sampler_decode_step_arguments_are_the_params_and_the_cache_on_cpu():
    """The lowering API on 8 CPU devices (no tiles): XLA's argument bytes of the decode step are the
    analytic params + latent cache + 20 bytes (the token fed back, the step, the lengths), exactly."""
    from r1jax.infer.sampler import lower_decode

    cfg = _tiny_plan_config("capacity_ep", "data=1,fsdp=2,expert=4", devices=8)
    mesh = mesh_lib.build_mesh(cfg.mesh, jax.devices()[:8])
    # 12 rows pad to 16 (2 per device), 20 prompt tokens to the bucket 32: 32 + 16 - 1 = 47 cache slots.
    lowered = lower_decode(cfg.model, mesh, 12, 20, 16, rules=cfg.mesh)
    compiled = lowered.compile()
    params, kv = _sampler_arguments(cfg, mesh, lowered, compiled, 2, 47)
    # Measured: 194,656 bytes of params (fsdp=2 halves the dense weights, expert=4 splits the experts)
    # and 3 layers x 47 slots x 2 rows x (32 + 16) float32 = 54,144 bytes of cache per device.
    assert (params[1], kv[1]) == (194_656, 54_144)
    assert compiled.memory_analysis().argument_size_in_bytes == 194_656 + 54_144 + 20


@needs_libtpu
@pytest.mark.slow  # ~40-60 s each: three XLA:TPU compiles
@pytest.mark.parametrize("dispatch", ["capacity_ep", "ragged_ep"])
def test_tiny_v3_train_step_and_sampler_compile_for_v5p_with_expert_parallelism(dispatch):
    """The train step with `dispatch`, then the sampler's prefill and decode step on the same mesh. The
    sampler is dropless: capacity_ep becomes ragged_ep on TPU, so both exchange with the ragged
    all-to-all. The decode step's unpadded arguments are the analytic params + cache exactly; XLA's
    argument bytes are those shards in TPU tiles (the cache's 47 slots pad to 128 lanes)."""
    from r1jax.infer.sampler import lower_decode, lower_prefill
    from r1jax.plan import lower_step, state_bytes

    cfg = _tiny_plan_config(dispatch)
    mesh = mesh_lib.build_mesh(cfg.mesh, _devices("v5p:2x2x1"))
    train = lower_step(cfg, cfg.model, mesh).compile()
    assert ("ragged-all-to-all" in train.as_text()) == (dispatch == "ragged_ep")
    prefill_lowered = lower_prefill(cfg.model, mesh, 8, 20, 16, rules=cfg.mesh)
    prefill = prefill_lowered.compile()
    decode_lowered = lower_decode(cfg.model, mesh, 8, 20, 16, rules=cfg.mesh)
    decode = decode_lowered.compile()
    assert "ragged-all-to-all" in prefill.as_text() and "ragged-all-to-all" in decode.as_text()
    (params_tiled, params_raw), _, _ = _argument_bytes(prefill_lowered, prefill)
    assert params_raw == state_bytes(cfg.model, cfg.mesh, dict(mesh.shape))["params"]
    # 8 rows: 2 per chip; the prompt bucket 32 + 16 - 1 = 47 slots.
    _, (kv_tiled, kv_raw) = _sampler_arguments(cfg, mesh, decode_lowered, decode, 2, 47)
    assert kv_raw == 3 * 47 * 2 * (32 + 16) * 4
    # Measured: XLA:TPU lays each cache shard [layers, 2 rows, 47 slots, 32 or 16] out with the slots
    # minor, padded to 128 lanes (the 32 and 16 are whole sublane tiles of 8): 147,456 bytes, 3.3x.
    assert kv_tiled == 3 * 2 * (32 + 16) * 128 * 4 == 147_456


def _rows(out, title):
    """(bytes per printed unit, {row label: [numbers]}) of the plan's table whose header holds `title`."""
    start = out.rindex("\n", 0, out.index(title)) + 1
    head, *table = out[start:].split("\n\n")[0].splitlines()
    unit = 1e9 if re.search(r"\bGB\b", head) else 1e6
    return unit, {r.split(" | ")[0][2:]: [float(x.replace(",", "")) for x in r.strip(" |").split(" | ")[1:]]
                  for r in table[1:]}


@needs_libtpu
@pytest.mark.slow  # ~60-90 s: the train step, the prefill and the decode step through XLA:TPU
def test_plan_prints_the_sampler_and_the_larger_peak_decides_the_fit():
    """A train config sampling 256 rows of 512 + 512 tokens: the sampler's prefill (fp32 scores of 64
    rows x 4 heads x 512^2 per chip) outgrows the train step, and the verdict follows it."""
    import io

    from r1jax.model.kv_cache import cache_bytes_per_token
    from r1jax.plan import plan_command
    from r1jax.plan_sampler import with_code

    buf = io.StringIO()
    p = plan_command("configs/model/tiny_v3.yaml", ["model.moe_dispatch=capacity_ep"], "data=1,fsdp=1,expert=4",
                     seq_len=64, topology="v5p:2x2x1", sample_batch=256, sample_len=1024, out=buf)
    out, sp = buf.getvalue(), p.sampler
    assert ("sampler: sampling the trained model: 256 rows (64 per chip), prompt bucket 512 + 512 new tokens, a "
            "latent cache of 1023 slots per row; moe_dispatch=ragged_ep (dropless)") in out
    unit, analytic = _rows(out, "| sampler, per chip (analytic) |")
    assert cache_bytes_per_token(p.model) == 3 * (32 + 16) * 4
    # 576 bytes a token x 64 rows x 1023 slots = 37,711,872 bytes per chip.
    assert analytic["KV cache (latent, 1023 slots per row)"] == [round(37_711_872 / unit, 2)]
    assert analytic["params"] == [round(p.analytic["params"] / unit, 2)]
    unit, xla = _rows(out, "| prefill XLA:TPU | decode XLA:TPU |")
    pre, dec = sp.prefill.compiled, sp.decode.compiled
    assert xla["temporaries"][:2] == [round(pre["temp_size_in_bytes"] / unit, 2), round(dec["temp_size_in_bytes"] / unit, 2)]
    assert xla["peak + code"][:2] == [round(with_code(pre) / unit, 2), round(with_code(dec) / unit, 2)]
    # The decode step holds params + cache (tiled) as arguments and gives the cache back in place.
    assert dec["alias_size_in_bytes"] > 37.71e6 and dec["argument_size_in_bytes"] > dec["alias_size_in_bytes"]
    train = with_code(p.compiled)
    sampled = max(with_code(pre), with_code(dec))
    assert sampled > train
    lines = out.strip().splitlines()
    which = "prefill" if with_code(pre) >= with_code(dec) else "decode"
    assert lines[-2] == (f"peak per chip: train step {train / 1e9:.2f} GB, sampler {sampled / 1e9:.2f} GB ({which}): "
                         f"the sampler dominates")
    m = re.fullmatch(r"fits: yes  peak ([\d.]+) GB of ([\d.]+) GB per chip \(([\d.]+)%\)", lines[-1])
    assert m and float(m[1]) == round(sampled / 1e9, 2)


@needs_libtpu
@pytest.mark.slow  # ~60-90 s: the update, the prefill and the decode step
def test_plan_grpo_stage_plans_its_rollout_beside_the_resident_state():
    """The rollout of prompts.batch_size x num_generations rows with Adam and π_ref resident: its peak is
    the larger program's plus exactly that state."""
    import io

    from r1jax.plan import plan_command, state_bytes
    from r1jax.plan_sampler import with_code

    from r1jax.config import GRPOConfig, load

    overrides = ["beta=0.04", "prompts.batch_size=2", "num_generations=4", "prompts.seq_len=20", "max_new_tokens=16",
                 "model.moe_dispatch=capacity_ep"]
    buf = io.StringIO()
    p = plan_command("configs/train/tiny_grpo.yaml", overrides, "data=1,fsdp=1,expert=4", topology="v5p:2x2x1", out=buf)
    out, sp = buf.getvalue(), p.sampler
    assert ("sampler: GRPO rollout, prompts.batch_size x num_generations: 8 rows (2 per chip), prompt bucket 32 + "
            "16 new tokens, a latent cache of 47 slots per row; moe_dispatch=ragged_ep (dropless)") in out
    cfg = load(GRPOConfig, "configs/train/tiny_grpo.yaml", overrides + ["mesh.data=1", "mesh.expert=4"])
    s = state_bytes(cfg.model, cfg.mesh, dict(p.mesh))
    assert sp.resident == s["optimizer"] + s["params"]  # Adam mu, nu and the reference params
    unit, analytic = _rows(out, "| sampler, per chip (analytic) |")
    assert analytic["resident beside it: the rest of the training state"] == [round(sp.resident / unit, 2)]
    sampled = max(with_code(sp.prefill.compiled), with_code(sp.decode.compiled)) + sp.resident
    update = with_code(p.compiled)
    lines = out.strip().splitlines()
    assert lines[-2].startswith(f"peak per chip: GRPO update {update / 1e9:.2f} GB, sampler {sampled / 1e9:.2f} GB (")
    assert lines[-2].endswith(" + the resident state): the GRPO update dominates" if update >= sampled else
                              " + the resident state): the sampler dominates")
    assert lines[-1].startswith(f"fits: yes  peak {max(update, sampled) / 1e9:.2f} GB of ")


def test_sample_flags_need_a_topology_and_a_sampler(capsys):
    assert cli.main(["plan", "configs/model/tiny_v3.yaml", "--sample-batch", "4"]) == 2
    assert "r1jax plan: error: --sample-batch: the sampler is compiled for a TPU slice; only with --topology" in \
        capsys.readouterr().err
    assert cli.main(["plan", "configs/model/tiny_v3.yaml", "--topology", "v5p:2x2x1", "--no-sampler",
                     "--sample-len", "64"]) == 2
    assert "--sample-len: --no-sampler leaves the sampler out; drop one of them" in capsys.readouterr().err


@needs_libtpu
def test_sampler_shapes_are_checked_before_anything_compiles(capsys):
    argv = ["plan", "configs/model/tiny_v3.yaml", "--mesh", "data=1,fsdp=1,expert=4", "--topology", "v5p:2x2x1"]
    assert cli.main(argv + ["--sample-len", "2048"]) == 2  # the tiny model has 1024 positions
    assert ("--sample-len/--sample-new: 1024 prompt + 1024 new tokens exceed model.max_position_embeddings=1024"
            in capsys.readouterr().err)
    assert cli.main(["plan", "configs/train/tiny_grpo.yaml", "--topology", "v5p:2x2x1", "--sample-new", "8"]) == 2
    assert "--sample-new: a GRPO stage samples its rollout" in capsys.readouterr().err
