"""orbax checkpoints: model-only directories (`orbax_io`) and training checkpoints (`manager`)."""

from r1jax.checkpoint.manager import (CheckpointConfig, CheckpointManager, install_sigterm_handler,
                                      preemption_requested)
from r1jax.checkpoint.orbax_io import is_model_checkpoint, load_model, save_model

__all__ = [
    "CheckpointConfig", "CheckpointManager", "install_sigterm_handler", "preemption_requested",
    "is_model_checkpoint", "load_model", "save_model",
]
