"""Hugging Face ⇄ orbax conversion (r1jax.convert): exact round trips, DeepSeek's FP8 release against
an independent dequantization, restoring into training, per-device sharded loads, bad input with
named errors and nothing half-written, and the `convert` command line."""

import argparse
import filecmp
import json
import os
import sys
import types

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

import r1jax
from convert_fixtures import (dequantize_reference, moe_config, quantize_reference, quantized, random_params,
                              write_fp8_release)
from r1jax.checkpoint.orbax_io import load_model
from r1jax.convert import fp8, hf_io
from r1jax.convert.commands import add_convert_parser, hf_to_orbax, orbax_to_hf, parse_size
from r1jax.convert.safetensors_io import SafetensorsReader
from r1jax.errors import CheckpointError, ConfigError
from r1jax.model.params import is_spec, param_shapes, param_table

ASSETS = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"bos_token": "<s>"}',
          "special_tokens_map.json": '{"eos_token": "</s>"}'}


def _files(d):
    return sorted(p.name for p in d.iterdir())


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def no_leftovers(parent, name):
    """Neither the destination nor a temporary sibling of it exists."""
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{dtype: a sharded HF directory written by r1jax, with tokenizer files}, and its params."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = moe_config().replace(dtype=dtype, param_dtype=dtype)
        params = random_params(cfg)
        d = tmp_path_factory.mktemp(dtype) / "hf"
        r1jax.save_pretrained(d, cfg, params, max_shard_size=60_000)
        for name, text in ASSETS.items():
            (d / name).write_text(text)
        out[dtype] = (d, cfg, params)
    return out


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_orbax_hf_is_byte_identical(hf_dirs, tmp_path, dtype):
    src, cfg, params = hf_dirs[dtype]
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    assert _files(tmp_path / "orbax") == sorted(["config.yaml", "params", "generation_config.json", *ASSETS])
    cfg2, restored = load_model(tmp_path / "orbax")
    assert cfg2.param_dtype == dtype and cfg2.replace(hf_extra=cfg.hf_extra) == cfg
    assert_trees_equal(restored, params)
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back", max_shard_size=60_000, progress=False)
    assert _files(tmp_path / "back") == _files(src)
    assert len([f for f in _files(src) if f.endswith(".safetensors")]) > 3
    for name in _files(src):  # weights, index, config.json, generation_config.json, tokenizer files
        assert filecmp.cmp(src / name, tmp_path / "back" / name, shallow=False), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_checkpoint_round_trips_tensor_for_tensor(tmp_path, dtype):
    import torch
    from hf_reference import V3_CONFIGS, make_hf_model

    model = make_hf_model("v3", V3_CONFIGS["v3_bias_yarn_mscale"])
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", progress=False)
    orbax_to_hf(tmp_path / "orbax", tmp_path / "back", progress=False)
    a, b = SafetensorsReader(tmp_path / "hf"), SafetensorsReader(tmp_path / "back")
    assert a.names == b.names
    for name in sorted(a.names):
        if name.endswith("e_score_correction_bias") and a.dtype(name) == "BF16":
            # `.to(bfloat16)` also cast the router bias, which r1jax (and the release) keeps in fp32
            # (docs/deepseek_v3.md §8): it comes back upcast, value for value.
            assert b.dtype(name) == "F32"
            np.testing.assert_array_equal(a.read(name).astype(np.float32), b.read(name))
            continue
        assert (a.dtype(name), a.shape(name)) == (b.dtype(name), b.shape(name)), name
        assert a.read(name).tobytes() == b.read(name).tobytes(), name
    if dtype == "float32":  # the same tensors in safetensors' own layout: the very same file
        assert filecmp.cmp(tmp_path / "hf" / "model.safetensors", tmp_path / "back" / "model.safetensors",
                           shallow=False)


