"""orbax checkpoints: model-only directories (`orbax_io`), training checkpoints (`manager`), and which kind
of model directory a path is (`kind`: Hugging Face or r1jax)."""

from r1jax.checkpoint.kind import checkpoint_kind
from r1jax.checkpoint.manager import (CheckpointConfig, CheckpointManager, install_sigterm_handler,
                                      preemption_requested)
from r1jax.checkpoint.orbax_io import is_model_checkpoint, load_model, save_model

__all__ = [
    "checkpoint_kind", "CheckpointConfig", "CheckpointManager", "install_sigterm_handler", "preemption_requested",
    "is_model_checkpoint", "load_model", "save_model",
]
