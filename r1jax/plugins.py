"""User code named in a config: `package.module:function` (a custom reward, a custom verifier).

A leaf module (standard library and r1jax.errors only), so a config can check such a name when it is
loaded, before any weight is read, without importing the code that will call the function.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping

from r1jax.errors import ConfigError

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def import_callable(spec: str, key: str) -> Callable:
    """`package.module:function` -> the function; ConfigError naming `key` for a malformed spec, a
    module that does not import, a missing attribute or one that is not callable."""
    if not _DOTTED.fullmatch(spec):
        raise ConfigError(f"{key}: {spec!r} is not a dotted path 'package.module:function'")
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot import {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return fn


def resolve_spec(spec: str, builtins: Mapping[str, Callable], key: str, noun: str) -> Callable:
    """A built-in by name from `builtins`, or `package.module:function`; errors name `key`."""
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        raise ConfigError(f"{key}: unknown {noun} {spec!r}; built-in: {', '.join(sorted(builtins))}, "
                          "or a dotted path 'package.module:function'")
    return import_callable(spec, key)
