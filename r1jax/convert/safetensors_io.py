"""Safetensors directories read and written one tensor (or one block of rows) at a time.

The format (huggingface/safetensors): an 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` padded with spaces
to a multiple of 8, then the data; offsets count from the end of the header and tile the data
exactly. A directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`
(`weight_map`: tensor name -> file).

The data is read with plain `readinto` at the header's offsets rather than through
`safetensors.safe_open`: its numpy loader has no float8 (DeepSeek's FP8 release), and mmap'd pages
would count towards the process's resident memory. The writer lays every file out up front (the
same order and header bytes as `safetensors.numpy.save_file`) and fills tensors in by offset, so a
shard is never held in memory and tensors may arrive in any order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

from r1jax.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
# Rows converted per step where a dtype changes: small enough that temporaries stay below the 1 MB mmap
# threshold convert.commands sets (reused heap memory, not fresh zeroed pages) and in cache.
BLOCK_BYTES = 512 << 10

DTYPES = {
    "BOOL": np.dtype(np.bool_), "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I32": np.dtype(np.int32), "U32": np.dtype(np.uint32),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64), "I64": np.dtype(np.int64),
    "U64": np.dtype(np.uint64),
}
# safetensors sorts a file's tensors by this rank, highest first, then by name.
_RANK = {name: i for i, name in enumerate(DTYPES)}
_NAMES = {dt: name for name, dt in DTYPES.items()}
FLOAT_DTYPES = ("F64", "F32", "BF16", "F16", "F8_E4M3", "F8_E5M2")


def dtype_name(dtype) -> str:
    """Safetensors spelling ('BF16') of a numpy/ml_dtypes dtype."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError:
        raise CheckpointError(f"dtype {np.dtype(dtype)} has no safetensors equivalent") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors spelling
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


# --------------------------------------------------------------------------- reading


