"""The public model API (docs/ARCHITECTURE.md, "Public interfaces"): forward, load_pretrained,
save_pretrained, read_config."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from r1jax import paths
from r1jax.config import DTYPES, ModelConfig, config_from_hf
from r1jax.convert import hf_io
from r1jax.errors import ConfigError, DataError
import r1jax.model as model_lib

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
    return model_lib.forward_jit(params, check_tokens(tokens, config), config)


# --------------------------------------------------------------------------- loading


def _param_shardings(mesh):
    """cfg -> the params' NamedShardings on `mesh` (r1jax.model.sharding), or None without a mesh."""
    if mesh is None:
        return None
    from r1jax.model.sharding import param_shardings

    return lambda cfg: param_shardings(cfg, mesh)


def _load_hf(path, dtype, mesh, shardings):
    """A HF directory (bf16/fp32, or the FP8 release dequantized to `dtype`, default bfloat16); with a
    mesh every device reads only its own block of each tensor."""
    with paths.local_source(path, "hf-model") as local:  # gs://: downloaded (safetensors are read by pread)
        return hf_io.load_hf(local, dtype, _param_shardings(mesh) if shardings is None else shardings)


def _load_orbax(path, dtype, mesh, shardings):
    from r1jax.checkpoint import orbax_io

    return orbax_io.load_model(path, dtype=dtype, mesh=mesh, shardings=shardings)


def _read_hf_config(path):
    if paths.is_remote(path):
        # The headers would cost downloading the weights: config.json alone gives the architecture (the
        # dtype is config.json's, and an MTP layer is assumed present when it declares one).
        d = hf_io.read_hf_config(path)
        dtype = d.get("torch_dtype") or d.get("dtype") or "float32"
        dtype = "bfloat16" if "quantization_config" in d or dtype not in DTYPES else dtype
        return config_from_hf({k: v for k, v in d.items() if k != "quantization_config"}, dtype=dtype, param_dtype=dtype)
    with hf_io.open_hf(path) as ckpt:  # config.json and the safetensors headers only
        return ckpt.cfg


def _read_orbax_config(path):
    from r1jax.checkpoint import orbax_io

    return orbax_io.read_model_config(path)


# By checkpoint kind (r1jax.checkpoint.kind.checkpoint_kind).
LOADERS = {"hf": _load_hf, "orbax": _load_orbax}
CONFIG_READERS = {"hf": _read_hf_config, "orbax": _read_orbax_config}


def _kind(path, key=None) -> str:
    from r1jax.checkpoint.kind import checkpoint_kind  # orbax is imported only when a checkpoint is read

    return checkpoint_kind(path, key)


def read_config(path, key: str = "model"):
    """The architecture of a HF directory or an r1jax checkpoint, read without touching the weights
    (to check a mesh or a vocabulary before loading anything). `key` names the setting in errors."""
    return CONFIG_READERS[_kind(path, key)](paths.as_path(path))


def load_pretrained(path, *, dtype=None, mesh=None, shardings=None):
    """(ModelConfig, params) from a HF directory (config.json + safetensors) or an r1jax checkpoint.
    With `mesh`, each leaf is read straight into its sharding by the default rules; `shardings` (a
    params pytree of jax.sharding.Sharding) places them instead, e.g. by a training run's rules."""
    path = paths.as_path(path)  # local or gs://
    kind = _kind(path)
    if dtype is not None:
        dtype = jnp.dtype(dtype).name
        if dtype not in DTYPES:
            raise ConfigError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    return LOADERS[kind](path, dtype, mesh, shardings)


# --------------------------------------------------------------------------- saving


def save_pretrained(path, config: ModelConfig, params: dict, *, format: str = "hf", overwrite: bool = False,
                    max_shard_size: int = 5 * 2**30, dtype=None) -> Path:
    """Write params as a HF directory (config.json + safetensors) or an r1jax orbax checkpoint."""
    if format not in ("hf", "orbax"):
        raise ConfigError(f"format: expected 'hf' or 'orbax', got {format!r}")
    if format == "orbax":
        from r1jax.checkpoint import orbax_io

        return orbax_io.save_model(path, config, params, overwrite=overwrite)
    return hf_io.save_hf(path, config, params, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite)
