"""r1jax: DeepSeek-V3/R1 and the R1 training recipe in JAX.

The names below load on first use (PEP 562), so `import r1jax.config` does not import JAX or the model.
Submodules load the same way: after `import r1jax`, `r1jax.api.read_config` works.
"""

import importlib
import importlib.util

from r1jax.errors import CheckpointError, ConfigError, DataError, R1JaxError

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "ModelConfig": "r1jax.config",
    "DenseConfig": "r1jax.config",
    "forward": "r1jax.api",
    "load_pretrained": "r1jax.api",
    "save_pretrained": "r1jax.api",
    "generate": "r1jax.infer.sampler",
}

__all__ = [
    "ModelConfig", "DenseConfig", "forward", "generate", "load_pretrained", "save_pretrained",
    "R1JaxError", "ConfigError", "CheckpointError", "DataError",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")  # a submodule: r1jax.api, r1jax.rl, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
