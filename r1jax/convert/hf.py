"""Hugging Face ⇄ r1jax parameter layout, driven entirely by `model/params.param_table`.

Every r1jax leaf is one HF tensor, or one per layer / (layer, expert) when stacked on leading
`layers` / `expert` dims. Linear maps are stored `[out, in]` by HF and input-first (split into heads)
by r1jax. Two ways across:
- in memory (load_pretrained, save_pretrained): `hf_view` gives the HF-shaped view of an r1jax slice
  and a block of HF rows at a time is copied through it (a transpose for linear maps);
- streamed (`r1jax convert`): a slab of stacked HF tensors is kept in HF layout end to end and only
  *viewed* in r1jax layout (`params_view`); the orbax checkpoint stores each leaf in `hf_order`, so
  its chunks hold the HF tensors' bytes and no transpose is ever computed on the way through.

A *source* is anything with `names`, `shape(name)`, `value_dtype(name)` and
`read_rows(name, start, stop)` (optionally `read_into(name, out)`): `safetensors_io.SafetensorsReader`,
or `fp8.DequantizingReader` over DeepSeek's FP8 release.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Iterator

import jax
import numpy as np

from r1jax.config import ModelConfig
from r1jax.convert import fp8
from r1jax.convert.safetensors_io import BLOCK_BYTES, TensorPlan, dtype_name
from r1jax.errors import CheckpointError
from r1jax.model.params import ParamSpec, is_spec, param_dtype, param_table, stack_layout

STACK_AXES = ("layers", "expert")
VALUE_DTYPES = ("F64", "F32", "BF16", "F16")  # what a source may hand over as weight values
CHECKPOINT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}

Slab = tuple  # a tuple of slices over a leaf's leading stacked dims


@dataclasses.dataclass(frozen=True)
class Entry:
    """One r1jax leaf and the HF tensors it is stacked from."""
    keys: tuple[str, ...]
    spec: ParamSpec
    names: tuple[tuple[tuple[int, ...], str], ...]  # (index into the stacked dims, HF name)

    @property
    def lead(self) -> int:
        return lead_dims(self.spec)

    @property
    def inner_shape(self) -> tuple[int, ...]:
        return self.spec.shape[self.lead:]

    @property
    def leaf_name(self) -> str:
        return ".".join(self.keys)


def lead_dims(spec: ParamSpec) -> int:
    """How many leading dims stack HF tensors (layers, experts)."""
    n = 0
    while n < len(spec.axes) and spec.axes[n] in STACK_AXES:
        n += 1
    return n


def hf_shape(spec: ParamSpec) -> tuple[int, ...]:
    """Shape of one HF tensor for this spec."""
    inner = spec.shape[lead_dims(spec):]
    if spec.fan_in:
        return (math.prod(inner[spec.fan_in:]), math.prod(inner[: spec.fan_in]))
    return inner


def hf_view(spec: ParamSpec, inner: np.ndarray) -> np.ndarray:
    """The HF-shaped view of one r1jax slice (C-contiguous), writing through to it: `[out, in]` for a
    linear map (a transposed view), the slice itself otherwise."""
    if spec.fan_in:
        return inner.reshape(math.prod(inner.shape[: spec.fan_in]), -1).T
    return inner


def hf_order(spec: ParamSpec) -> tuple[int, ...]:
    """The order of a leaf's dims that lays each stacked slice out as its HF tensor: stacked dims,
    then the `out` dims, then the `in` dims (the identity but for linear maps)."""
    lead, n, f = lead_dims(spec), len(spec.shape), spec.fan_in
    if not f:
        return tuple(range(n))
    return tuple(range(lead)) + tuple(range(lead + f, n)) + tuple(range(lead, lead + f))


def params_view(entry: Entry, hf_values: np.ndarray) -> np.ndarray:
    """The r1jax-layout view (no copy) of stacked HF tensors `hf_values [stacked..., HF shape]`."""
    order = hf_order(entry.spec)
    lead = hf_values.ndim - len(hf_shape(entry.spec))
    permuted = hf_values.shape[:lead] + tuple(entry.spec.shape[i] for i in order[entry.lead:])
    return hf_values.reshape(permuted).transpose(np.argsort(order))


def entries(cfg: ModelConfig) -> list[Entry]:
    """Every leaf of param_table(cfg) with its HF names, in pytree order."""
    layout = stack_layout(cfg)
    out = []
    for path, spec in jax.tree_util.tree_flatten_with_path(param_table(cfg), is_leaf=is_spec)[0]:
        keys = tuple(k.key for k in path)
        if keys[0] not in layout:
            out.append(Entry(keys, spec, (((), spec.hf),)))
            continue
        first, n = layout[keys[0]]
        names = []
        for layer in range(n):
            prefix = f"model.layers.{first + layer}."
            if "expert" in spec.axes:
                names += [((layer, e), prefix + spec.hf.format(e=e)) for e in range(spec.shape[1])]
            else:
                names.append(((layer,), prefix + spec.hf))
        out.append(Entry(keys, spec, tuple(names)))
    return out


def mtp_embed_names(cfg: ModelConfig) -> list[str]:
    """The release stores the shared embedding again inside each MTP module (docs/deepseek_v3.md §6); dense students
    (DenseConfig) have no MTP."""
    first, depth = cfg.num_hidden_layers, getattr(cfg, "num_nextn_predict_layers", 0)
    return [f"model.layers.{first + k}.embed_tokens.weight" for k in range(depth)]


def ignorable(name: str, cfg: ModelConfig) -> bool:
    """Tensors a HF directory may hold that r1jax derives instead of storing."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.embed_tokens\.weight", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return True  # the MTP module's copy of the shared embedding
    return name.endswith("rotary_emb.inv_freq")


