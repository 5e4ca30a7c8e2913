"""Paths a user gives (run directories, checkpoints, data files, conversion sources and destinations,
sample and eval outputs): a local path, or a `gs://bucket/...` URI.

A local path stays a `pathlib.Path`, so local files keep what only a local file system offers (atomic
renames, fsync, pread). A URI becomes an `etils.epath.Path`, which has the same methods (`/`, `name`,
`parent`, `exists`, `read_text`, `write_text`, `open`, `glob`, `iterdir`, `mkdir`, `rmtree`) and reaches
Google Cloud Storage through gcsfs; orbax and tensorstore take the same object and use their own GCS
drivers. pathlib must never see a URI: it collapses `gs://b/x` into the local `gs:/b/x`.

Object stores have no rename and no append: code that writes must ask `is_remote` and write whole
objects there (docs/storage.md). The GCS client libraries read `STORAGE_EMULATOR_HOST` (gcsfs) and
`TENSORSTORE_GCS_HTTP_URL` (tensorstore), which the tests point at a local emulator."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from r1jax.errors import CheckpointError, ConfigError

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
SCHEMES = ("gs",)  # what r1jax has been tested on (tests/test_gcs.py, against an emulator)


def is_remote(path) -> bool:
    """Whether `path` is a URI (gs://...) rather than a local path."""
    return bool(_URI.match(str(path)))


def as_path(path):
    """pathlib.Path for a local path, etils.epath.Path for a gs:// URI. Another scheme is refused
    by name (r1jax has not been tried on it)."""
    if isinstance(path, Path):
        return path
    text = str(path)  # an epath.Path prints as its URI
    if not is_remote(text):
        return Path(text)
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"{text}: the {scheme}:// scheme is not supported (local paths and "
                          f"{', '.join(s + '://' for s in SCHEMES)} are)")
    _no_listing_cache()
    from etils import epath

    return epath.Path(text)


def _no_listing_cache() -> None:
    """gcsfs keeps directory listings for the life of the process, but orbax writes through tensorstore,
    behind gcsfs's back: a cached listing would miss a step saved since. fsspec's configuration holds
    the default for every gs:// file system made from now on."""
    import fsspec.config

    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def absolute(path):
    """`path` made absolute (orbax refuses relative paths); a URI is already absolute."""
    path = as_path(path)
    return path if is_remote(path) else path.absolute()


def check_destination(dst, overwrite: bool) -> None:
    """An existing, non-empty directory `dst` is only ever replaced with overwrite (the commands'
    `--overwrite`); checked before any work."""
    dst = as_path(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst}: already exists and is not empty (pass --overwrite to replace it; "
                              f"overwrite=True in Python)")


def makedirs(path) -> None:
    """Create a local directory and its parents. On gs:// nothing: a bucket has no directories (an
    object's name holds its whole path), and gcsfs's mkdir on a bucket path may create or demand the
    bucket depending on its version; a missing bucket is an error at the first write."""
    path = as_path(path)
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)


def rmtree(path) -> None:
    """Remove a directory and everything under it, if it exists."""
    path = as_path(path)
    if is_remote(path):
        if path.exists():
            path.rmtree()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _copy_entry(src, dst, copy_tree) -> None:
    """A directory by `copy_tree`, a file by `copy_file`; nothing when `src` does not exist."""
    if src.is_dir():
        copy_tree(src, dst)
    elif src.exists():
        copy_file(src, dst)


def upload_tree(src: Path, dst) -> None:
    """Copy the local directory `src` to `dst` (a URI), file by file. `config.yaml` and `config.json` go
    last: they are what makes a directory a checkpoint, so a reader that finds them finds the rest."""
    dst = as_path(dst)
    files = sorted((f for f in src.rglob("*") if f.is_file()), key=lambda f: f.name in ("config.yaml", "config.json"))
    for f in files:
        target = dst / f.relative_to(src).as_posix()
        copy_file(f, target)


