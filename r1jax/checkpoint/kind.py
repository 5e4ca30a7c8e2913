"""Which kind of model directory a path is: the one place that decides "Hugging Face or r1jax?"."""

from __future__ import annotations

from r1jax import paths
from r1jax.checkpoint.orbax_io import is_model_checkpoint
from r1jax.errors import CheckpointError, ConfigError

HF_CONFIG = "config.json"  # what makes a directory a Hugging Face model directory


def checkpoint_kind(path, key: str | None = None) -> str:
    """"hf" for a Hugging Face directory (config.json + safetensors), "orbax" for an r1jax model or
    training checkpoint (config.yaml + params). A missing path, or a directory that is neither, raises
    naming the path: a ConfigError naming the setting when `key` is given (the config points at the
    wrong place), else a CheckpointError."""
    path = paths.as_path(path)  # local or gs://
    where, error = (f"{key}: {path}", ConfigError) if key else (f"{path}:", CheckpointError)
    if not path.exists():
        raise error(f"{where} does not exist")
    if (path / HF_CONFIG).exists():
        return "hf"
    if is_model_checkpoint(path):
        return "orbax"
    raise error(f"{where} is neither a Hugging Face directory ({HF_CONFIG}) nor an r1jax checkpoint")
