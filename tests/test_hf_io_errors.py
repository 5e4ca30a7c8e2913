"""Bad Hugging Face directories give errors naming the file, tensor or field; nothing is half-written."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import r1jax
from r1jax.demo import tiny_config
from r1jax.errors import CheckpointError, ConfigError
from r1jax.model.params import init_params


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    d = tmp_path_factory.mktemp("hf") / "model"
    r1jax.save_pretrained(d, cfg, params)
    return cfg, params, d


def _copy(src, dst, edit=None, config_edit=None):
    dst.mkdir()
    tensors = load_file(str(src / "model.safetensors"))
    if edit:
        edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    c = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(c)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_missing_tensor_is_named(saved, tmp_path):
    _, _, d = saved
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    bad = _copy(d, tmp_path / "m", edit=lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
        r1jax.load_pretrained(bad)


def test_wrong_shape_is_named(saved, tmp_path):
    _, _, d = saved
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    bad = _copy(d, tmp_path / "m", edit=lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' has shape \[127, 32\], expected \[128, 32\]"):
        r1jax.load_pretrained(bad)


def test_unexpected_tensor_is_named(saved, tmp_path):
    _, _, d = saved
    bad = _copy(d, tmp_path / "m", edit=lambda t: t.__setitem__("model.layers.0.extra.weight", np.ones(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        r1jax.load_pretrained(bad)


def test_config_missing_or_inconsistent_field_is_named(saved, tmp_path):
    _, _, d = saved
    bad = _copy(d, tmp_path / "a", config_edit=lambda c: c.pop("kv_lora_rank"))
    with pytest.raises(ConfigError, match="kv_lora_rank: required field missing"):
        r1jax.load_pretrained(bad)
    bad = _copy(d, tmp_path / "b", config_edit=lambda c: c.update(n_group=3))
    with pytest.raises(ConfigError, match=r"n_group: n_routed_experts \(8\) must be divisible by n_group \(3\)"):
        r1jax.load_pretrained(bad)
    bad = _copy(d, tmp_path / "c")
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        r1jax.load_pretrained(bad)


def test_sharded_index_problems_are_named(saved, tmp_path):
    cfg, params, _ = saved
    d = tmp_path / "sharded"
    r1jax.save_pretrained(d, cfg, params, max_shard_size=100_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    c2, p2 = r1jax.load_pretrained(d)
    jax.tree.map(np.testing.assert_array_equal, params, p2)
    (d / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"lists shard {shards[1]}, which does not exist"):
        r1jax.load_pretrained(d)
    (d / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        r1jax.load_pretrained(d)


def test_truncated_safetensors_file_is_named(saved, tmp_path):
    _, _, d = saved
    bad = _copy(d, tmp_path / "m")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        r1jax.load_pretrained(bad)


def test_existing_destination_is_never_overwritten(saved, tmp_path):
    cfg, params, _ = saved
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        r1jax.save_pretrained(dst, cfg, params)
    assert (dst / "keep.txt").read_text() == "precious"
    # a params tree that does not fit the config fails before anything is written
    broken = jax.tree.map(lambda a: a, params)
    broken["moe_layers"]["mlp"]["experts"]["gate"] = broken["moe_layers"]["mlp"]["experts"]["gate"][:, :4]
    with pytest.raises(CheckpointError, match=r"leaf moe_layers/mlp/experts/gate has shape \[2, 4, 64, 32\]"):
        r1jax.save_pretrained(tmp_path / "new", cfg, broken)
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]


def test_missing_path_and_non_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        r1jax.load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a Hugging Face directory"):
        r1jax.load_pretrained(tmp_path / "empty")