def download_tree(src, dst: Path) -> Path:
    """Copy everything under the URI `src` into the local directory `dst` (created)."""
    src = as_path(src)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.is_dir():
            download_tree(entry, dst / entry.name)
        else:
            copy_file(entry, dst / entry.name)
    return dst


def copy_file(src, dst) -> None:
    """Copy one file, either side local or remote."""
    src, dst = as_path(src), as_path(dst)
    if not (is_remote(src) or is_remote(dst)):
        shutil.copy2(src, dst)
        return
    with src.open("rb") as r, dst.open("wb") as w:
        shutil.copyfileobj(r, w, 16 << 20)


def remote_files(spec: str) -> list[str]:
    """The files a gs:// path or glob (`gs://b/data/*.jsonl`, `**` for any depth) names, sorted."""
    parts = spec.split("/")
    magic = [i for i, p in enumerate(parts) if glob.has_magic(p)]
    if not magic:
        return [spec] if as_path(spec).is_file() else []
    base, pattern = as_path("/".join(parts[: magic[0]])), "/".join(parts[magic[0]:])
    return sorted(str(p) for p in base.glob(pattern) if p.is_file())


def local_copy(uri: str) -> str:
    """A local copy of the remote file `uri`, downloaded once per machine into the temporary directory
    (keyed by the URI, size and modification time, so a changed file is fetched again), for readers that
    need random access to a local file (jsonl by pread, parquet, ArrayRecord)."""
    src = as_path(uri)
    stat = src.stat()
    key = hashlib.sha256(f"{uri}|{stat.length}|{stat.mtime}".encode()).hexdigest()[:16]
    dst = Path(tempfile.gettempdir()) / "r1jax-data" / key / src.name
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        part = dst.with_name(f".{dst.name}.part-{os.getpid()}")
        copy_file(src, part)
        os.replace(part, dst)  # readers on this machine never see half a file
    return str(dst)


@contextlib.contextmanager
def local_source(path, prefix: str):
    """A local path with the contents of `path`: itself when local, else a downloaded copy (removed on
    leaving), for readers that need a local file system (pread of safetensors)."""
    if not is_remote(path):
        yield as_path(path)
        return
    with local_staging(prefix) as d:
        yield download_tree(path, d / "source")


@contextlib.contextmanager
def local_destination(dst, prefix: str):
    """A local path to write a directory into: `dst` itself when local, else a staging directory that
    is uploaded to `dst` once the block succeeds (an existing `dst` is removed first: the caller has
    checked that it may be replaced) and removed in any case."""
    if not is_remote(dst):
        yield as_path(dst)
        return
    with local_staging(prefix) as d:
        yield d / "out"
        rmtree(dst)
        upload_tree(d / "out", dst)


class LocalMirror:
    """A local working copy of some entries (files or directories) of a remote directory, for writers
    that append or rename, which an object store cannot do: they work in `local`, and `sync` copies
    the entries back whole, at most every `every_s` seconds unless forced. Entries that exist remotely
    are downloaded on construction (a resumed writer continues from them)."""

    def __init__(self, remote_dir, names, *, every_s: float = 30.0, prefix: str = "mirror"):
        self.remote, self.names, self.every_s = as_path(remote_dir), list(names), every_s
        self.local = Path(tempfile.mkdtemp(prefix=f"r1jax-{prefix}-"))
        self._synced = time.monotonic()
        for name in self.names:
            _copy_entry(self.remote / name, self.local / name, download_tree)

    def sync(self, force: bool = False) -> None:
        """Copy the local entries up, in the order named (a later one may describe an earlier one)."""
        if not force and time.monotonic() - self._synced < self.every_s:
            return
        for name in self.names:
            _copy_entry(self.local / name, self.remote / name, upload_tree)
        self._synced = time.monotonic()

    def close(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)

    def __enter__(self) -> "LocalMirror":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@contextlib.contextmanager
def local_staging(prefix: str):
    """A local temporary directory, removed on leaving: where a remote source is read into, or a
    remote destination is written before it is uploaded."""
    d = Path(tempfile.mkdtemp(prefix=f"r1jax-{prefix}-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