def test_dense_student_directory_round_trips_file_for_file(tmp_path):
    """A transformers Qwen2 directory (tied head) through load_pretrained and save_pretrained."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
                     ).save_pretrained(tmp_path / "hf")
    cfg, params = r1jax.load_pretrained(tmp_path / "hf")
    assert cfg.model_type == "qwen2"
    r1jax.save_pretrained(tmp_path / "back", cfg, params)
    assert filecmp.cmp(tmp_path / "hf" / "model.safetensors", tmp_path / "back" / "model.safetensors", shallow=False)


def test_converted_checkpoint_restores_sharded_across_devices(hf_dirs, mesh, tmp_path):
    """Leaves stored in HF order restore into r1jax's layout, each device reading its own block."""
    src, cfg, params = hf_dirs["bfloat16"]
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    zarr = json.loads((tmp_path / "orbax" / "params" / "moe_layers.attn.o" / "zarr.json").read_text())
    assert zarr["codecs"][0] == {"name": "transpose", "configuration": {"order": [0, 3, 1, 2]}}  # [L, D, H, V]
    shardings = _shardings(cfg, mesh)
    _, restored = load_model(tmp_path / "orbax", shardings=shardings)
    assert restored["moe_layers"]["attn"]["kv_b"].sharding.spec == P(None, None, "model", None)
    assert_trees_equal(restored, params)


def test_orbax_checkpoints_written_by_save_model_convert_to_hf(hf_dirs, tmp_path):
    """orbax's own layout (OCDBT, compressed, one chunk per leaf), as training checkpoints have it."""
    src, cfg, params = hf_dirs["bfloat16"]
    r1jax.save_pretrained(tmp_path / "orbax", cfg, params, format="orbax")
    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", max_shard_size=60_000, progress=False)
    assert _files(tmp_path / "hf") == sorted(set(_files(src)) - set(ASSETS))
    for name in _files(tmp_path / "hf"):
        assert filecmp.cmp(src / name, tmp_path / "hf" / name, shallow=False), name


def test_orbax_output_restores_into_training(hf_dirs, tmp_path):
    """train/loop.py's init_from path (r1jax.load_pretrained on the converted directory)."""
    from r1jax.train.run import resolve_model

    src, cfg, params = hf_dirs["float32"]
    hf_to_orbax(src, tmp_path / "orbax", dtype="bfloat16", progress=False)
    model_cfg, restored = resolve_model(types.SimpleNamespace(init_from=str(tmp_path / "orbax"), model=None))
    assert model_cfg.param_dtype == "bfloat16"
    expected = jax.tree.map(lambda p, s: np.asarray(p).astype(s.dtype), params, param_shapes(model_cfg))
    assert_trees_equal(restored, expected)


# --------------------------------------------------------------------------- the FP8 release


BLOCK = (24, 40)  # small blocks, so the tiny model's tensors have many, with partial edge blocks


@pytest.fixture(scope="module")
def fp8_release(tmp_path_factory):
    cfg = moe_config()
    d = tmp_path_factory.mktemp("fp8") / "release"
    stored = write_fp8_release(d, cfg, block=BLOCK)
    return d, cfg, stored


