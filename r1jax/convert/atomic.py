"""Directories that appear only when complete: written under a temporary sibling, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from r1jax.errors import CheckpointError


def check_destination(dst: Path, overwrite: bool) -> None:
    """An existing, non-empty `dst` is only ever replaced with overwrite=True."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(f"{dst}: already exists and is not empty (pass overwrite=True)")


class AtomicDir:
    """`with AtomicDir(dst, overwrite) as tmp:` write into `tmp`; on success it is renamed to `dst`
    (an old `dst` is removed only after the new one is in place), on any error or interrupt it is
    deleted, so `dst` never holds half a result. The destination is checked on construction, before
    any work."""

    def __init__(self, dst, overwrite: bool = False):
        self.dst = Path(dst)
        check_destination(self.dst, overwrite)

    def __enter__(self) -> Path:
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.tmp-", dir=self.dst.parent))
        os.chmod(self.tmp, 0o755)  # mkdtemp's 0700 would otherwise become the published directory's mode
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        # Writers skip per-file fsync (tensorstore's costs ~3x in throughput); one flush here means a
        # crash can never publish a directory whose data was still only in the page cache.
        os.sync()
        if self.dst.exists():
            old = self.dst.with_name(f".{self.dst.name}.old-{os.getpid()}")
            os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.dst)
        return False
