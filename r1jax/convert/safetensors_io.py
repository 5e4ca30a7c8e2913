"""Reading and writing Hugging Face safetensors directories one tensor at a time.

A directory holds `model.safetensors`, or shards listed by `model.safetensors.index.json`
(`weight_map`: tensor name -> file). Nothing here loads more than one tensor at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from r1jax.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class SafetensorsReader:
    """Tensor name -> file map over a HF directory, opening each file on demand."""

    def __init__(self, directory):
        self.dir = Path(directory)
        index = self.dir / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: weight_map must map tensor names to files")
            self.files = {name: self.dir / f for name, f in weight_map.items()}
            for f in sorted(set(self.files.values())):
                if not f.exists():
                    raise CheckpointError(f"{index}: lists shard {f.name}, which does not exist")
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no {SINGLE}, {INDEX} or *.safetensors files")
            self.files = {}
            for f in files:
                for name in self._open(f).keys():
                    self.files[name] = f
        self._handles = {}

    def _open(self, f: Path):
        try:
            return safe_open(str(f), framework="numpy")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = self._open(f)
        return self._handles[f]

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def _located(self, name: str):
        if name not in self.files:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        h = self._handle(self.files[name])
        if name not in h.keys():
            raise CheckpointError(f"{self.files[name]}: index lists tensor {name!r} but the file lacks it")
        return h

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._located(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._located(name).get_slice(name).get_dtype()

    def get(self, name: str) -> np.ndarray:
        try:
            return self._located(name).get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.files[name]}: cannot read tensor {name!r} ({e})") from None


def write_sharded(directory, tensors, max_shard_bytes: int = 5 * 2**30, metadata=None) -> list[str]:
    """Write (name, array) pairs from an iterator into shards of at most max_shard_bytes (a single
    larger tensor gets a shard of its own). Holds at most one shard in memory."""
    directory = Path(directory)
    shards, current, size = [], {}, 0
    tmp_names = []

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(tmp_names) + 1:05d}.safetensors"
            save_file(current, str(directory / name), metadata=metadata or {"format": "pt"})
            tmp_names.append(name)
            shards.append(list(current))
            current, size = {}, 0

    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if current and size + arr.nbytes > max_shard_bytes:
            flush()
        current[name] = arr
        size += arr.nbytes
    flush()
    n = len(tmp_names)
    if n == 1:
        os.replace(directory / tmp_names[0], directory / SINGLE)
        return [SINGLE]
    final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for tmp, fin, names in zip(tmp_names, final, shards):
        os.replace(directory / tmp, directory / fin)
        for t in names:
            weight_map[t] = fin
        total += (directory / fin).stat().st_size
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return final