def _reference_values(stored, dtype) -> dict:
    """Every weight the release defines, dequantized independently of r1jax, in `dtype`."""
    out = {}
    for name, value in stored.items():
        if name.endswith(fp8.SCALE_SUFFIX):
            continue
        if name + fp8.SCALE_SUFFIX in stored:
            value = dequantize_reference(value, stored[name + fp8.SCALE_SUFFIX], BLOCK)
        out[name] = np.asarray(value, np.float32).astype(dtype)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_release_converts_to_exactly_the_dequantized_values(fp8_release, tmp_path, dtype):
    src, cfg, stored = fp8_release
    assert any(n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in stored)  # the MTP layer
    # The expected params: the reference values in `dtype` loaded through the plain (bf16/fp32) path.
    ref = _reference_values(stored, ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32)
    bias = [n for n in ref if n.endswith("e_score_correction_bias")]
    ref.update({n: stored[n] for n in bias})  # fp32 in the release, kept fp32
    (tmp_path / "ref").mkdir()
    save_file(ref, str(tmp_path / "ref" / "model.safetensors"))
    hf_cfg = json.loads((src / "config.json").read_text())
    del hf_cfg["quantization_config"]
    (tmp_path / "ref" / "config.json").write_text(json.dumps(hf_cfg))
    _, expected = r1jax.load_pretrained(tmp_path / "ref", dtype=dtype)

    hf_to_orbax(src, tmp_path / "orbax", dtype=dtype, progress=False)
    cfg2, restored = load_model(tmp_path / "orbax")
    assert cfg2.num_nextn_predict_layers == 1 and "quantization_config" not in cfg2.hf_extra
    assert_trees_equal(restored, expected)
    _, direct = r1jax.load_pretrained(src, dtype=dtype)  # load_pretrained reads FP8 directories too
    assert_trees_equal(direct, expected)

    orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)
    out = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(out) == sorted(ref)  # MTP layer included, no scale companions
    for name in sorted(out):
        np.testing.assert_array_equal(out[name], ref[name], err_msg=name)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in written and written["torch_dtype"] == dtype
    assert (tmp_path / "hf" / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()


def test_fp8_default_dtype_is_bfloat16(fp8_release):
    src, _, _ = fp8_release
    cfg, params = r1jax.load_pretrained(src)
    assert cfg.param_dtype == "bfloat16" and params["moe_layers"]["attn"]["q_b"].dtype == ml_dtypes.bfloat16
    assert params["moe_layers"]["mlp"]["router_bias"].dtype == np.float32


def test_fp8_rows_dequantize_across_partial_blocks(tmp_path):
    """Any row range, aligned or not, with a partial last block row and column (128x128 blocks)."""
    import torch
    from safetensors.torch import save_file as torch_save

    rng = np.random.default_rng(3)
    q = torch.from_numpy(rng.uniform(-448, 448, (300, 200)).astype(np.float32)).to(torch.float8_e4m3fn)
    scale = rng.uniform(1e-4, 1e-2, (3, 2)).astype(np.float32)
    torch_save({"w": q, "w_scale_inv": torch.from_numpy(scale)}, str(tmp_path / "model.safetensors"))
    reader = fp8.DequantizingReader(SafetensorsReader(tmp_path), (128, 128), "test")
    assert reader.names == {"w"} and reader.value_dtype("w") == "F32"
    full = dequantize_reference(q.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn), scale, (128, 128))
    for start, stop in [(0, 300), (0, 128), (100, 260), (127, 129), (256, 300), (5, 6)]:
        np.testing.assert_array_equal(reader.read_rows("w", start, stop), full[start:stop])


# --------------------------------------------------------------------------- exporting the FP8 format


