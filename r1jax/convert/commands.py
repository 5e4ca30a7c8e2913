"""`r1jax convert`: Hugging Face safetensors ⇄ r1jax orbax checkpoints, streamed a slab at a time.

Host memory stays a small multiple of the largest single tensor whatever the model's size: HF → orbax
reads one slab of a leaf (whole HF tensors, at most the largest tensor's bytes) straight from the
safetensors files into one buffer and hands it to the leaf's tensorstore array; orbax → HF reads one
such slab back and writes each of its tensors at its planned offset in the safetensors shards
(quantized to DeepSeek's FP8 format on request). Slabs stay in HF layout all the way, since the orbax
leaves store linear maps in HF's `[out, in]` order (orbax_stream): nothing is transposed. The tensors
of a slab are read, cast, (de)quantized and written by a pool of threads, and what is written goes
back to disk in the background (atomic.AtomicDir.flush_soon). Both directions check everything they
can (names, shapes, dtypes, headers, the destination) before writing, and the destination appears
only once complete and on disk.

Either side may be on gs:// (r1jax/paths.py). An orbax source there is read by tensorstore's own GCS
driver; a Hugging Face source is downloaded to a local staging directory first (its reader preads the
safetensors files), and a destination there is written locally and uploaded file by file once
complete, config files last. Staging needs local disk for the whole model.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from r1jax import paths
from r1jax.checkpoint import orbax_io
from r1jax.config import DTYPES
from r1jax.convert import fp8, hf, hf_io, orbax_stream
from r1jax.convert.atomic import AtomicDir
from r1jax.convert.safetensors_io import ShardedWriter
from r1jax.errors import CheckpointError, ConfigError
from r1jax.model.arch import DEEPSEEK, architecture
from r1jax.model.params import param_dtype

MIN_CHUNK_BYTES = 4 << 20  # smallest stored chunk: per-file costs make kilobyte chunks ~5x slower
FLUSH_BYTES = 256 << 20  # orbax -> HF starts writing the shards back to disk after this many bytes
# Threads converting the tensors of one slab side by side (reads, casts, FP8 (de)quantization, writes);
# each holds at most a few small temporaries, so memory does not grow with them.
WORKERS = min(16, os.cpu_count() or 1)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size, key: str = "max_shard_size") -> int:
    """Bytes from an int or a string like '5GB' (10^9, as Hugging Face counts), '512MiB' or '100000'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    if isinstance(size, bool) or not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"{key}: expected a size such as 5GB, 500MB, 2GiB or a byte count, got {size!r}")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise ConfigError(f"{key}: must be positive, got {size!r}")
    return n


def _dtype(dtype) -> str | None:
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


# glibc mallopt parameter numbers (malloc.h).
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the dynamic threshold tops out
_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None)


@contextlib.contextmanager
def _buffers_returned_on_free(threshold: int = 1 << 20):
    """Serve every allocation of `threshold` bytes or more with its own mmap while converting.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which
    multi-MB buffers come from per-thread arenas; tensorstore's threads then strand freed chunk
    buffers in their arenas and resident memory creeps to several times the data in flight, by how
    much depending on thread timing (measured on a 480 MB model: peak 8x its largest tensor writing
    orbax, 2-3.4x reading it; 2.2-2.4x with this). Afterwards the threshold is left at 32 MiB, where
    a long-running process's dynamic threshold ends up anyway. A no-op without glibc."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, threshold):
        yield
        return
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)


def _trim() -> None:
    """Give free heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). The sub-MB blocks
    freed in the threads' arenas while a large stacked leaf is converted otherwise stay resident:
    measured 5-15 MB of creep per expert leaf of the 480 MB test model, a third of its bound."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _bar(total: int, desc: str, progress: bool) -> tqdm:
    # disable=None: shown on a terminal, silent in logs and pipes.
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if progress else True)


# --------------------------------------------------------------------------- HF -> orbax