def _first_and_more(what: str, names: list[str]) -> str:
    return f"{what} {names[0]!r}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def check_source(cfg: ModelConfig, source, where: str) -> None:
    """Names, shapes and dtypes of every HF tensor against the config, before any data is read."""
    ents = entries(cfg)
    expected = {name for e in ents for _, name in e.names}
    missing = sorted(expected - source.names)
    if missing:
        raise CheckpointError(f"{where}: {_first_and_more('tensor', missing)} is missing")
    unexpected = sorted(n for n in source.names - expected if not ignorable(n, cfg))
    if unexpected:
        raise CheckpointError(f"{where}: {_first_and_more('unexpected tensor', unexpected)} for this config")
    for e in ents:
        want = hf_shape(e.spec)
        for _, name in e.names:
            got = tuple(source.shape(name))
            if got != want:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {list(got)}, expected {list(want)}")
            dtype = source.value_dtype(name)
            if dtype not in VALUE_DTYPES:
                hint = (" (float8 weights need a *_scale_inv companion and quantization_config in config.json)"
                        if dtype.startswith("F8") else "")
                raise CheckpointError(f"{where}: tensor {name!r} has dtype {dtype}, expected one of "
                                      f"{', '.join(VALUE_DTYPES)}{hint}")


def checkpoint_dtype(source) -> str:
    """The dtype a checkpoint loads as by default: its embedding's (bfloat16 in the FP8 release)."""
    for name in sorted(source.names):
        if name.endswith("embed_tokens.weight"):
            return CHECKPOINT_DTYPES.get(source.value_dtype(name), "float32")
    return "float32"


# --------------------------------------------------------------------------- HF -> r1jax


TILE = 256  # transposes go tile by tile: numpy's whole-matrix transposed copy is ~2x slower (cache misses)


