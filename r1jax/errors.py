"""Typed errors. Each names what is wrong: the config key path, the tensor, or the file."""

import errno


class R1JaxError(Exception):
    """Base class of every error r1jax raises on bad input."""


class ConfigError(R1JaxError, ValueError):
    """A config value is missing, unknown, of the wrong type, or inconsistent. Names the key path."""


class CheckpointError(R1JaxError):
    """A checkpoint or weight directory is missing, incomplete or does not fit the config."""


class DataError(R1JaxError, ValueError):
    """Input data (tokens, rows, files) is invalid. Names the file:line or the offending value."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files are missing, truncated or corrupt. Names the step or params directory and the cause."""


def chain(exc: BaseException | None):
    """`exc`, then the error it was raised from or while handling, and so on (each once)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe(exc: BaseException) -> str:
    """One line for a failure of the OS, tensorstore or orbax: the file it names and the cause.

    An OSError with a file name anywhere in the chain (`raise ... from`, or raised while handling it)
    is preferred, since it names the file; otherwise the innermost explicit cause (orbax re-raises
    tensorstore's errors as bare Exceptions that name no file), without tensorstore's source locations
    and the spec dumps orbax appends."""
    errors = list(chain(exc))
    named = [e for e in errors if isinstance(e, OSError) and e.filename is not None]
    if named or isinstance(errors[0], OSError):
        e = (named or errors)[0]
        code = errno.errorcode.get(e.errno or 0)
        cause = f"{e.strerror or e}" + (f" ({code})" if code else "")
        return f"{e.filename}: {cause}" if e.filename is not None else cause
    root = errors[0]
    while root.__cause__ is not None and root.__cause__ in errors:  # orbax wraps tensorstore's message
        root = root.__cause__
    text = str(root) or type(root).__name__
    for cut in (" [source locations=", " [tensorstore_spec=", "See full TensorStore details", "\n"):
        text = text.split(cut)[0]
    text = " ".join(text.split()).rstrip(" .")
    # tensorstore puts the OS's cause last ("...: No space left on device"): keep both ends
    return text if len(text) <= 500 else f"{text[:250]} ... {text[-240:]}"