def test_to_e4m3_rounds_like_ml_dtypes():
    """Every float32 that is an e4m3 value, a midpoint between two (ties go to even) or one ulp either
    side of those, plus a sweep of bit patterns, all within ±448."""
    e4m3 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    grid = np.unique(e4m3[np.isfinite(e4m3)])
    mids = (grid[:-1] + grid[1:]) / 2
    points = np.concatenate([grid, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    sweep = np.arange(0, 2**32, 997, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([points, sweep[np.abs(sweep) <= 448], np.float32([0.0, -0.0])])
    np.testing.assert_array_equal(fp8.to_e4m3(x).view(np.uint8), x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_quantize_matches_an_independent_blockwise_implementation():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((300, 200)) * rng.choice([1e-6, 1e-2, 1, 30], (300, 1))).astype(np.float32)
    w[128:256, 128:] = 0  # an all-zero (partial) block
    w[5, 7] = -w[5, 7] * 1e4  # one outlier sets its block's scale
    q, scale = fp8.quantize(w.astype(ml_dtypes.bfloat16), "w")  # the converter hands over bf16 or fp32 rows
    q_ref, scale_ref = quantize_reference(w.astype(ml_dtypes.bfloat16))
    assert q.dtype == ml_dtypes.float8_e4m3fn and scale.dtype == np.float32 and scale.shape == (3, 2)
    np.testing.assert_array_equal(q.view(np.uint8), q_ref.view(np.uint8))
    np.testing.assert_array_equal(scale, scale_ref)
    assert scale[1, 1] == 1 and not q[128:256, 128:].astype(np.float32).any()
    bad = w.copy()
    bad[200, 3] = np.nan
    with pytest.raises(CheckpointError, match=r"w: cannot quantize to FP8, rows 128:256 hold inf or nan"):
        fp8.quantize(bad, "w")


@pytest.fixture(scope="module")
def fp8_export(tmp_path_factory):
    """A release in 128x128 blocks of a model whose tensors span several (partial) blocks, converted to
    orbax and exported back as FP8."""
    cfg = moe_config(hidden=192, moe_ffn=160, ffn=320, layers=2)
    d = tmp_path_factory.mktemp("fp8x")
    stored = write_fp8_release(d / "release", cfg, block=(128, 128))
    hf_to_orbax(d / "release", d / "orbax", progress=False)
    orbax_to_hf(d / "orbax", d / "fp8", quantize="fp8", max_shard_size="200KB", progress=False)
    return d, cfg, stored


def test_fp8_export_is_the_release_format_and_matches_an_independent_quantizer(fp8_export):
    d, cfg, stored = fp8_export
    written = json.loads((d / "fp8" / "config.json").read_text())
    assert written["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [128, 128]}
    assert written["torch_dtype"] == "bfloat16"
    out, release = SafetensorsReader(d / "fp8"), SafetensorsReader(d / "release")
    assert out.names == release.names  # the same tensors, scales included, the MTP layer too
    assert len(json.loads((d / "fp8" / "model.safetensors.index.json").read_text())["weight_map"]) == len(out.names)
    _, params = load_model(d / "orbax")  # the bf16 values the export starts from
    for name in sorted(out.names - {n for n in out.names if n.endswith(fp8.SCALE_SUFFIX)}):
        if not quantized(name):
            want = "F32" if name.endswith("e_score_correction_bias") else "BF16"
            assert (out.dtype(name), release.dtype(name)) == (want, want), name
            continue
        assert out.dtype(name) == "F8_E4M3" and out.dtype(name + fp8.SCALE_SUFFIX) == "F32", name
        bf16 = dequantize_reference(release.read(name), release.read(name + fp8.SCALE_SUFFIX), (128, 128))
        q_ref, scale_ref = quantize_reference(bf16.astype(ml_dtypes.bfloat16))
        np.testing.assert_array_equal(out.read(name).view(np.uint8), q_ref.view(np.uint8), err_msg=name)
        np.testing.assert_array_equal(out.read(name + fp8.SCALE_SUFFIX), scale_ref, err_msg=name)
    assert params["moe_layers"]["attn"]["q_b"].dtype == ml_dtypes.bfloat16


def test_fp8_round_trip_stays_within_the_fp8_rounding_bound(fp8_export):
    """release -> orbax (bf16) -> FP8 -> dequantized, against the release dequantized: bf16 rounding
    (2^-9 relative), then e4m3 rounding of the re-scaled value (2^-4 relative for normals, half the
    subnormal step 2^-9 times the block's new scale below)."""
    d, _, stored = fp8_export
    out = SafetensorsReader(d / "fp8")
    checked = 0
    for name in sorted(n for n in stored if quantized(n) and not n.endswith(fp8.SCALE_SUFFIX)):
        original = dequantize_reference(stored[name], stored[name + fp8.SCALE_SUFFIX], (128, 128)).astype(np.float64)
        scale = out.read(name + fp8.SCALE_SUFFIX)
        back = dequantize_reference(out.read(name), scale, (128, 128)).astype(np.float64)
        rows, cols = np.indices(back.shape)
        bound = (2**-4 + 2**-9) * 1.001 * np.abs(original) + 2**-10 * scale[rows // 128, cols // 128]
        assert (np.abs(back - original) <= bound).all(), name
        assert (back != original).any(), name  # the bound is exercised, not trivially met
        checked += 1
    assert checked > 10


def test_exported_fp8_reads_back_with_the_fp8_reader(fp8_export, tmp_path):
    d, cfg, _ = fp8_export
    reader = fp8.DequantizingReader(SafetensorsReader(d / "fp8"), (128, 128), "export")
    assert reader.scale_of and all(quantized(n) for n in reader.scale_of)
    cfg2, params = r1jax.load_pretrained(d / "fp8")
    assert cfg2.param_dtype == "bfloat16" and cfg2.num_nextn_predict_layers == 1
    _, original = load_model(d / "orbax")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(original)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a, b, rtol=2**-4 + 2**-8, atol=1e-3 * np.abs(b).max(),
                                   err_msg=jax.tree_util.keystr(path))
    hf_to_orbax(d / "fp8", tmp_path / "again", progress=False)  # and the converter reads it as a release
    assert_trees_equal(load_model(tmp_path / "again")[1], params)


def test_fp8_export_refuses_what_it_cannot_write(fp8_export, tmp_path):
    d, _, _ = fp8_export
    with pytest.raises(ConfigError, match="quantize: expected one of fp8, got 'int4'"):
        orbax_to_hf(d / "orbax", tmp_path / "x", quantize="int4", progress=False)
    assert no_leftovers(tmp_path, "x")
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16).save_pretrained(
        tmp_path / "qwen")
    hf_to_orbax(tmp_path / "qwen", tmp_path / "qwen_orbax", progress=False)
    with pytest.raises(ConfigError, match="quantize: fp8 writes DeepSeek's FP8 release format; a qwen2 model"):
        orbax_to_hf(tmp_path / "qwen_orbax", tmp_path / "y", quantize="fp8", progress=False)
    assert no_leftovers(tmp_path, "y")


def test_fp8_export_of_non_finite_weights_is_named_and_leaves_nothing(hf_dirs, tmp_path):
    src, cfg, params = hf_dirs["float32"]
    bad = jax.tree.map(np.array, params)
    bad["moe_layers"]["mlp"]["experts"]["up"][1, 3, 5, 7] = np.inf
    r1jax.save_pretrained(tmp_path / "orbax", cfg, bad, format="orbax")
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    with pytest.raises(CheckpointError, match=rf"{name}: cannot quantize to FP8, rows 0:32 hold inf or nan"):
        orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", quantize="fp8", progress=False)
    assert no_leftovers(tmp_path, "hf")


# --------------------------------------------------------------------------- sharded loads


def _shardings(cfg, mesh):
    """Some heads/ffn (HF rows) on 'model', experts and some input dims (HF columns) on 'data'."""
    rules = {"heads": "model", "mlp": "model", "expert_mlp": "model", "vocab": "model", "expert": "data",
             "embed": "data", "q_lora": "data"}

    def spec(s):
        used, axes = set(), []
        for size, axis in zip(s.shape, s.axes):
            m = rules.get(axis)
            ok = m is not None and m not in used and size % mesh.shape[m] == 0
            axes.append(m if ok else None)
            used.add(m) if ok else None
        return NamedSharding(mesh, P(*axes))

    return jax.tree.map(spec, param_table(cfg), is_leaf=is_spec)


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def test_sharded_load_reads_only_each_devices_rows(hf_dirs, mesh, monkeypatch):
    src, cfg, params = hf_dirs["float32"]
    reads = []
    real = SafetensorsReader.read_rows
    monkeypatch.setattr(SafetensorsReader, "read_rows",
                        lambda self, n, a, b: reads.append((n, a, b)) or real(self, n, a, b))
    _, loaded = hf_io.load_hf(src, shardings=lambda c: _shardings(c, mesh))
    assert_trees_equal(loaded, params)
    kv_b = loaded["moe_layers"]["attn"]["kv_b"]  # [layers, L, heads, N+V], heads on 'model'
    assert kv_b.sharding.spec == P(None, None, "model", None)
    for shard in kv_b.addressable_shards:
        want = np.asarray(params["moe_layers"]["attn"]["kv_b"])[shard.index]
        np.testing.assert_array_equal(np.asarray(shard.data), want)
    rows = 4 * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # HF rows of one kv_b_proj
    kv_reads = {(a, b) for n, a, b in reads if n.endswith("kv_b_proj.weight")}
    assert kv_reads == {(i * rows // 4, (i + 1) * rows // 4) for i in range(4)}  # a quarter per device


def test_sharded_fp8_load_matches_unsharded(fp8_release, mesh):
    src, _, _ = fp8_release
    _, full = hf_io.load_hf(src)
    _, sharded = hf_io.load_hf(src, shardings=lambda c: _shardings(c, mesh))
    assert_trees_equal(sharded, full)


def test_load_pretrained_with_a_mesh_uses_the_parallel_rules(hf_dirs, mesh, monkeypatch):
    src, _, params = hf_dirs["bfloat16"]
    rules = types.ModuleType("r1jax.model.sharding")
    rules.param_shardings = _shardings  # stands in for r1jax.model.sharding, written elsewhere
    monkeypatch.setitem(sys.modules, "r1jax.model.sharding", rules)
    _, loaded = r1jax.load_pretrained(src, mesh=mesh)
    assert loaded["embed"].sharding.spec == P("model", "data")
    assert_trees_equal(loaded, params)


# --------------------------------------------------------------------------- bad input


def _copy_hf(src, dst, edit=None, config_edit=None):
    """A single-file copy of a HF directory with its tensors (and config) edited."""
    dst.mkdir()
    tensors = {n: SafetensorsReader(src).read(n) for n in SafetensorsReader(src).names}
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


EXPERT = "model.layers.2.mlp.experts.5.down_proj.weight"


FP8_CONFIG = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}


@pytest.mark.parametrize("edit,config,message", [
    (lambda t: t.pop(EXPERT), {}, f"tensor '{EXPERT}' is missing"),
    (lambda t: t.__setitem__("model.layers.1.mlp.gate.extra", np.ones(2, np.float32)), {},
     "unexpected tensor 'model.layers.1.mlp.gate.extra'"),
    (lambda t: t.__setitem__(EXPERT, t[EXPERT][:, :-1]), {},
     rf"tensor '{EXPERT}' has shape \[64, 31\], expected \[64, 32\]"),
    (lambda t: t.__setitem__(EXPERT, t[EXPERT].astype(np.int32)), {},
     f"tensor '{EXPERT}' has dtype I32, expected one of"),
    (lambda t: t.__setitem__(EXPERT + "_scale_inv", np.ones((1, 1), np.float32)), FP8_CONFIG,
     rf"tensor '{EXPERT}' has a '{EXPERT}_scale_inv' companion but is F32"),
])
def test_bad_tensors_are_named_and_nothing_is_written(hf_dirs, tmp_path, edit, config, message):
    src, _, _ = hf_dirs["float32"]
    bad = _copy_hf(src, tmp_path / "bad", edit, lambda c: c.update(config))
    with pytest.raises(CheckpointError, match=message):
        hf_to_orbax(bad, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path, "out")


def test_bad_fp8_companions_are_named(fp8_release, tmp_path):
    src, _, stored = fp8_release
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    import torch
    from safetensors.torch import save_file as torch_save

    def variant(label, drop=(), replace=None, config=None):
        d = tmp_path / label
        d.mkdir()
        tensors = {n: torch.from_numpy(v.view(np.uint8)).view(torch.float8_e4m3fn) if v.dtype == ml_dtypes.float8_e4m3fn
                   else torch.from_numpy(v.astype(np.float32)) for n, v in stored.items() if n not in drop}
        tensors.update(replace or {})
        torch_save(tensors, str(d / "model.safetensors"))
        hf_cfg = json.loads((src / "config.json").read_text())
        hf_cfg.update(config or {})
        (d / "config.json").write_text(json.dumps(hf_cfg))
        return d

    with pytest.raises(CheckpointError, match=f"tensor '{name}' is F8_E4M3 but has no '{name}_scale_inv'"):
        r1jax.load_pretrained(variant("noscale", drop=[name + "_scale_inv"]))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}_scale_inv' has shape \[1, 1\], expected \[\d+, \d+\]"):
        r1jax.load_pretrained(variant("shape", replace={name + "_scale_inv": torch.ones(1, 1)}))
    orphan = "model.layers.0.mlp.nothing.weight_scale_inv"
    with pytest.raises(CheckpointError, match=f"unexpected tensor '{orphan}' \\(there is no weight"):
        r1jax.load_pretrained(variant("orphan", replace={orphan: torch.ones(1, 1)}))
    with pytest.raises(ConfigError, match=r"quantization_config.weight_block_size: expected \[rows, cols\]"):
        r1jax.load_pretrained(variant("block", config={"quantization_config": {"quant_method": "fp8",
                                                                                "weight_block_size": [128]}}))
    with pytest.raises(CheckpointError, match="an FP8 checkpoint.* but config.json has no quantization_config"):
        r1jax.load_pretrained(variant("noconfig", config={"quantization_config": None}))


def test_corrupt_index_and_truncated_files_are_named(hf_dirs, tmp_path):
    import shutil

    src, _, _ = hf_dirs["float32"]
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]

    def copy(label):
        d = tmp_path / label
        shutil.copytree(src, d)
        return d

    d = copy("corrupt")
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a valid safetensors index"):
        hf_to_orbax(d, tmp_path / "out", progress=False)
    d = copy("lost")
    (d / shard).unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shard}, which does not exist"):
        hf_to_orbax(d, tmp_path / "out", progress=False)
    d = copy("lies")
    name = next(n for n, f in index["weight_map"].items() if f == shard)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {**index["weight_map"], name: sorted(set(index["weight_map"].values()))[0]}}))
    with pytest.raises(CheckpointError, match=f"index lists tensor '{name}' but the file lacks it"):
        hf_to_orbax(d, tmp_path / "out", progress=False)
    d = copy("truncated")
    data = (d / shard).read_bytes()
    (d / shard).write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard}: cannot read safetensors file .*truncated"):
        hf_to_orbax(d, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path, "out")