def _rows_per_block(spec: ParamSpec, row_bytes: int) -> int:
    if spec.fan_in:
        return TILE  # also a multiple of DeepSeek's 128-row FP8 blocks, so no scale row is read twice
    return max(1, BLOCK_BYTES // max(1, row_bytes))


def _copy(dst: np.ndarray, src: np.ndarray, transposed: bool) -> None:
    """dst[...] = src (casting: round to nearest even), a column tile at a time when one side is a
    transposed view."""
    if not transposed or dst.ndim != 2:
        dst[...] = src
        return
    for c in range(0, dst.shape[1], TILE):
        dst[:, c:c + TILE] = src[:, c:c + TILE]


def fill(spec: ParamSpec, inner: np.ndarray, read_rows: Callable[[int, int], np.ndarray]) -> None:
    """Copy one HF tensor into `inner` (a C-contiguous r1jax slice), a block of HF rows at a time."""
    view = hf_view(spec, inner)
    if view.ndim == 0:
        view[...] = read_rows(0, 0)
        return
    step = _rows_per_block(spec, view[0].size * 4)
    for r in range(0, view.shape[0], step):
        _copy(view[r:r + step], read_rows(r, min(view.shape[0], r + step)), bool(spec.fan_in))


def slab_positions(slab: Slab) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(absolute, relative) stacked index of every HF tensor inside a slab."""
    for pos in itertools.product(*(range(s.start, s.stop) for s in slab)):
        yield pos, tuple(p - s.start for p, s in zip(pos, slab))


def slab_shape(entry: Entry, slab: Slab) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in slab) + entry.inner_shape


def fill_slab(entry: Entry, source, slab: Slab, dtype) -> np.ndarray:
    """The r1jax array of the stacked HF tensors inside `slab`."""
    out = np.empty(slab_shape(entry, slab), dtype)
    names = dict(entry.names)
    for pos, rel in slab_positions(slab):
        name = names[pos]
        fill(entry.spec, out[rel], lambda a, b, name=name: source.read_rows(name, a, b))
    return out


def read_into(source, name: str, out: np.ndarray) -> None:
    """out[...] = HF tensor `name`, cast to out's dtype (straight into `out` where the source can)."""
    if hasattr(source, "read_into"):
        source.read_into(name, out)
    elif out.ndim == 0:
        out[...] = source.read_rows(name, 0, 0)
    else:
        step = max(1, BLOCK_BYTES // max(1, out[0].size * 4))
        for r in range(0, len(out), step):
            out[r:r + step] = source.read_rows(name, r, min(len(out), r + step))


def each(pool, fn: Callable, items: list) -> list:
    """[fn(item) for item in items], in `pool`'s threads when one is given (numpy, file reads and
    writes release the GIL, so the tensors of a slab convert on as many cores as the pool has)."""
    return list(pool.map(fn, items)) if pool is not None else [fn(item) for item in items]


def read_hf_slab(entry: Entry, source, slab: Slab, dtype, pool=None) -> np.ndarray:
    """The HF tensors inside `slab`, each read into its place in HF layout: `[slab dims..., HF shape]`
    in `dtype` (`params_view` gives the r1jax view of it)."""
    out = np.empty(tuple(s.stop - s.start for s in slab) + hf_shape(entry.spec), dtype)
    names = dict(entry.names)
    each(pool, lambda job: read_into(source, *job), [(names[pos], out[rel]) for pos, rel in slab_positions(slab)])
    return out


def chunk_lead(entry: Entry, itemsize: int, min_bytes: int) -> tuple[int, ...]:
    """Stacked dims of one storage chunk: whole HF tensors, as few as make `min_bytes` (one file per
    chunk costs about a millisecond, so kilobyte tensors are stored a few hundred to a chunk)."""
    per_tensor = max(1, math.prod(entry.inner_shape) * itemsize)
    first = next(_runs(entry.spec.shape[: entry.lead], -(-min_bytes // per_tensor)))
    return tuple(s.stop - s.start for s in first)


def slabs(entry: Entry, budget_bytes: int, itemsize: int, chunk: tuple[int, ...] | None = None) -> Iterator[Slab]:
    """Rectangular runs over the leading stacked dims, made of whole chunks (`chunk`: stacked dims of
    one chunk, default one HF tensor), each holding as many chunks as fit in budget_bytes (at least
    one), in C order."""
    lead = entry.spec.shape[: entry.lead]
    chunk = chunk or (1,) * len(lead)
    grid = tuple(-(-d // c) for d, c in zip(lead, chunk))
    per_chunk = max(1, math.prod(chunk) * math.prod(entry.inner_shape) * itemsize)
    for run in _runs(grid, max(1, budget_bytes // per_chunk)):
        yield tuple(slice(s.start * c, min(s.stop * c, d)) for s, c, d in zip(run, chunk, lead))


def _runs(lead: tuple[int, ...], k: int) -> Iterator[Slab]:
    """C-order rectangular runs of at most k cells (at least one) over a grid of shape `lead`."""
    if not lead:
        yield ()
        return
    rest = math.prod(lead[1:])
    if k >= rest:
        step = k // rest
        for i in range(0, lead[0], step):
            yield (slice(i, min(lead[0], i + step)),) + tuple(slice(0, d) for d in lead[1:])
        return
    for i in range(lead[0]):
        for tail in _runs(lead[1:], k):
            yield (slice(i, i + 1),) + tail


def full_slab(entry: Entry) -> Slab:
    return tuple(slice(0, d) for d in entry.spec.shape[: entry.lead])


def largest_tensor_bytes(cfg: ModelConfig, dtype=None) -> int:
    """Bytes of the largest single HF tensor once converted (sets the memory budget of streaming)."""
    return max(math.prod(e.inner_shape) * output_dtype(e.spec, cfg, dtype).itemsize for e in entries(cfg))


# --------------------------------------------------------------------------- HF -> a device's slice


def _flat_indices(dims: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """C-order flat indices of the block `index` of an array of shape `dims`."""
    ranges = [np.arange(*s.indices(d)) for d, s in zip(dims, index)]
    return np.ravel_multi_index(np.ix_(*ranges), dims).ravel() if ranges else np.zeros(1, np.int64)


def read_slice(spec: ParamSpec, inner: tuple[int, ...], read_rows, index: tuple[slice, ...]) -> np.ndarray:
    """Block `index` of one r1jax slice, reading only the HF rows it covers (a linear map's `out`
    dims are HF rows, so a device holding some heads or some ffn columns reads just those rows)."""
    if not inner:
        return read_rows(0, 0)
    if not spec.fan_in:
        start, stop, step = index[0].indices(inner[0])
        block = read_rows(start, max(start, stop))
        return block[(slice(None, None, step),) + tuple(index[1:])]
    f = spec.fan_in
    rows, cols = _flat_indices(inner[f:], index[f:]), _flat_indices(inner[:f], index[:f])
    lens = [len(range(*s.indices(d))) for d, s in zip(inner, index)]
    if rows.size == 0 or cols.size == 0:
        return np.empty(lens, np.float32)
    block = read_rows(int(rows.min()), int(rows.max()) + 1)
    sub = block[np.ix_(rows - rows.min(), cols)]  # [out..., in...] flattened to 2-d
    out = sub.reshape(lens[f:] + lens[:f])
    return out.transpose(tuple(range(len(inner) - f, len(inner))) + tuple(range(len(inner) - f)))


def read_leaf_block(entry: Entry, source, index: tuple[slice, ...], dtype) -> np.ndarray:
    """Block `index` of a whole (stacked) leaf, as `jax.make_array_from_callback` asks for it."""
    index = tuple(index) + (slice(None),) * (len(entry.spec.shape) - len(index))
    lead = entry.lead
    stack = tuple(slice(*s.indices(d)[:2]) for s, d in zip(index[:lead], entry.spec.shape[:lead]))
    names = dict(entry.names)
    parts = []
    for pos, _ in slab_positions(stack):
        name = names[pos]
        parts.append(read_slice(entry.spec, entry.inner_shape, lambda a, b, n=name: source.read_rows(n, a, b),
                                index[lead:]).astype(dtype))
    inner = parts[0].shape if parts else ()
    out = np.empty(tuple(s.stop - s.start for s in stack) + inner, dtype)
    for (_, rel), part in zip(slab_positions(stack), parts):
        out[rel] = part
    return out


# --------------------------------------------------------------------------- r1jax -> HF


def _row_blocks(view: np.ndarray, dtype, transposed: bool) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, contiguous block of rows in `dtype`) covering an HF-shaped view in any layout."""
    if view.ndim == 0:
        yield 0, np.asarray(view, dtype)
        return
    step = TILE if transposed else max(1, BLOCK_BYTES // max(1, view[0].size * max(4, view.dtype.itemsize)))
    for r in range(0, view.shape[0], step):
        rows = view[r:r + step]
        block = np.empty(rows.shape, dtype)
        _copy(block, rows, transposed)
        yield r, block


def _write_fp8(writer, name: str, view: np.ndarray) -> int:
    """Quantize one HF weight a few whole 128-row blocks at a time and write it with its scales."""
    b0 = fp8.BLOCK[0]
    step = b0 * max(1, BLOCK_BYTES // max(1, b0 * view.shape[1] * 4))
    written = 0
    for r in range(0, view.shape[0], step):
        q, scale_inv = fp8.quantize(view[r:r + step], name)
        writer.write(name, q, r)
        writer.write(name + fp8.SCALE_SUFFIX, scale_inv, r // b0)
        written += q.nbytes + scale_inv.nbytes
    return written


def write_tensor(writer, name: str, view: np.ndarray, dtype, quantize: str | None = None) -> int:
    """Write one HF tensor given as an HF-shaped view (C-contiguous: one write, no copy unless the
    dtype changes; a transposed view: a tile-by-tile copy); returns the bytes written."""
    if quantize == "fp8" and fp8.quantized(name):
        return _write_fp8(writer, name, view)
    if view.dtype == dtype and view.flags.c_contiguous:
        writer.write(name, view, 0)
        return view.nbytes
    written = 0
    for r, block in _row_blocks(view, dtype, not view.flags.c_contiguous):
        writer.write(name, block, r)
        written += block.nbytes
    return written


def output_dtype(spec: ParamSpec, cfg: ModelConfig, dtype=None) -> np.dtype:
    """The dtype a leaf is written in: its fixed dtype (router bias), else `dtype`, else param_dtype."""
    if spec.dtype is not None:
        return np.dtype(spec.dtype)
    return np.dtype(dtype) if dtype is not None else param_dtype(spec, cfg)


def _hf_order(name: str):
    """HF's usual file order: embedding, layers in order, final norm, head."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "embed_tokens" in name else 2, 0, name)


def _plans(name: str, shape: tuple[int, ...], st: str, quantize: str | None) -> list[TensorPlan]:
    if quantize == "fp8" and fp8.quantized(name):
        grid = tuple(-(-d // b) for d, b in zip(shape, fp8.BLOCK))
        return [TensorPlan(name, shape, "F8_E4M3"), TensorPlan(name + fp8.SCALE_SUFFIX, grid, "F32")]
    return [TensorPlan(name, shape, st)]


def tensor_plan(cfg: ModelConfig, dtype=None, quantize: str | None = None) -> list[TensorPlan]:
    """Every HF tensor r1jax writes for `cfg` (with the MTP embedding copies, and with quantize='fp8'
    the release's float8 projections and their scales), in HF's file order."""
    plans = []
    for e in entries(cfg):
        st = dtype_name(output_dtype(e.spec, cfg, dtype))
        names = [name for _, name in e.names] + (mtp_embed_names(cfg) if e.keys == ("embed",) else [])
        plans += [p for name in names for p in _plans(name, hf_shape(e.spec), st, quantize)]
    return sorted(plans, key=lambda p: _hf_order(p.name))


def _write_slab(writer, entry: Entry, cfg: ModelConfig, slab: Slab, tensor, dtype, quantize, pool=None) -> int:
    out = output_dtype(entry.spec, cfg, dtype)
    names = dict(entry.names)
    extra = mtp_embed_names(cfg) if entry.keys == ("embed",) else []
    jobs = [(name, tensor(rel)) for pos, rel in slab_positions(slab) for name in [names[pos]] + extra]
    return sum(each(pool, lambda job: write_tensor(writer, *job, out, quantize), jobs))


def write_leaf(writer, entry: Entry, cfg: ModelConfig, slab: Slab, values: np.ndarray, dtype=None,
               quantize: str | None = None) -> int:
    """Write the HF tensors of one slab of a leaf (`values`: that slab in r1jax layout); returns bytes
    written."""
    return _write_slab(writer, entry, cfg, slab, lambda rel: hf_view(entry.spec, values[rel]), dtype, quantize)


def write_hf_slab(writer, entry: Entry, cfg: ModelConfig, slab: Slab, hf_values: np.ndarray, dtype=None,
                  quantize: str | None = None, pool=None) -> int:
    """write_leaf for a slab already in HF layout (`[slab dims..., HF shape]`, as read_hf_slab makes
    and the orbax reader returns): each tensor is one contiguous write, in `pool`'s threads."""
    shape = hf_shape(entry.spec)
    return _write_slab(writer, entry, cfg, slab, lambda rel: hf_values[rel].reshape(shape), dtype, quantize, pool)


# --------------------------------------------------------------------------- whole trees in memory


def set_leaf(tree: dict, keys: tuple, value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def get_leaf(tree: dict, keys: tuple):
    for k in keys:
        tree = tree[k]
    return tree


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
