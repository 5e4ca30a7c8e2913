"""Random-access data sources for grain: jsonl, parquet, Arrow, ArrayRecord and the built-in tasks.

Every source is a grain `RandomAccessDataSource` (`__len__`, `__getitem__`) whose items are `Row`s:
the record (raw bytes to parse, or an already-decoded dict) and where it came from (`file:line`), so
a bad row can be reported exactly, however far downstream it is found. Sources hold no open file
handles when pickled, so grain worker processes reopen them.

- jsonl: one scan at open time records where each non-blank line starts and ends (numpy, in 16 MiB
  blocks; the file is never held in memory); a row is one `os.pread`.
- parquet (needs `pyarrow`): random access by row group, the last few row groups decoded cached.
  A global shuffle over files with large row groups decodes a row group per row; convert large
  corpora to ArrayRecord for shuffled reading.
- Arrow (needs `pyarrow`): an IPC stream or file (`.arrow`), memory-mapped, so opening costs no
  reading; a `datasets.save_to_disk` directory is the Arrow files its `state.json` lists.
- ArrayRecord: grain's own `ArrayRecordDataSource`; each record is one UTF-8 JSON object.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import threading
from pathlib import Path
from typing import Any, NamedTuple

import grain
import numpy as np

from r1jax import paths
from r1jax.config import TaskConfig
from r1jax.config.stages import TASK_SOURCES
from r1jax.data import code_task, task_registry
from r1jax.data.tokenizer import BOS, render_chat
from r1jax.errors import DataError

_BLOCK = 16 << 20


class Row(NamedTuple):
    where: str  # "path:line", "path:record 7", "task:train:12"
    record: Any  # bytes (JSON text) or a dict


# --------------------------------------------------------------------------- jsonl


def _line_spans(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(starts, lengths, line_numbers) of a file's non-blank lines; line_numbers is None when no
    line is blank (row i is line i+1). 12 bytes a row."""
    newlines = []
    with open(path, "rb") as f:
        base = 0
        while block := f.read(_BLOCK):
            newlines.append(np.flatnonzero(np.frombuffer(block, np.uint8) == 0x0A) + base)
            base += len(block)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    lengths = (np.concatenate([nl, [base]]) - starts).astype(np.int32)
    keep = lengths > 0
    # Lines of one or two bytes may be whitespace only ("\r", " "); look at those few directly.
    short = np.flatnonzero(keep & (lengths <= 2))
    if len(short):
        with open(path, "rb") as f:
            for i in short:
                f.seek(starts[i])
                keep[i] = bool(f.read(lengths[i]).strip())
    if keep.all():
        return starts, lengths, None
    return starts[keep], lengths[keep], np.flatnonzero(keep) + 1