def test_existing_destinations_are_never_touched(hf_dirs, tmp_path):
    src, _, _ = hf_dirs["float32"]
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    for fn, source in ((hf_to_orbax, src), (orbax_to_hf, tmp_path / "orbax")):
        dst = tmp_path / f"taken-{fn.__name__}"
        dst.mkdir()
        (dst / "keep.txt").write_text("precious")
        with pytest.raises(CheckpointError, match="already exists and is not empty"):
            fn(source, dst, progress=False)
        assert _files(dst) == ["keep.txt"]
    hf_to_orbax(src, tmp_path / "orbax", dtype="bfloat16", overwrite=True, progress=False)
    assert load_model(tmp_path / "orbax")[0].param_dtype == "bfloat16"


def test_a_failure_midway_leaves_nothing(hf_dirs, tmp_path, monkeypatch):
    from r1jax.convert.safetensors_io import ShardedWriter

    src, _, _ = hf_dirs["float32"]
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    calls = []
    real = SafetensorsReader._pread_into

    def failing(self, info, buf, offset):
        calls.append(info.name)
        if len(calls) == 40:
            raise CheckpointError(f"{info.name}: simulated read error")
        return real(self, info, buf, offset)

    monkeypatch.setattr(SafetensorsReader, "_pread_into", failing)
    with pytest.raises(CheckpointError, match="simulated read error"):
        hf_to_orbax(src, tmp_path / "out", progress=False)
    assert no_leftovers(tmp_path, "out")
    monkeypatch.undo()
    writes = []
    real_write = ShardedWriter.write

    def disk_full(self, *args):
        writes.append(args[0])
        if len(writes) == 30:
            raise OSError("disk full")
        return real_write(self, *args)

    monkeypatch.setattr(ShardedWriter, "write", disk_full)
    with pytest.raises(OSError, match="disk full"):
        orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)
    assert no_leftovers(tmp_path, "hf")
    monkeypatch.undo()

    def io_error(fd):  # the disk fails while the result is being written back
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", io_error)
    with pytest.raises(OSError, match="Input/output error"):
        hf_to_orbax(src, tmp_path / "out", progress=False)
    with pytest.raises(OSError, match="Input/output error"):
        orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)
    assert no_leftovers(tmp_path, "out") and no_leftovers(tmp_path, "hf")


