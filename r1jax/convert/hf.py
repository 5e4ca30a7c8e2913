"""Hugging Face ⇄ r1jax parameter conversion, driven entirely by `model/params.param_table`.

Every r1jax leaf is one HF tensor, or one per (layer) / (layer, expert) when stacked. Linear maps
are transposed ([out, in] ⇄ in-first) and reshaped into heads; everything else is copied as is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator

import jax
import numpy as np

from r1jax.config import ModelConfig
from r1jax.errors import CheckpointError
from r1jax.model.params import ParamSpec, is_spec, param_dtype, param_table, stack_layout

STACK_AXES = ("layers", "expert")


def _lead(spec: ParamSpec) -> int:
    n = 0
    while n < len(spec.axes) and spec.axes[n] in STACK_AXES:
        n += 1
    return n


def hf_shape(spec: ParamSpec) -> tuple[int, ...]:
    """Shape of one HF tensor for this spec."""
    inner = spec.shape[_lead(spec):]
    if spec.fan_in:
        return (math.prod(inner[spec.fan_in:]), math.prod(inner[: spec.fan_in]))
    return inner


def to_r1(spec: ParamSpec, t: np.ndarray) -> np.ndarray:
    inner = spec.shape[_lead(spec):]
    return t.T.reshape(inner) if spec.fan_in else t.reshape(inner)


def to_hf(spec: ParamSpec, a: np.ndarray) -> np.ndarray:
    inner = spec.shape[_lead(spec):]
    if spec.fan_in:
        return a.reshape(math.prod(inner[: spec.fan_in]), -1).T
    return a


def _entries(cfg: ModelConfig):
    """Yield (path tuple, spec, list of (index tuple into the stacked dims, HF name))."""
    table = param_table(cfg)
    layout = stack_layout(cfg)
    for path, spec in jax.tree_util.tree_flatten_with_path(table, is_leaf=is_spec)[0]:
        keys = tuple(k.key for k in path)
        if keys[0] in layout:
            first, n = layout[keys[0]]
            names = []
            for layer in range(n):
                prefix = f"model.layers.{first + layer}."
                if "expert" in spec.axes:
                    names += [((layer, e), prefix + spec.hf.format(e=e)) for e in range(spec.shape[1])]
                else:
                    names.append(((layer,), prefix + spec.hf))
        else:
            names = [((), spec.hf)]
        yield keys, spec, names


def hf_names(cfg: ModelConfig) -> list[str]:
    return [name for _, _, names in _entries(cfg) for _, name in names]


def _set(tree: dict, keys: tuple, value):
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, keys: tuple):
    for k in keys:
        tree = tree[k]
    return tree


# Tensors a HF directory may hold that r1jax derives instead of storing.
def ignorable(name: str, cfg: ModelConfig) -> bool:
    m = re.fullmatch(r"model\.layers\.(\d+)\.embed_tokens\.weight", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return True  # the MTP module's copy of the shared embedding
    return name.endswith("rotary_emb.inv_freq")


def hf_to_params(cfg: ModelConfig, names: set[str], get: Callable[[str], np.ndarray],
                 shape: Callable[[str], tuple] | None = None, source: str = "checkpoint") -> dict:
    """Build the params pytree (numpy) from HF tensors. All names and shapes are checked before any
    tensor is read; errors name the tensor."""
    entries = list(_entries(cfg))
    expected = {name for _, _, ns in entries for _, name in ns}
    missing = sorted(expected - names)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: tensor {missing[0]!r} is missing{more}")
    unexpected = sorted(n for n in names - expected if not ignorable(n, cfg))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source}: unexpected tensor {unexpected[0]!r}{more} for this config")
    if shape is not None:
        for _, spec, ns in entries:
            want = hf_shape(spec)
            for _, name in ns:
                got = tuple(shape(name))
                if got != want:
                    raise CheckpointError(f"{source}: tensor {name!r} has shape {list(got)}, expected {list(want)}")
    params = {}
    for keys, spec, ns in entries:
        out = np.empty(spec.shape, param_dtype(spec, cfg))
        for idx, name in ns:
            t = np.asarray(get(name))
            if tuple(t.shape) != hf_shape(spec):
                raise CheckpointError(f"{source}: tensor {name!r} has shape {list(t.shape)}, "
                                      f"expected {list(hf_shape(spec))}")
            out[idx] = to_r1(spec, t.astype(out.dtype))
        _set(params, keys, out)
    return params


def check_params(cfg: ModelConfig, params: dict) -> None:
    """Every leaf the config needs is present with its shape; nothing extra."""
    table = param_table(cfg)
    want = {tuple(k.key for k in p): s for p, s in jax.tree_util.tree_flatten_with_path(table, is_leaf=is_spec)[0]}
    got = {tuple(getattr(k, "key", k) for k in p): a for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    for keys, spec in want.items():
        if keys not in got:
            raise CheckpointError(f"params: missing leaf {'/'.join(keys)} for this config")
        if tuple(got[keys].shape) != spec.shape:
            raise CheckpointError(f"params: leaf {'/'.join(keys)} has shape {list(got[keys].shape)}, "
                                  f"expected {list(spec.shape)}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise CheckpointError(f"params: unexpected leaf {'/'.join(map(str, extra[0]))} for this config")


def params_to_hf(cfg: ModelConfig, params: dict, dtype=None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, numpy array) one tensor at a time, in HF layer order."""
    check_params(cfg, params)
    for keys, spec, ns in _entries(cfg):
        leaf = _get(params, keys)
        for idx, name in ns:
            a = np.asarray(leaf[idx])
            if dtype is not None and spec.dtype is None:
                a = a.astype(dtype)
            yield name, to_hf(spec, a)
        if keys == ("embed",) and cfg.num_nextn_predict_layers:
            # The release stores the shared embedding again inside each MTP module (spec §6).
            for k in range(cfg.num_nextn_predict_layers):
                a = np.asarray(leaf) if dtype is None else np.asarray(leaf).astype(dtype)
                yield f"model.layers.{cfg.num_hidden_layers + k}.embed_tokens.weight", a
