"""Frozen, validated configs loaded from YAML, with dotted `key=value` overrides.

Every config is a frozen dataclass, so it is hashable and can be a static argument of `jax.jit`.
Loading checks every key against the dataclass fields and every value against the field's type, and
names the full key path on error (`model.rope_scaling.factor: expected float, got 'x'`).

This module knows no particular config: the classes live in model.py, mesh.py and stages.py.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from r1jax.errors import ConfigError


def need(ok, key: str, message: str) -> None:
    """Raise ConfigError(`key: message`) unless `ok`. `from_dict` puts the enclosing path in front, so
    the error names the full key (`model.n_group: ...`)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


class FrozenDict(Mapping):
    """An immutable, hashable mapping for dict-valued config fields (rope scaling, HF passthrough)."""

    def __init__(self, items=()):
        self._d = {k: _freeze(v) for k, v in dict(items).items()}
        self._hash = None

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __hash__(self):
        if self._hash is None:
            self._hash = hash(json.dumps(thaw(self), sort_keys=True, default=str))
        return self._hash

    def __eq__(self, other):
        return isinstance(other, Mapping) and thaw(self) == thaw(other)

    def __repr__(self):
        return f"FrozenDict({self._d!r})"


def _freeze(v):
    if isinstance(v, Mapping) and not isinstance(v, FrozenDict):
        return FrozenDict(v)
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def thaw(v):
    """FrozenDict/tuple → plain dict/list, recursively (for JSON and YAML output)."""
    if isinstance(v, Mapping):
        return {k: thaw(x) for k, x in v.items()}
    if isinstance(v, tuple):
        return [thaw(x) for x in v]
    return v


# --------------------------------------------------------------------------- strategy names


@dataclasses.dataclass(frozen=True)
class Choice:
    """Marks a Literal of strategy names, `Annotated[Literal[...], Choice("strategy")]`: an unknown
    value reads `unknown strategy 'x'; valid: a, b`. The functions the names choose between live in a
    table beside the code that runs them; `check_names` keeps that table and the Literal equal."""

    noun: str


def names(choice) -> tuple[str, ...]:
    """The names of a Literal, or of an Annotated Literal."""
    if typing.get_origin(choice) is Annotated:
        choice = typing.get_args(choice)[0]
    return typing.get_args(choice)


def check_choice(value, choice, key: str):
    """`value` if it is one of `choice`'s names, else ConfigError naming `key` and the valid names."""
    noun = next(m.noun for m in typing.get_args(choice)[1:] if isinstance(m, Choice))
    need(value in names(choice), key, f"unknown {noun} {value!r}; valid: {', '.join(sorted(names(choice)))}")
    return value


def check_names(table: Mapping, choice, key: str) -> None:
    """Called once where a strategy table is defined: its keys must be the config's names for `key`,
    so a strategy cannot be added on one side only."""
    if set(table) != set(names(choice)):
        raise ConfigError(f"{key}: the strategy table has {sorted(table)} but the config (r1jax/config) "
                          f"accepts {sorted(names(choice))}; add or remove the name on both sides")


# --------------------------------------------------------------------------- generic loading

# frozenset of dataclasses -> the function that builds a mapping into one of them (which one: the
# mapping says, e.g. by model_type). Registered beside the classes, so this module stays generic.
UNION_BUILDERS: dict[frozenset, Callable[[Mapping, str], Any]] = {}


def _type_name(t) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def _coerce(value, tp, path: str):
    """Check `value` against type hint `tp`; return the (possibly converted) value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _freeze(value)
    if origin is Annotated:
        if any(isinstance(m, Choice) for m in args[1:]):
            return check_choice(value, tp, path)
        return _coerce(value, args[0], path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        builder = UNION_BUILDERS.get(frozenset(a for a in args if dataclasses.is_dataclass(a)))
        if isinstance(value, Mapping) and builder is not None:
            return builder(value, path)
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message names the key and the problem
            raise errors[0]
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    if tp is FrozenDict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return FrozenDict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads `3e-3` (no dot) as a string; accept what Python reads as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {tp!r}")


def from_dict(cls, d: Mapping, path: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise ConfigError."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls, include_extras=True)  # extras: the Choice marks
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key for {cls.__name__} "
            f"(valid keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in d.items():
        kwargs[name] = _coerce(value, hints[name], prefix + name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key is missing for {cls.__name__}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}{e}" if prefix and not str(e).startswith(prefix) else str(e))


def to_dict(cfg) -> dict:
    """Dataclass → plain nested dict (YAML/JSON ready)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return to_dict(v)
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        return thaw(v)

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


# --------------------------------------------------------------------------- YAML and overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' → (['a','b','c'], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from None
    return key.split("."), value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply dotted overrides to a nested dict (new dict; input untouched)."""
    d = json.loads(json.dumps(d)) if d else {}
    for text in overrides:
        keys, value = parse_override(text)
        node = d
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"{'.'.join(keys[: i + 1])}: is not a mapping, cannot set {'.'.join(keys)}")
            node = node[k]
        node[keys[-1]] = value
    return d


def read_yaml(path) -> dict:
    try:
        with open(path) as f:
            d = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return d


INCLUDE = "include"  # `model: {include: base.yaml, key: value}`: the file, then these keys on top


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`; mappings merge key by key (`rope_scaling: {factor: 8}` keeps the rest)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _included(value: str, sub, base: Path, where: str) -> dict:
    candidates = [base / value, Path(value)]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise ConfigError(f"{where}: included file {value!r} not found (looked in {base} and the "
                          f"working directory)")
    return resolve_includes(read_yaml(found), sub, found.parent, f"{where}.")


def resolve_includes(d, cls, base: Path, path: str):
    """A dataclass-typed field may name a YAML file (`model: configs/model/tiny_v3.yaml`), looked
    up beside the including file, then from the working directory, or include one and change some
    of its keys (`model: {include: ../model/deepseek_v3_671b.yaml, moe_dispatch: ragged_ep}`).
    Resolved before overrides, so `model.num_hidden_layers=2` reaches inside it."""
    if not isinstance(d, dict) or not dataclasses.is_dataclass(cls):
        return d
    hints = typing.get_type_hints(cls)
    out = dict(d)
    for key, value in d.items():
        tp = hints.get(key)
        if tp is None:
            continue
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or [tp]
        sub = inner[0]
        if not dataclasses.is_dataclass(sub):
            continue
        if isinstance(value, str) and value.endswith((".yaml", ".yml")):
            out[key] = _included(value, sub, base, f"{path}{key}")
        elif isinstance(value, dict) and INCLUDE in value:
            included = value[INCLUDE]
            if not (isinstance(included, str) and included.endswith((".yaml", ".yml"))):
                raise ConfigError(f"{path}{key}.{INCLUDE}: expected a .yaml file name, got {included!r}")
            rest = {k: v for k, v in value.items() if k != INCLUDE}
            out[key] = _merge(_included(included, sub, base, f"{path}{key}.{INCLUDE}"),
                              resolve_includes(rest, sub, base, f"{path}{key}."))
        elif isinstance(value, dict):
            out[key] = resolve_includes(value, sub, base, f"{path}{key}.")
    return out


def load_dict(cls, path, overrides: list[str] = ()) -> dict:
    """The YAML file as a dict with includes resolved and overrides applied."""
    d = resolve_includes(read_yaml(path), cls, Path(path).parent, "")
    return apply_overrides(d, list(overrides))


def load(cls, path, overrides: list[str] = ()):
    """Load dataclass `cls` from a YAML file plus dotted overrides."""
    return from_dict(cls, load_dict(cls, path, overrides))