class JsonlSource:
    """Lines of a jsonl file, read on demand with `os.pread` (thread safe, no shared file offset).

    The index costs 12 bytes a row in each process that reads (worker processes hold a copy);
    for corpora of hundreds of millions of rows prefer ArrayRecord."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            self._starts, self._lengths, self._lines = _line_spans(self.path)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read: {e.strerror}") from None
        self._reset()

    def _reset(self):
        # Opened on first read: a glob may name thousands of files, most not read for a while.
        self._fd, self._lock = None, threading.Lock()

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, i: int) -> Row:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        line = i + 1 if self._lines is None else int(self._lines[i])
        return Row(f"{self.path}:{line}", os.pread(self._fd, int(self._lengths[i]), int(self._starts[i])))

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, rows={len(self)})"


# --------------------------------------------------------------------------- parquet


class ParquetSource:
    """Rows of a parquet file as dicts, by row group, with a small cache of decoded row groups."""

    def __init__(self, path: str, cache_row_groups: int = 4):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        self.path = str(path)
        try:
            meta = pq.ParquetFile(self.path).metadata
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for bad files
            raise DataError(f"{self.path}: not a readable parquet file: {e}") from None
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._cache_size = cache_row_groups
        self._reset()

    def _reset(self):
        self._file = None
        self._lock = threading.Lock()
        self._row_group = functools.lru_cache(self._cache_size)(self._read_row_group)

    def _read_row_group(self, g: int) -> list[dict]:
        if self._file is None:
            import pyarrow.parquet as pq

            self._file = pq.ParquetFile(self.path)
        return self._file.read_row_group(g).to_pylist()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> Row:
        g = int(np.searchsorted(self._offsets, i, side="right")) - 1
        with self._lock:  # one ParquetFile, several reader threads
            rows = self._row_group(g)
        return Row(f"{self.path}:row {i}", rows[i - int(self._offsets[g])])

    def __getstate__(self):
        state = dict(self.__dict__)
        for k in ("_file", "_lock", "_row_group"):
            state.pop(k)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def __repr__(self) -> str:
        return f"ParquetSource({self.path!r}, rows={len(self)})"


# --------------------------------------------------------------------------- Arrow


def _read_arrow(path: str):
    """An Arrow IPC file or stream (what `datasets` writes) as a memory-mapped table."""
    import pyarrow as pa

    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


class ArrowSource:
    """Rows of an Arrow IPC file as dicts; the table is memory-mapped (pages are read when touched)."""

    def __init__(self, path: str):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise DataError(f"{path}: reading Arrow needs pyarrow (pip install pyarrow)") from None
        self.path = str(path)
        try:
            self._table = _read_arrow(self.path)
        except Exception as e:  # ArrowInvalid / OSError for bad files
            raise DataError(f"{self.path}: not a readable Arrow file: {e}") from None
        self.columns = tuple(self._table.column_names)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i: int) -> Row:
        return Row(f"{self.path}:row {i}", self._table.slice(i, 1).to_pylist()[0])

    def __getstate__(self):  # worker processes map the file again rather than pickling the table
        return {"path": self.path, "columns": self.columns}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._table = _read_arrow(self.path)

    def __repr__(self) -> str:
        return f"ArrowSource({self.path!r}, rows={len(self)})"


def dataset_dir_files(path: str) -> list[str]:
    """A `datasets.save_to_disk` directory → its Arrow files, in order. A DatasetDict directory (one
    sub-directory per split) is refused with the splits to choose from. Local or gs://."""
    d = paths.as_path(path)
    if (d / "dataset_dict.json").is_file():
        splits = json.loads((d / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits)}; name one, e.g. "
                        f"{d / (splits[0] if splits else 'train')}")
    state = d / "state.json"
    if not state.is_file():
        raise DataError(f"{path}: a directory, but not one `datasets.save_to_disk` wrote (no state.json)")
    try:
        files = [d / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a `datasets` state file ({type(e).__name__}: {e})") from None
    if not files:
        raise DataError(f"{path}: the dataset has no data files")
    return [str(f) for f in files]


# --------------------------------------------------------------------------- ArrayRecord


class ArrayRecordSource:
    """Records of one ArrayRecord file (grain's reader); each record is JSON text."""

    def __init__(self, path: str):
        self.path = str(path)
        try:
            self._source = grain.sources.ArrayRecordDataSource([self.path])
        except Exception as e:  # array_record raises RuntimeError/ValueError for bad files
            raise DataError(f"{self.path}: not a readable ArrayRecord file: {e}") from None

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> Row:
        return Row(f"{self.path}:record {i}", self._source[i])

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.path!r}, rows={len(self)})"


# --------------------------------------------------------------------------- the built-in task


class CodeTaskSource:
    """Rows of the built-in code task (code_task.py): prompt, tests, solution, completion, messages."""

    def __init__(self, split: str):
        self.split = split

    def __len__(self) -> int:
        return code_task.num_rows(self.split)

    def __getitem__(self, i: int) -> Row:
        return Row(f"task:code:{self.split}:{i}", code_task.record(self.split, i))

    def __repr__(self) -> str:
        return f"CodeTaskSource({self.split!r}, rows={len(self)})"