def test_orbax_checkpoint_that_does_not_fit_its_config_is_named(hf_dirs, tmp_path):
    import shutil

    import yaml

    src, _, _ = hf_dirs["float32"]
    hf_to_orbax(src, tmp_path / "orbax", progress=False)
    f = tmp_path / "orbax" / "config.yaml"
    d = yaml.safe_load(f.read_text())
    f.write_text(yaml.safe_dump({**d, "param_dtype": "bfloat16"}))
    with pytest.raises(CheckpointError, match=r"leaf '\S+' has dtype float32, expected bfloat16"):
        orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)
    f.write_text(yaml.safe_dump(d))
    leaf = tmp_path / "orbax" / "params" / "moe_layers.mlp.experts.up"
    next(f for f in sorted(leaf.iterdir()) if not f.name.startswith(".")).unlink()  # lost: seen mid-write
    with pytest.raises(CheckpointError, match=r"leaf 'moe_layers.mlp.experts.up' \[0:2, 0:8\]: cannot read"):
        orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)
    shutil.rmtree(tmp_path / "orbax" / "params" / "moe_layers.attn.kv_b")
    with pytest.raises(CheckpointError, match=r"missing leaf 'moe_layers.attn.kv_b' \(no moe_layers.attn.kv_b/"):
        orbax_to_hf(tmp_path / "orbax", tmp_path / "hf", progress=False)
    assert no_leftovers(tmp_path, "hf")


