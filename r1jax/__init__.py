"""r1jax: DeepSeek-V3/R1 and the R1 training recipe in JAX."""

from r1jax.api import forward, load_pretrained, save_pretrained
from r1jax.config import DenseConfig, ModelConfig
from r1jax.errors import CheckpointError, ConfigError, DataError, R1JaxError
from r1jax.infer.sampler import generate

__all__ = [
    "ModelConfig", "DenseConfig", "forward", "generate", "load_pretrained", "save_pretrained",
    "R1JaxError", "ConfigError", "CheckpointError", "DataError",
]
__version__ = "0.1.0"