def _fill_leaf(entry: hf.Entry, source, dtype, budget: int, chunk: tuple[int, ...], bar: tqdm, pool, store) -> None:
    """Slab after slab (half the budget, at least one stored chunk): read its HF tensors straight into
    one buffer and hand tensorstore the r1jax view of it (the leaf is stored in HF order, so the
    encoded chunks are a copy of rows, not a transpose), letting it reference the buffer instead of
    copying it. The next slab is read once the previous one is committed, so the buffer and
    tensorstore's encoded copy are all there is; reading ahead during the commit measured no faster
    on 2 cores."""
    pending = None
    for slab in hf.slabs(entry, budget // 2, dtype.itemsize, chunk):
        if pending is not None:
            pending.result()
        values = hf.read_hf_slab(entry, source, slab, dtype, pool)
        pending = store[slab].write(hf.params_view(entry, values), can_reference_source_data_indefinitely=True)
        bar.update(values.nbytes)
        del values
    if pending is not None:
        pending.result()
    _trim()


def _budget(cfg) -> int:
    """Bytes in flight: the largest tensor (no slab can be smaller than one). Slabs are half of it
    where the chunks allow, so a slab and its copy in tensorstore fit in it."""
    return max(hf.largest_tensor_bytes(cfg), MIN_CHUNK_BYTES)


def _streamed_tree(ckpt: hf_io.HFCheckpoint, bar: tqdm, pool) -> dict:
    tree = {}
    for e in hf.entries(ckpt.cfg):
        dtype = np.dtype(param_dtype(e.spec, ckpt.cfg))
        chunk = hf.chunk_lead(e, dtype.itemsize, MIN_CHUNK_BYTES)
        fill = functools.partial(_fill_leaf, e, ckpt.source, dtype, _budget(ckpt.cfg), chunk, bar, pool)
        leaf = orbax_stream.StreamedLeaf(e.spec.shape, dtype, chunk + e.inner_shape, fill, hf.hf_order(e.spec))
        hf.set_leaf(tree, e.keys, leaf)
    return tree


def _param_bytes(cfg) -> int:
    return sum(int(np.prod(e.spec.shape)) * np.dtype(param_dtype(e.spec, cfg)).itemsize for e in hf.entries(cfg))


def hf_to_orbax(src, dst, *, dtype=None, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert a HF directory (bf16/fp32, or DeepSeek's FP8 release, dequantized) into an r1jax model
    checkpoint: DST/config.yaml, DST/params/ (orbax) and the files that came with the weights
    (tokenizer, generation_config.json, ...). DST loads with `r1jax.load_pretrained` and as a train
    config's `init_from`. dtype defaults to the checkpoint's own (bfloat16 for FP8)."""
    with _destination(dst, overwrite, "hf-to-orbax") as out, paths.local_source(src, "hf-source") as src:
        _hf_to_orbax(src, out, _dtype(dtype), progress)
    return paths.as_path(dst)


@contextlib.contextmanager
def _destination(dst, overwrite: bool, what: str):
    """The AtomicDir to write `dst` through: `dst` itself when local; on gs:// a local one uploaded when
    complete. The destination is checked before any work either way."""
    paths.check_destination(dst, overwrite)
    with paths.local_destination(dst, what) as local:
        yield AtomicDir(local, overwrite)


def _hf_to_orbax(src: Path, out: AtomicDir, dtype, progress: bool) -> None:
    with hf_io.open_hf(src, dtype) as ckpt, out as tmp, _buffers_returned_on_free():
        with _bar(_param_bytes(ckpt.cfg), "hf-to-orbax", progress) as bar, ThreadPoolExecutor(WORKERS) as pool:
            orbax_stream.save_params(tmp / orbax_io.PARAMS_ITEM, _streamed_tree(ckpt, bar, pool), out.flush_soon)
        orbax_io.write_model_config(tmp, ckpt.cfg)
        hf_io.copy_assets(src, tmp)


# --------------------------------------------------------------------------- orbax -> HF


def _open_orbax(src):
    cfg = orbax_io.read_model_config(src)
    ents = hf.entries(cfg)
    expected = {e.leaf_name: jax.ShapeDtypeStruct(e.spec.shape, param_dtype(e.spec, cfg)) for e in ents}
    return cfg, ents, orbax_stream.open_leaves(orbax_io.params_dir(src), expected)


def _read_slabs(ents: list[hf.Entry], stores: dict, cfg, budget: int):
    """(entry, slab, values in HF layout) of every leaf in turn, in slabs of whole stored chunks. The
    next slab, of this leaf or the next, is read while the caller writes the current one whenever the
    two fit in the budget together (tensorstore briefly holds its own copy of a slab being read, so
    that keeps the total near twice the budget)."""
    todo = []
    for e in ents:
        itemsize = np.dtype(param_dtype(e.spec, cfg)).itemsize
        chunk = orbax_stream.chunk_lead(stores[e.leaf_name], e.lead)
        todo += [(e, slab, int(np.prod(hf.slab_shape(e, slab))) * itemsize)
                 for slab in hf.slabs(e, budget // 2, itemsize, chunk)]
    read = lambda e, slab: orbax_stream.read_in_order(stores[e.leaf_name], slab, hf.hf_order(e.spec))  # noqa: E731
    ahead = None
    for i, (e, slab, size) in enumerate(todo):
        try:
            values = (ahead if ahead is not None else read(e, slab)).result()
        except ValueError as err:  # tensorstore's errors: a missing or corrupt chunk
            raise CheckpointError(f"leaf '{e.leaf_name}' [{_fmt_slab(slab)}]: cannot read ({err})") from None
        following = todo[i + 1] if i + 1 < len(todo) else None
        ahead = read(*following[:2]) if following and size + following[2] <= budget else None
        yield e, slab, values.reshape(values.shape[:e.lead] + hf.hf_shape(e.spec))
        del values


def _fmt_slab(slab: hf.Slab) -> str:
    return ", ".join(f"{s.start}:{s.stop}" for s in slab)


QUANTIZE = ("fp8",)


def _quantize(quantize, cfg) -> str | None:
    if quantize is None:
        return None
    if quantize not in QUANTIZE:
        raise ConfigError(f"quantize: expected one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if architecture(cfg) is not DEEPSEEK:
        raise ConfigError(f"quantize: {quantize} writes DeepSeek's FP8 release format; a {cfg.model_type} "
                          f"model has none")
    return quantize


def orbax_to_hf(src, dst, *, max_shard_size="5GB", dtype=None, quantize=None, overwrite: bool = False,
                progress: bool = True) -> Path:
    """Convert an r1jax checkpoint (a model checkpoint, or the latest step of a training checkpoint)
    into a HF directory: sharded safetensors of at most max_shard_size each (a larger tensor gets a
    shard of its own) with model.safetensors.index.json, config.json, generation_config.json and the
    files that came with the checkpoint. The MTP module is written as layer num_hidden_layers.
    quantize='fp8' writes DeepSeek's FP8 release format (fp8.quantize: float8_e4m3fn projections with
    float32 `weight_scale_inv` per 128x128 block, the other weights in `dtype`, default bfloat16, and
    quantization_config in config.json)."""
    paths.check_destination(dst, overwrite)
    max_bytes, dtype = parse_size(max_shard_size), _dtype(dtype)
    src = orbax_io.checkpoint_root(src)  # a run directory: its checkpoints/
    cfg, ents, stores = _open_orbax(src)
    quantize = _quantize(quantize, cfg)
    dtype = dtype or ("bfloat16" if quantize else None)
    plan = hf.tensor_plan(cfg, dtype, quantize)
    with _destination(dst, overwrite, "orbax-to-hf") as out:
        _write_hf(out, src, cfg, ents, stores, plan, dtype, quantize, max_bytes, progress)
    return paths.as_path(dst)


def _write_hf(out: AtomicDir, src, cfg, ents, stores, plan, dtype, quantize, max_bytes: int, progress: bool) -> None:
    budget = _budget(cfg)
    with out as tmp, _buffers_returned_on_free():
        with (ShardedWriter(tmp, plan, max_bytes) as writer, ThreadPoolExecutor(WORKERS) as pool,
              _bar(sum(p.nbytes for p in plan), "orbax-to-hf", progress) as bar):
            unflushed, leaf = 0, None
            for e, slab, values in _read_slabs(ents, stores, cfg, budget):
                if e is not leaf:
                    _trim()
                    leaf = e
                written = hf.write_hf_slab(writer, e, cfg, slab, values, dtype, quantize, pool)
                bar.update(written)
                unflushed += written
                del values  # before the generator reads on
                if unflushed >= FLUSH_BYTES:  # what is written goes to disk while the rest is converted
                    for fd in writer.fds:
                        out.flush_soon(fd=fd)
                    unflushed = 0
        hf_io.write_config_files(tmp, cfg, dtype or cfg.param_dtype, assets_from=orbax_io.config_dir(src),
                                 quantization_config=fp8.QUANTIZATION_CONFIG if quantize else None)


# --------------------------------------------------------------------------- command line


def _run_hf_to_orbax(args) -> int:
    out = hf_to_orbax(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    print(f"r1jax convert: wrote the orbax checkpoint {out}")
    return 0


def _run_orbax_to_hf(args) -> int:
    out = orbax_to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype,
                      quantize=args.quantize, overwrite=args.overwrite)
    print(f"r1jax convert: wrote the Hugging Face directory {out}")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add `convert hf-to-orbax SRC DST` and `convert orbax-to-hf SRC DST` to an argparse subparsers
    object; each sets `func(args) -> exit code`."""
    parser = subparsers.add_parser("convert", help="convert weights: Hugging Face safetensors <-> r1jax orbax",
                                   description="Convert weights between Hugging Face safetensors directories "
                                               "(bf16/fp32 or DeepSeek's FP8 release) and r1jax orbax checkpoints, "
                                               "streamed tensor by tensor.")
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-orbax", help="HF directory (bf16/fp32 or the FP8 release) -> r1jax checkpoint")
    a.add_argument("src", metavar="SRC", help="Hugging Face directory: config.json + safetensors (+ index); local or gs://")
    a.add_argument("dst", metavar="DST", help="r1jax checkpoint directory to create; local or gs://")
    a.add_argument("--dtype", choices=DTYPES, help="parameter dtype (default: the checkpoint's; bfloat16 for FP8)")
    a.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    a.set_defaults(func=_run_hf_to_orbax)
    b = sub.add_parser("orbax-to-hf", help="r1jax checkpoint -> Hugging Face directory")
    b.add_argument("src", metavar="SRC", help="r1jax model checkpoint, a training run's directory, its checkpoints/ "
                                              "(latest step) or one step in it (checkpoints/<step>); local or gs://")
    b.add_argument("dst", metavar="DST", help="Hugging Face directory to create; local or gs://")
    b.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB, 500MB (default 5GB)")
    b.add_argument("--dtype", choices=DTYPES, help="dtype of the written weights (default: the checkpoint's; "
                                                   "bfloat16 beside FP8 weights)")
    b.add_argument("--quantize", choices=QUANTIZE, help="fp8: DeepSeek's FP8 release format (float8_e4m3fn "
                                                        "projections with a float32 scale per 128x128 block)")
    b.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    b.set_defaults(func=_run_orbax_to_hf)
    return parser
