"""The safetensors layer of r1jax.convert: byte-for-byte agreement with the safetensors library's own
writer, raw reads of float8, header validation with named errors, sharding and its index."""

import json
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from r1jax.convert.safetensors_io import (INDEX, SafetensorsReader, ShardedWriter, TensorPlan, dtype_name,
                                          read_header)
from r1jax.errors import CheckpointError


def _tensors(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "model.layers.1.w": rng.standard_normal((5, 7)).astype(np.float32),
        "model.layers.0.w": rng.standard_normal((3, 4)).astype(ml_dtypes.bfloat16),
        "b.half": rng.standard_normal(9).astype(np.float16),
        "a.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "z.f64": rng.standard_normal((2, 2)),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 4), np.float32),
        "ünïcode.name": np.ones(3, np.float32),
    }


def _plan(tensors):
    return [TensorPlan(n, tuple(a.shape), dtype_name(a.dtype)) for n, a in tensors.items()]


def test_writer_is_byte_identical_to_safetensors_save_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    with ShardedWriter(out, _plan(tensors), max_shard_bytes=10**9) as w:
        # Any order, and tensors in blocks of rows: the layout is planned up front.
        for name in sorted(tensors, reverse=True):
            a = tensors[name]
            if a.ndim == 2 and a.shape[0] > 1:
                w.write(name, a[1:], start_row=1)
                w.write(name, a[:1], start_row=0)
            else:
                w.write(name, a)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert not (out / INDEX).exists()


def test_reader_round_trips_every_dtype_and_row_ranges(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    r = SafetensorsReader(tmp_path)
    assert r.names == set(tensors)
    for name, a in tensors.items():
        got = r.read(name)
        assert got.dtype == a.dtype and got.shape == a.shape
        np.testing.assert_array_equal(got, a)
    np.testing.assert_array_equal(r.read_rows("model.layers.1.w", 2, 4), tensors["model.layers.1.w"][2:4])
    r.close()


def test_reader_reads_float8_written_by_torch(tmp_path):
    import torch
    from safetensors.torch import save_file as torch_save

    q = torch.linspace(-448, 448, 60).reshape(6, 10).to(torch.float8_e4m3fn)
    torch_save({"w": q, "w_scale_inv": torch.ones(1, 1)}, str(tmp_path / "model.safetensors"))
    r = SafetensorsReader(tmp_path)
    assert r.dtype("w") == "F8_E4M3"
    got = r.read_rows("w", 1, 5)
    assert got.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(got.astype(np.float32), q.float().numpy()[1:5])


def _corrupt(tmp_path, edit):
    f = tmp_path / "model.safetensors"
    save_file({"a": np.ones((4, 4), np.float32), "b": np.zeros(3, np.float32)}, str(f))
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    new = edit(data, header, n)
    if new is not None:
        f.write_bytes(new)
    return f


def _rewrite(data, header, n):
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n:])


@pytest.mark.parametrize("edit,message", [
    (lambda d, h, n: bytes(d[:5]), "shorter than the 8-byte header length"),
    (lambda d, h, n: bytes(d[:20]), r"header length \d+ does not fit in a file of 20 bytes \(truncated\?\)"),
    (lambda d, h, n: bytes(d[:-1]), r"the header describes \d+ bytes, the file has \d+ \(truncated\?\)"),
    (lambda d, h, n: bytes(d) + b"\0", r"the header describes \d+ bytes, the file has \d+"),
    (lambda d, h, n: bytes(d[:8]) + b"{not json" + bytes(d[17:]), "header is not valid JSON"),
    (lambda d, h, n: _rewrite(d, {**h, "a": {**h["a"], "dtype": "Q7"}}, n), "tensor 'a': unknown dtype 'Q7'"),
    (lambda d, h, n: _rewrite(d, {**h, "a": {**h["a"], "shape": [4, 5]}}, n),
     r"tensor 'a': F32 \[4, 5\] needs 80 bytes, data_offsets give 64"),
    (lambda d, h, n: _rewrite(d, {**h, "b": {**h["b"], "data_offsets": [0, 12]}}, n),
     "data_offsets start at 0, expected"),
    (lambda d, h, n: _rewrite(d, {**h, "a": {"dtype": "F32"}}, n), "tensor 'a': header entry needs"),
])
def test_bad_headers_are_named(tmp_path, edit, message):
    f = _corrupt(tmp_path, edit)
    with pytest.raises(CheckpointError, match=f"{f}: cannot read safetensors file .*{message}"):
        read_header(f)


def test_sharded_writer_plans_shards_and_index(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {f"t{i:02d}": rng.standard_normal((10, 25)).astype(np.float32) for i in range(12)}
    tensors["big"] = rng.standard_normal((100, 100)).astype(np.float32)  # larger than a shard: alone
    plan = _plan(tensors)
    with ShardedWriter(tmp_path, plan, max_shard_bytes=3000) as w:
        for name, a in tensors.items():
            w.write(name, a)
    index = json.loads((tmp_path / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in tensors.values())
    assert [n for n, f in index["weight_map"].items() if f == index["weight_map"]["big"]] == ["big"]
    for f in files:  # every shard within the limit unless it holds a single larger tensor
        names = [n for n, g in index["weight_map"].items() if g == f]
        assert sum(tensors[n].nbytes for n in names) <= 3000 or len(names) == 1
    r = SafetensorsReader(tmp_path)
    for name, a in tensors.items():
        np.testing.assert_array_equal(r.read(name), a)


def test_incomplete_or_wrong_writes_are_named(tmp_path):
    a = np.ones((4, 3), np.float32)
    with pytest.raises(CheckpointError, match="tensor 'b' was not completely written"):
        with ShardedWriter(tmp_path, _plan({"a": a, "b": a}), 10**6) as w:
            w.write("a", a)
            w.write("b", a[:2])
    with pytest.raises(CheckpointError, match=r"b: cannot write float64 \[2, 3\] at row 0 of a F32 \[4, 3\]"):
        with ShardedWriter(tmp_path, _plan({"b": a}), 10**6) as w:
            w.write("b", a[:2].astype(np.float64))
