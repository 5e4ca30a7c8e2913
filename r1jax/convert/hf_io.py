"""Hugging Face model directories ⇄ r1jax params: config.json + safetensors (bf16/fp32, or DeepSeek's
FP8 release), and the files that travel with the weights (tokenizer, generation config, ...).

Reading checks every name, shape and dtype against the config before any tensor is read, then
fills one leaf at a time (or, with shardings, lets each device read only its own block). Writing
plans every shard up front and streams each tensor into place (safetensors_io.ShardedWriter).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import paths
from r1jax.config import DenseConfig, ModelConfig, config_from_hf
from r1jax.convert import fp8, hf
from r1jax.convert.atomic import AtomicDir
from r1jax.convert.safetensors_io import INDEX, SafetensorsReader, ShardedWriter
from r1jax.errors import CheckpointError, ConfigError
from r1jax.model.params import param_dtype

CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
_NOT_ASSETS = {CONFIG, INDEX, "config.yaml"}  # config.yaml: an r1jax checkpoint's own config
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


def read_hf_config(path) -> dict:
    f = paths.as_path(path) / CONFIG
    try:
        d = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    return d


def asset_files(src) -> list[Path]:
    """Files that travel with the weights (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json, chat templates, README, ...): every top-level
    file but config.json, the weights and their index."""
    return [f for f in sorted(paths.as_path(src).iterdir())
            if f.is_file() and not f.name.startswith(".") and f.name not in _NOT_ASSETS
            and not f.name.endswith(_WEIGHT_SUFFIXES)]


def copy_assets(src, dst) -> list[str]:
    files = asset_files(src)
    for f in files:
        paths.copy_file(f, paths.as_path(dst) / f.name)
    return [f.name for f in files]


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass
class HFCheckpoint:
    """A HF directory opened and checked against its config; `source` reads (dequantized) rows."""
    path: Path
    cfg: ModelConfig | DenseConfig
    source: SafetensorsReader | fp8.DequantizingReader

    def close(self) -> None:
        self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_hf(path, dtype=None) -> HFCheckpoint:
    """Read config.json and every safetensors header, and check all tensors against the config.
    `dtype` (default: the checkpoint's own, bfloat16 for the FP8 release) becomes the config's
    dtype and param_dtype."""
    path = Path(path)
    hf_cfg = read_hf_config(path)
    block = fp8.weight_block_size(hf_cfg)
    reader = SafetensorsReader(path)
    if block is None and any(n.endswith(fp8.SCALE_SUFFIX) for n in reader.names):
        raise CheckpointError(f"{path}: holds *{fp8.SCALE_SUFFIX} tensors (an FP8 checkpoint) but config.json "
                              f"has no quantization_config")
    source = reader if block is None else fp8.DequantizingReader(reader, block, str(path))
    dtype = dtype or ("bfloat16" if block is not None else hf.checkpoint_dtype(source))
    if block is not None:
        # The weights leave dequantized, so a config.json written from this one must not claim FP8.
        hf_cfg = {k: v for k, v in hf_cfg.items() if k != "quantization_config"}
    cfg = config_from_hf(hf_cfg, dtype=dtype, param_dtype=dtype)  # DeepSeek, or a dense student
    if getattr(cfg, "num_nextn_predict_layers", 0) and not any(
        n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in source.names
    ):
        # transformers saves no MTP module (docs/deepseek_v3.md §6): load the main model without one.
        cfg = cfg.replace(num_nextn_predict_layers=0)
    hf.check_source(cfg, source, str(path))
    return HFCheckpoint(path, cfg, source)


def _sharded_leaf(entry: hf.Entry, source, sharding, dtype) -> jax.Array:
    """Each device reads only its own block; devices holding the same block share one read."""
    blocks = {}

    def block(index):
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in blocks:
            blocks[key] = hf.read_leaf_block(entry, source, index, dtype)
        return blocks[key]

    return jax.make_array_from_callback(entry.spec.shape, sharding, block)


def load_params(ckpt: HFCheckpoint, shardings=None) -> dict:
    """The params pytree of jax arrays, built one leaf at a time (host memory: the params plus one
    leaf). `shardings` (a pytree of jax.sharding.Sharding like the params) places each leaf directly."""
    params = {}
    for e in hf.entries(ckpt.cfg):
        dtype = param_dtype(e.spec, ckpt.cfg)
        if shardings is None:
            leaf = jnp.asarray(hf.fill_slab(e, ckpt.source, hf.full_slab(e), dtype))
        else:
            leaf = _sharded_leaf(e, ckpt.source, hf.get_leaf(shardings, e.keys), dtype)
        hf.set_leaf(params, e.keys, leaf)
    return params


def load_hf(path, dtype=None, shardings=None) -> tuple[ModelConfig | DenseConfig, dict]:
    """(config, params) from a HF directory; `shardings` may also be a function cfg -> shardings."""
    with open_hf(path, dtype) as ckpt:
        if callable(shardings):
            shardings = shardings(ckpt.cfg)
        return ckpt.cfg, load_params(ckpt, shardings)


# --------------------------------------------------------------------------- writing


def generation_config(hf_cfg: dict) -> dict:
    """What transformers derives from the model config when a directory has no generation_config.json."""
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_cfg.get(key) is not None:
            out[key] = hf_cfg[key]
    return out


def write_config_files(dst: Path, cfg: ModelConfig | DenseConfig, dtype_name: str, assets_from=None,
                       quantization_config: dict | None = None) -> None:
    """config.json (with the weights' dtype, and `quantization_config` for an FP8 directory), the
    assets of `assets_from`, and a generation_config.json derived from the config when none came with
    them."""
    hf_cfg = cfg.to_hf_config()
    hf_cfg["dtype" if "dtype" in hf_cfg else "torch_dtype"] = dtype_name
    if quantization_config is not None:
        hf_cfg["quantization_config"] = quantization_config
    (dst / CONFIG).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if assets_from is not None:
        copy_assets(assets_from, dst)
    if not (dst / GENERATION_CONFIG).exists():
        (dst / GENERATION_CONFIG).write_text(json.dumps(generation_config(hf_cfg), indent=2, sort_keys=True))


def save_hf(path, cfg: ModelConfig | DenseConfig, params: dict, *, dtype=None, max_shard_size: int = 5 * 2**30,
            overwrite: bool = False) -> Path:
    """Write params as a HF directory; every leaf is checked before anything is written, and the
    directory appears only once complete."""
    hf.check_params(cfg, params)
    paths.check_destination(path, overwrite)
    with paths.local_destination(path, "save-hf") as local, AtomicDir(local, overwrite) as tmp:  # gs://: uploaded
        with ShardedWriter(tmp, hf.tensor_plan(cfg, dtype), max_shard_size) as writer:
            for e in hf.entries(cfg):
                hf.write_leaf(writer, e, cfg, hf.full_slab(e), np.asarray(hf.get_leaf(params, e.keys)), dtype)
        first = params["embed"].dtype if dtype is None else dtype
        write_config_files(tmp, cfg, jnp.dtype(first).name)
    return paths.as_path(path)
