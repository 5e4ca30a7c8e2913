"""The public entry points named in DESIGN.md: forward, load_pretrained, save_pretrained."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from r1jax.config import ModelConfig
from r1jax.convert import hf as hf_convert
from r1jax.convert.safetensors_io import SafetensorsReader, write_sharded
from r1jax.errors import CheckpointError, ConfigError, DataError
from r1jax.model import transformer

SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def check_tokens(tokens, cfg: ModelConfig) -> jax.Array:
    """Validate a concrete token batch: int [batch, seq], every id in [0, vocab_size)."""
    if isinstance(tokens, jax.core.Tracer):
        return tokens
    arr = np.asarray(tokens)
    if arr.ndim != 2:
        raise DataError(f"tokens: expected shape [batch, seq], got {list(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"tokens: expected an integer dtype, got {arr.dtype}")
    if arr.size == 0:
        raise DataError(f"tokens: empty batch of shape {list(arr.shape)}")
    bad = (arr < 0) | (arr >= cfg.vocab_size)
    if bad.any():
        b, t = map(int, np.argwhere(bad)[0])
        raise DataError(f"tokens[{b}, {t}] = {int(arr[b, t])} is outside the vocabulary [0, {cfg.vocab_size})")
    return jnp.asarray(arr, jnp.int32)


def forward(params: dict, tokens, config: ModelConfig) -> jax.Array:
    """Logits [batch, seq, vocab_size] float32 of the main head; causal, positions 0..seq-1."""
    return transformer.forward_jit(params, check_tokens(tokens, config), config)


# --------------------------------------------------------------------------- loading


def read_hf_config(path) -> dict:
    f = Path(path) / "config.json"
    try:
        d = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face model directory)") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    return d


def _checkpoint_dtype(reader: SafetensorsReader) -> str:
    for name in sorted(reader.names):
        if name.endswith("embed_tokens.weight"):
            return SAFETENSORS_DTYPES.get(reader.dtype(name), "float32")
    return "float32"


def _load_hf(path, dtype, mesh):
    hf_cfg = read_hf_config(path)
    reader = SafetensorsReader(path)
    dtype = dtype or _checkpoint_dtype(reader)
    cfg = ModelConfig.from_hf_config(hf_cfg, dtype=dtype, param_dtype=dtype)
    if cfg.num_nextn_predict_layers and not any(
        n.startswith(f"model.layers.{cfg.num_hidden_layers}.") for n in reader.names
    ):
        # transformers saves no MTP module (spec §6): load the main model without one.
        cfg = cfg.replace(num_nextn_predict_layers=0)
    params = hf_convert.hf_to_params(cfg, reader.names, reader.get, reader.shape, source=str(path))
    return cfg, _place(params, cfg, mesh)


def _place(params, cfg: ModelConfig, mesh):
    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    from r1jax.parallel.rules import param_shardings

    return jax.device_put(params, param_shardings(cfg, mesh))


def load_pretrained(path, *, dtype=None, mesh=None):
    """(ModelConfig, params) from a HF directory (config.json + safetensors) or an r1jax checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if dtype is not None:
        dtype = jnp.dtype(dtype).name
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    if (path / "config.json").exists():
        return _load_hf(path, dtype, mesh)
    from r1jax.checkpoint import orbax_io

    if orbax_io.is_model_checkpoint(path):
        return orbax_io.load_model(path, dtype=dtype, mesh=mesh)
    raise CheckpointError(f"{path}: neither a Hugging Face directory (config.json) nor an r1jax checkpoint")


# --------------------------------------------------------------------------- saving


class _AtomicDir:
    """Write into a temporary sibling and rename on success, so `dst` appears only when complete
    and an existing `dst` is never touched unless overwrite=True."""

    def __init__(self, dst, overwrite: bool):
        self.dst = Path(dst)
        if self.dst.exists() and (not self.dst.is_dir() or any(self.dst.iterdir())) and not overwrite:
            raise CheckpointError(f"{self.dst}: already exists and is not empty (pass overwrite=True)")

    def __enter__(self) -> Path:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dst)
        return False


def save_pretrained(path, config: ModelConfig, params: dict, *, format: str = "hf", overwrite: bool = False,
                    max_shard_size: int = 5 * 2**30, dtype=None) -> Path:
    """Write params as a HF directory (config.json + safetensors) or an r1jax orbax checkpoint."""
    if format not in ("hf", "orbax"):
        raise ConfigError(f"format: expected 'hf' or 'orbax', got {format!r}")
    if format == "orbax":
        from r1jax.checkpoint import orbax_io

        return orbax_io.save_model(path, config, params, overwrite=overwrite)
    # Validate every leaf before writing anything.
    hf_convert.check_params(config, params)
    np_dtype = None if dtype is None else jnp.dtype(dtype)
    with _AtomicDir(path, overwrite) as tmp:
        hf_cfg = config.to_hf_config()
        first = params["embed"].dtype if np_dtype is None else np_dtype
        hf_cfg["dtype" if "dtype" in hf_cfg else "torch_dtype"] = jnp.dtype(first).name
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
        write_sharded(tmp, hf_convert.params_to_hf(config, params, np_dtype), max_shard_size)
    return Path(path)
