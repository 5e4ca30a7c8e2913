"""orbax params written and read a slab of tensors at a time, for models larger than host memory.

orbax serializes arrays that are already in memory. Here each leaf is a `StreamedLeaf` – shape,
dtype, chunk shape and a function that fills it – and a TypeHandler registered for that type opens
the leaf's tensorstore array exactly where orbax's own ArrayHandler would
(`type_handlers.get_json_tspec_write`) and lets the function write it slab by slab. The rest – tree
metadata, the temporary directory and its commit – is orbax's own, and the leaves are recorded as
`jax.Array`s, so `StandardCheckpointHandler` (and `checkpoint.orbax_io.load_model`) restores them
like any other checkpoint. Reading opens each leaf's tensorstore array the way orbax's restore does
and reads slabs of it.

Each leaf is a zarr v3 array whose chunks are stored in a given dim order (zarr's `transpose` codec):
the converter stores linear maps in Hugging Face's `[out, in]` order, so a chunk's bytes are its HF
tensors' bytes and neither direction computes a transpose (4x the throughput of storing r1jax's
input-first order, where tensorstore or numpy must transpose every element); a restore into r1jax's
layout transposes as it reads, in tensorstore's threads. Reading asks tensorstore for a transposed
view in the stored order, which is a plain copy for these checkpoints and still correct for orbax's
own (C order).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from r1jax import paths
from r1jax.checkpoint.orbax_io import check_tree, flat_leaves
from r1jax.errors import CheckpointError

# tensorstore threads that copy and write (or read) chunks. What is in flight is bounded by the slab
# either way; orbax's default of 128 threads measured no faster than 8 on multi-MB chunks.
CONCURRENCY = min(8, os.cpu_count() or 1)
# Reading an OCDBT checkpoint caches b-tree nodes; orbax's 100 MB pool is far more than a sequential
# read of each leaf needs.
OCDBT_CACHE_BYTES = 4 << 20


def ts_context(reading: bool = False) -> ts.Context:
    """orbax's tensorstore context with the limits above and without an fsync per chunk file (3x the
    throughput; convert.atomic.AtomicDir flushes everything once before publishing). Reading maps
    chunk files instead of reading them into a buffer (`file_io_mode: memmap`, 2x the throughput of
    multi-MB chunks from the page cache)."""
    spec = ocp.type_handlers.get_ts_context(use_ocdbt=True, file_io_concurrency_limit=CONCURRENCY,
                                            data_copy_concurrency_limit=CONCURRENCY).spec.to_json()
    for key in spec:
        if key.startswith("cache_pool"):
            # Writing caches nothing: a cached chunk would keep the whole slab it references alive.
            spec[key] = {"total_bytes_limit": OCDBT_CACHE_BYTES if reading else 0}
    spec["file_io_sync"] = False
    if reading:
        spec["file_io_mode"] = {"mode": "memmap"}
    return ts.Context(spec)


@dataclasses.dataclass(frozen=True)
class StreamedLeaf:
    shape: tuple[int, ...]
    dtype: np.dtype
    # Whole HF tensors (as few as make a few MB), so slabs of whole chunks never rewrite part of one.
    chunks: tuple[int, ...]
    fill: Callable[[ts.TensorStore], None]  # writes every element, synchronously
    order: tuple[int, ...] | None = None  # dim order of the stored chunks (None: C order)


def _zarr3_metadata(metadata: dict, order: tuple[int, ...] | None) -> dict:
    """orbax's zarr3 metadata with one file per chunk named like zarr v2's ('0.1.0'), uncompressed, in
    `order`. orbax's own wraps each chunk in a `sharding_indexed` shard of one chunk, whose index is
    only overhead here, so it is left out."""
    codecs = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if order is not None and tuple(order) != tuple(range(len(order))):
        codecs.insert(0, {"name": "transpose", "configuration": {"order": list(order)}})
    return {**metadata, "codecs": codecs,
            "chunk_key_encoding": {"name": "v2", "configuration": {"separator": "."}}}


class _StreamedLeafHandler(ocp.type_handlers.ArrayHandler):
    """Serializes StreamedLeaf values; restores (typestr 'jax.Array') go to orbax's ArrayHandler."""

    def __init__(self):
        # No per-leaf sharding file and no array-metadata store: restores name their target shardings
        # (orbax_io.load_model does), and orbax reads shapes and chunks from the zarr metadata.
        super().__init__(enable_write_sharding_file=False, array_metadata_store=None)
        self.context = ts_context()
        self.on_leaf_written: Callable[[Path], None] | None = None

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.type_handlers.SaveArgs()] * len(values)
        for leaf, info, arg in zip(values, infos, args):
            await info.await_path_creation()
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=leaf.shape, local_shape=leaf.chunks,
                dtype=leaf.dtype, process_index=jax.process_index() if info.is_ocdbt_checkpoint else None, arg=arg)
            if info.use_zarr3:
                spec["metadata"] = _zarr3_metadata(spec["metadata"], leaf.order)
            store = await ts.open(spec, create=True, open=True, context=self.context)
            # Leaves are filled one after another, so at most one leaf's slab is in memory.
            await asyncio.to_thread(leaf.fill, store)
            if self.on_leaf_written is not None:
                self.on_leaf_written(Path(info.path))
        return []


