"""`r1jax config show`: a resolved config as YAML, every field with its default beside it."""

from __future__ import annotations

import dataclasses

import yaml

from r1jax.config.loader import thaw, to_dict

_REQUIRED = object()


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _REQUIRED


def _class_defaults(cls):
    """An instance of `cls` with every default, or None where some field has none."""
    try:
        return cls()
    except Exception:  # a required field (TypeError) or one its checks refuse empty (ConfigError)
        return None


def _scalar(value) -> str:
    """One YAML scalar or flow collection, as `key=value` overrides take it."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _plain(value):
    """Plain YAML data: mappings, lists, scalars (tuples as lists, FrozenDicts as dicts)."""
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, tuple):  # a list of dataclasses (pipeline stages, rewards) too
        return [_plain(x) for x in value]
    return thaw(value)


def _lines(cfg, defaults, indent: str, skip=()) -> list[str]:
    out = []
    for f in dataclasses.fields(cfg):
        if f.name in skip:
            continue
        value = getattr(cfg, f.name)
        default = _field_default(f) if defaults is None else getattr(defaults, f.name, _REQUIRED)
        if dataclasses.is_dataclass(value):
            nested = default if dataclasses.is_dataclass(default) and type(default) is type(value) else None
            note = "" if nested is not None else f"  # default: {_note(default)}"
            out.append(f"{indent}{f.name}:{note}")
            out += _lines(value, nested if nested is not None else _class_defaults(type(value)), indent + "  ")
            continue
        plain = _plain(value)
        same = default is not _REQUIRED and _plain(default) == plain
        note = "(default)" if same else f"default: {_note(default)}"
        out.append(f"{indent}{f.name}: {_scalar(plain)}  # {note}")
    return out


def _note(default) -> str:
    if default is _REQUIRED:
        return "(required)"
    return _scalar(_plain(default))


def show(cfg, skip=()) -> str:
    """`cfg` (a config dataclass) as YAML that loads back to it, each line commented with the field's
    default: `# (default)` where the value is the default, `# default: X` where it differs. Fields
    named in `skip` are left out."""
    return "\n".join(_lines(cfg, None, "", skip)) + "\n"
