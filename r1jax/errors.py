"""Typed errors. Each names what is wrong: the config key path, the tensor, or the file."""


class R1JaxError(Exception):
    """Base class of every error r1jax raises on bad input."""


class ConfigError(R1JaxError, ValueError):
    """A config value is missing, unknown, of the wrong type, or inconsistent. Names the key path."""


class CheckpointError(R1JaxError):
    """A checkpoint or weight directory is missing, incomplete or does not fit the config."""


class DataError(R1JaxError, ValueError):
    """Input data (tokens, rows, files) is invalid. Names the file:line or the offending value."""