def save_params(directory, tree, on_leaf_written: Callable[[Path], None] | None = None) -> None:
    """Write a pytree of StreamedLeaf as an orbax params directory; `on_leaf_written(leaf directory)`
    is called as each leaf is complete. It differs from what StandardCheckpointer.save writes for the
    same arrays only in layout: one zarr3 array per leaf (no OCDBT: its b-tree grows with each of a
    model's ~10^5 chunk commits, and so did resident memory), each chunk one file in the leaf's
    `order`, uncompressed (weights barely compress; zstd halves the throughput)."""
    leaf_handler = _StreamedLeafHandler()
    leaf_handler.on_leaf_written = on_leaf_written
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler(array_metadata_store=None)),
        (StreamedLeaf, leaf_handler),
    )
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True, use_compression=False,
                                          type_handler_registry=registry)
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_no_ocdbt_merge_warning)
    try:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(epath.Path(Path(directory).absolute()), args=ocp.args.PyTreeSave(tree))
    finally:
        absl_logger.removeFilter(_no_ocdbt_merge_warning)


def _no_ocdbt_merge_warning(record: logging.LogRecord) -> bool:
    """orbax warns on every non-OCDBT save that it found no OCDBT files to merge; there are none to find."""
    return "Skipping merge of OCDBT" not in record.getMessage()


def chunk_lead(store: ts.TensorStore, lead: int) -> tuple[int, ...]:
    """Stacked dims of one stored chunk (reading whole chunks keeps each read to one decode)."""
    return tuple(store.chunk_layout.read_chunk.shape[:lead])


def read_in_order(store: ts.TensorStore, index: tuple, order: tuple[int, ...]) -> ts.Future:
    """Start reading `store[index]` transposed to `order` (numpy's transpose semantics), as a
    C-contiguous array: a plain copy when the chunks are stored in that order."""
    view = store[index]
    if tuple(order) != tuple(range(len(order))):
        view = view[ts.d[list(order)].transpose[:]]
    return view.read()


def open_leaves(params_dir, expected: dict) -> dict[str, ts.TensorStore]:
    """{leaf name: tensorstore array} of an orbax params directory, after checking its leaves, shapes
    and dtypes against `expected` ({dotted leaf name: jax.ShapeDtypeStruct}) from the metadata alone."""
    params_dir = epath.Path(paths.absolute(params_dir))  # gs:// too: tensorstore reads it directly
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(params_dir)
    if not use_ocdbt:
        # Checked here because orbax's own metadata read, failing on a missing array, leaves tensorstore
        # callbacks bound to its closed event loop.
        for name in expected:
            if not (params_dir / name).is_dir():
                raise CheckpointError(f"{params_dir}: missing leaf '{name}' (no {name}/ array directory)")
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(params_dir)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{params_dir}: orbax metadata is missing or unreadable ({e})") from None
    finally:
        handler.close()
    check_tree(expected, flat_leaves(metadata.tree), str(params_dir), check_dtype=True)
    context = ts_context(reading=True)
    stores = {}
    for name in expected:
        info = ocp.type_handlers.ParamInfo(name=name, parent_dir=params_dir, is_ocdbt_checkpoint=use_ocdbt,
                                           use_zarr3=metadata.use_zarr3, ts_context=context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        try:
            stores[name] = ts.open(spec, open=True, read=True, context=context).result()
        except ValueError as e:
            raise CheckpointError(f"{params_dir}: cannot open leaf '{name}' ({e})") from None
    return stores