class TaskSource:
    """Rows of the built-in task `cfg.name` (task_registry.py; arithmetic by default), carrying every
    field a pipeline kind reads: `text` (pretrain), `messages` / `prompt` + `completion` (SFT),
    `prompt` + `answer` (RL; what the task's verifier reads) and `task`, its name, which picks the
    verifier of the `accuracy` reward and of eval."""

    def __init__(self, cfg: TaskConfig, split: str):
        self.cfg, self.split = cfg, split
        self._task = task_registry.get(cfg.name)
        # The held-out set is a fixed list of distinct problems; train rows are drawn on demand.
        self._fixed = self._task.problems(cfg, split, cfg.num_eval) if split == "eval" else None

    def __len__(self) -> int:
        return self.cfg.num_eval if self.split == "eval" else self.cfg.num_train

    def problem(self, i: int):
        return self._fixed[i] if self._fixed is not None else self._task.generate(self.cfg, self.split, i)

    def __getitem__(self, i: int) -> Row:
        p = self.problem(i)
        record = {
            "id": p.id, "prompt": p.question, "completion": p.gold_completion(), "answer": p.gold,
            "messages": p.sft_messages(), "task": self.cfg.name,
            # As a plain document: the chat string without bos (pretraining adds bos and eos).
            "text": render_chat(p.sft_messages()).removeprefix(BOS),
        }
        return Row(f"task:{self.split}:{i}", record)

    def __repr__(self) -> str:
        return f"TaskSource({self.split!r}, rows={len(self)}, {self.cfg})"


# --------------------------------------------------------------------------- opening sources

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow",
               ".array_record": "arrayrecord", ".arrayrecord": "arrayrecord"}
_READERS = {"jsonl": JsonlSource, "parquet": ParquetSource, "arrow": ArrowSource, "arrayrecord": ArrayRecordSource}


def expand(spec: str) -> list[str]:
    """A path, glob or `save_to_disk` directory → sorted matching files; DataError when nothing matches.
    A gs:// path or glob names remote files (r1jax/paths.py)."""
    if paths.is_remote(spec):
        if not glob.has_magic(spec) and paths.as_path(spec).is_dir():
            return dataset_dir_files(spec)
        files = paths.remote_files(spec)
        if not files:
            raise DataError(f"{spec}: " + ("no files match" if glob.has_magic(spec) else "no such file"))
        return files
    if glob.has_magic(spec):
        files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{spec}: no files match")
        return files
    if os.path.isdir(spec):
        return dataset_dir_files(spec)
    if not os.path.isfile(spec):
        raise DataError(f"{spec}: no such file")
    return [spec]


def format_of(path: str, fmt: str = "auto") -> str:
    """The reader for a file: `fmt` if given, else by extension."""
    if fmt != "auto":
        return fmt
    if path.endswith((".gz", ".zst", ".bz2", ".xz")):
        raise DataError(f"{path}: compressed files have no random access; decompress it or convert to ArrayRecord")
    ext = Path(path).suffix
    if ext not in _EXTENSIONS:
        raise DataError(f"{path}: unknown file type {ext!r}; expected one of {sorted(_EXTENSIONS)} "
                        "or set data.format")
    return _EXTENSIONS[ext]


def open_source(spec: str, *, fmt: str = "auto", task: TaskConfig | None = None) -> list:
    """One `sources` entry → its random-access sources (one per file; one for `task:*`)."""
    if spec.startswith("task:"):
        if spec not in TASK_SOURCES:
            raise DataError(f"{spec}: the built-in tasks are {', '.join(TASK_SOURCES)}")
        if spec.startswith("task:code:"):
            return [CodeTaskSource(spec.removeprefix("task:code:"))]
        return [TaskSource(task or TaskConfig(), spec.removeprefix("task:"))]
    # A remote file is read from a local copy: the readers need random access (pread, parquet, ArrayRecord).
    return [_READERS[format_of(f, fmt)](paths.local_copy(f) if paths.is_remote(f) else f) for f in expand(spec)]