# --------------------------------------------------------------------------- command line


def test_convert_command_line(hf_dirs, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="r1jax")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    src, cfg, params = hf_dirs["float32"]

    def run(*argv):
        args = parser.parse_args(["convert", *map(str, argv)])
        return args.func(args)

    assert run("hf-to-orbax", src, tmp_path / "o", "--dtype", "bfloat16") == 0
    assert "wrote the orbax checkpoint" in capsys.readouterr().out
    assert load_model(tmp_path / "o")[0].param_dtype == "bfloat16"
    assert run("orbax-to-hf", tmp_path / "o", tmp_path / "h", "--max-shard-size", "100KB", "--dtype", "float32") == 0
    weight_map = json.loads((tmp_path / "h" / "model.safetensors.index.json").read_text())["weight_map"]
    reader = SafetensorsReader(tmp_path / "h")
    shards = {f: [n for n, g in weight_map.items() if g == f] for f in set(weight_map.values())}
    assert len(shards) > 1
    for names in shards.values():  # within 100 kB, or a single larger tensor
        assert sum(reader.info(n).nbytes for n in names) <= 100_000 or len(names) == 1
    cfg_h, params_h = r1jax.load_pretrained(tmp_path / "h")
    assert cfg_h.param_dtype == "float32"
    bf16 = param_shapes(cfg.replace(param_dtype="bfloat16"))  # the router bias stays fp32 throughout
    assert_trees_equal(params_h, jax.tree.map(lambda p, s: np.asarray(p).astype(s.dtype).astype(p.dtype), params, bf16))
    with pytest.raises(CheckpointError, match="already exists"):
        run("hf-to-orbax", src, tmp_path / "o")
    assert run("hf-to-orbax", src, tmp_path / "o", "--overwrite") == 0
    assert load_model(tmp_path / "o")[0].param_dtype == "float32"
    with pytest.raises(SystemExit):
        run("hf-to-orbax", src, tmp_path / "x", "--dtype", "int8")
    assert run("orbax-to-hf", tmp_path / "o", tmp_path / "f", "--quantize", "fp8") == 0
    written = json.loads((tmp_path / "f" / "config.json").read_text())
    assert written["quantization_config"]["weight_block_size"] == [128, 128] and written["torch_dtype"] == "bfloat16"
    assert SafetensorsReader(tmp_path / "f").dtype("model.layers.0.mlp.down_proj.weight") == "F8_E4M3"
    with pytest.raises(SystemExit):
        run("orbax-to-hf", tmp_path / "o", tmp_path / "g", "--quantize", "int4")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5kb") == 1500 and parse_size(123) == 123 and parse_size("100000") == 100_000
    for bad in ("five", "5XB", "0", "-1GB", True):
        with pytest.raises(ConfigError, match="max_shard_size"):
            parse_size(bad)