def _bad(file: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{file}: cannot read safetensors file ({why})")


def _header_json(file: Path) -> tuple[dict, int, int]:
    """(header dict, data start, file size), checking the length prefix against the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _bad(file, f"{size} bytes is shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise _bad(file, f"header length {n} does not fit in a file of {size} bytes (truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise _bad(file, str(e)) from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(file, f"header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _bad(file, "header is not a JSON object")
    return header, 8 + n, size


def _entry(file: Path, name: str, e, start: int) -> tuple[TensorInfo, int, int]:
    """TensorInfo of one header entry plus its relative (begin, end), validated."""
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
        raise _bad(file, f"tensor {name!r}: header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
    if dtype not in DTYPES:
        raise _bad(file, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _bad(file, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
        raise _bad(file, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(file, f"tensor {name!r}: {dtype} {shape} needs {nbytes} bytes, data_offsets give "
                         f"{offsets[1] - offsets[0]}")
    return TensorInfo(name, file, dtype, tuple(shape), start + offsets[0], nbytes), offsets[0], offsets[1]


def read_header(file) -> dict[str, TensorInfo]:
    """Every tensor of one file, validated as safetensors does: entries well formed, offsets tiling
    the data from 0 without gaps or overlaps, and the data ending exactly at the end of the file."""
    file = Path(file)
    header, start, size = _header_json(file)
    header.pop("__metadata__", None)
    entries = sorted((_entry(file, name, e, start) for name, e in header.items()), key=lambda t: t[1])
    end = 0
    for info, begin, stop in entries:
        if begin != end:
            raise _bad(file, f"tensor {info.name!r}: data_offsets start at {begin}, expected {end}")
        end = stop
    if start + end != size:
        raise _bad(file, f"the header describes {start + end} bytes, the file has {size} (truncated?)")
    return {info.name: info for info, _, _ in entries}


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid safetensors index (weight_map must map tensor names to files)")
    return weight_map


class SafetensorsReader:
    """Tensor name -> TensorInfo over a HF directory; every header is read and validated up front,
    so a missing shard, a truncated file or a wrong index fails before any tensor is read."""

    def __init__(self, directory):
        self.dir = Path(directory)
        index = self.dir / INDEX
        self.infos: dict[str, TensorInfo] = {}
        if index.exists():
            self._from_index(index)
        else:
            self._from_files()
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def _from_index(self, index: Path):
        weight_map = _weight_map(index)
        headers = {}
        for f in sorted(set(weight_map.values())):
            if not (self.dir / f).is_file():
                raise CheckpointError(f"{index}: lists shard {f}, which does not exist")
            headers[f] = read_header(self.dir / f)
        for name, f in weight_map.items():
            if name not in headers[f]:
                raise CheckpointError(f"{self.dir / f}: index lists tensor {name!r} but the file lacks it")
            self.infos[name] = headers[f][name]

    def _from_files(self):
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.dir}: no {SINGLE}, {INDEX} or *.safetensors files")
        for f in files:
            for name, info in read_header(f).items():
                if name in self.infos:
                    raise CheckpointError(f"{self.dir}: tensor {name!r} is in both {self.infos[name].file.name} "
                                          f"and {f.name}")
                self.infos[name] = info

    @property
    def names(self) -> set[str]:
        return set(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> str:
        return self.info(name).dtype

    def value_dtype(self, name: str) -> str:
        """The dtype `read_rows` returns (the stored one; see fp8.DequantizingReader)."""
        return self.info(name).dtype

    def _fd(self, file: Path) -> int:
        with self._lock:  # tensors are read from several threads
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def _pread_into(self, info: TensorInfo, buf: np.ndarray, offset: int) -> None:
        view, done = memoryview(buf.reshape(-1).view(np.uint8)), 0
        try:
            fd = self._fd(info.file)
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} (file ends early)")
                done += n
        except OSError as e:
            raise CheckpointError(f"{info.file}: cannot read tensor {info.name!r} ({e})") from None

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor (along its first dim), read straight from the file."""
        info = self.info(name)
        if not info.shape:
            out = np.empty((), info.np_dtype)
            self._pread_into(info, out, info.offset)
            return out
        out = np.empty((stop - start,) + info.shape[1:], info.np_dtype)
        if out.size:
            self._pread_into(info, out, info.offset + start * info.row_bytes)
        return out

    def read_into(self, name: str, out: np.ndarray) -> None:
        """out[...] = the whole tensor, cast to out's dtype: read straight into `out` when the dtypes
        match and `out` is C-contiguous, else a block of rows at a time."""
        info = self.info(name)
        if tuple(out.shape) != info.shape:
            raise CheckpointError(f"{info.file}: tensor {name!r} is {list(info.shape)}, cannot read it into "
                                  f"{list(out.shape)}")
        if out.dtype == info.np_dtype and out.flags.c_contiguous:
            if out.size:
                self._pread_into(info, out, info.offset)
            return
        if not info.shape:
            out[...] = self.read_rows(name, 0, 0)
            return
        step = max(1, BLOCK_BYTES // max(1, info.row_bytes))
        for r in range(0, info.shape[0], step):
            out[r:r + step] = self.read_rows(name, r, min(info.shape[0], r + step))

    def read(self, name: str) -> np.ndarray:
        info = self.info(name)
        return self.read_rows(name, 0, info.shape[0] if info.shape else 0)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors spelling

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def _layout(tensors: list[TensorPlan], metadata: dict) -> tuple[bytes, dict[str, int]]:
    """(header bytes, relative offset per tensor) in safetensors' own order, so a file written here is
    byte-identical to `safetensors.numpy.save_file` of the same tensors."""
    ordered = sorted(tensors, key=lambda t: (-_RANK[t.dtype], t.name.encode()))
    header, offsets, end = {"__metadata__": metadata}, {}, 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [end, end + t.nbytes]}
        offsets[t.name] = end
        end += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def assign_shards(tensors: Iterable[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Greedy, in the given order: a new shard starts when the next tensor would overflow the current
    one (a tensor larger than the limit gets a shard of its own)."""
    shards, size = [[]], 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Writes a planned set of tensors into a HF directory: every file is created at its final size
    with its header, tensors (or blocks of their rows) are written in at their offsets in any order,
    and `close()` checks that every byte was written before writing the index."""

    def __init__(self, directory, tensors: list[TensorPlan], max_shard_bytes: int, metadata: dict | None = None):
        self.dir = Path(directory)
        shards = assign_shards(tensors, max_shard_bytes)
        self.files = shard_names(len(shards))
        self.where: dict[str, tuple[int, int, TensorPlan]] = {}  # name -> (fd, absolute offset, plan)
        self.todo = {t.name: t.nbytes for t in tensors}
        self._fds = []
        for fname, shard in zip(self.files, shards):
            header, offsets = _layout(shard, metadata or {"format": "pt"})
            fd = os.open(self.dir / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, header, 0)
            os.ftruncate(fd, len(header) + sum(t.nbytes for t in shard))
            for t in shard:
                self.where[t.name] = (fd, len(header) + offsets[t.name], t)
        self.weight_map = {t.name: f for f, shard in zip(self.files, shards) for t in shard}

    def write(self, name: str, rows: np.ndarray, start_row: int = 0) -> None:
        """Write `rows` as rows [start_row, start_row + len(rows)) of tensor `name`. Different tensors
        may be written from different threads at once."""
        fd, offset, plan = self.where[name]
        rows = np.asarray(rows)
        rows = rows if rows.flags.c_contiguous else rows.copy()
        fits = (rows.shape == plan.shape) if not plan.shape else (
            rows.shape[1:] == plan.shape[1:] and start_row + rows.shape[0] <= plan.shape[0])
        if rows.dtype != DTYPES[plan.dtype] or not fits:
            raise CheckpointError(f"{name}: cannot write {rows.dtype} {list(rows.shape)} at row {start_row} of "
                                  f"a {plan.dtype} {list(plan.shape)} tensor")
        row_bytes = plan.nbytes // plan.shape[0] if plan.shape and plan.shape[0] else plan.nbytes
        data = memoryview(rows.reshape(-1).view(np.uint8))
        pos, done = offset + start_row * row_bytes, 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], pos + done)
        self.todo[name] -= len(data)

    @property
    def fds(self) -> list[int]:
        """The open shard files (to start writing them back while the rest is converted)."""
        return list(self._fds)

    def close(self) -> list[str]:
        """Close the files; raise if any tensor was not completely written. Returns the file names."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        unfinished = sorted(n for n, left in self.todo.items() if left != 0)
        if unfinished:
            raise CheckpointError(f"{self.dir}: tensor {unfinished[0]!r} was not completely written"
                                  + (f" (and {len(unfinished) - 1} more)" if len(unfinished) > 1 else ""))
        if len(self.files) > 1:
            total = sum(p.nbytes for _, _, p in self.where.values())
            (self.dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": self.weight_map}, indent=2))
        return self.files

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()  # the caller's temporary directory goes, files and all
        return False
