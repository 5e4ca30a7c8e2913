"""DeepSeek's FP8 release (spec §8): block-quantized linear weights, dequantized as they are read.

A quantized weight `W [rows, cols]` is float8_e4m3fn with a float32 companion `W_scale_inv` of shape
`[ceil(rows / b0), ceil(cols / b1)]`, `(b0, b1) = quantization_config.weight_block_size`:
`w[r, c] = q[r, c] * scale_inv[r // b0, c // b1]`, edge blocks partial. The product is taken in
float32, as DeepSeek's own `weight_dequant` kernel does, and rounded once to the target dtype by
the caller. Weights without a companion (embeddings, norms, the router) are stored as they are.
"""

from __future__ import annotations

import math

import numpy as np

from r1jax.convert.safetensors_io import SafetensorsReader
from r1jax.errors import CheckpointError, ConfigError

SCALE_SUFFIX = "_scale_inv"
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16", "F16")  # any of these holds the release's float32 scales' values exactly


def weight_block_size(hf_config: dict) -> tuple[int, int] | None:
    """(b0, b1) from config.json's quantization_config, or None for an unquantized checkpoint."""
    q = hf_config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"quantization_config: expected a mapping, got {q!r}")
    if q.get("quant_method") != "fp8":
        raise ConfigError(f"quantization_config.quant_method: only 'fp8' (DeepSeek's block FP8) is supported, "
                          f"got {q.get('quant_method')!r}")
    block = q.get("weight_block_size")
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"quantization_config.weight_block_size: expected [rows, cols] of positive integers, "
                          f"got {block!r}")
    return block[0], block[1]


class DequantizingReader:
    """A SafetensorsReader seen without its `*_scale_inv` companions: quantized weights read as their
    float32 values. Every companion is checked against its weight when the reader is built."""

    def __init__(self, reader: SafetensorsReader, block: tuple[int, int], where: str):
        self.reader, self.block, self.where = reader, block, where
        scales = {n for n in reader.names if n.endswith(SCALE_SUFFIX)}
        self.scale_of = {}
        for s in sorted(scales):
            self.scale_of[self._check_pair(s[: -len(SCALE_SUFFIX)], s)] = s
        for n in sorted(reader.names - scales):
            if reader.dtype(n) in QUANTIZED_DTYPES and n not in self.scale_of:
                raise CheckpointError(f"{where}: tensor {n!r} is {reader.dtype(n)} but has no "
                                      f"{n + SCALE_SUFFIX!r} to dequantize it with")
        self.names = reader.names - scales

    def _check_pair(self, w: str, s: str) -> str:
        if w not in self.reader.names:
            raise CheckpointError(f"{self.where}: unexpected tensor {s!r} (there is no weight {w!r} to scale)")
        wi, si = self.reader.info(w), self.reader.info(s)
        if wi.dtype not in QUANTIZED_DTYPES or len(wi.shape) != 2:
            raise CheckpointError(f"{self.where}: tensor {w!r} has a {s!r} companion but is {wi.dtype} "
                                  f"{list(wi.shape)}, expected a 2-d F8_E4M3 weight")
        want = [math.ceil(d / b) for d, b in zip(wi.shape, self.block)]
        if list(si.shape) != want:
            raise CheckpointError(f"{self.where}: tensor {s!r} has shape {list(si.shape)}, expected {want} for "
                                  f"{w!r} {list(wi.shape)} in {self.block[0]}x{self.block[1]} blocks")
        if si.dtype not in SCALE_DTYPES:
            raise CheckpointError(f"{self.where}: tensor {s!r} has dtype {si.dtype}, expected F32")
        return w

    def info(self, name: str):
        return self.reader.info(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.reader.shape(name)

    def dtype(self, name: str) -> str:
        """The stored dtype ('F8_E4M3' for a quantized weight)."""
        return self.reader.dtype(name)

    def value_dtype(self, name: str) -> str:
        """The dtype `read_rows` returns: float32 for a quantized weight."""
        return "F32" if name in self.scale_of else self.reader.dtype(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name not in self.scale_of:
            return self.reader.read_rows(name, start, stop)
        b0, b1 = self.block
        q = self.reader.read_rows(name, start, stop)
        first = start // b0
        scale = self.reader.read_rows(self.scale_of[name], first, -(-stop // b0)).astype(np.float32)
        out = q.astype(np.float32)
        for r in _block_starts(start, stop, b0):
            end = min(stop, (r // b0 + 1) * b0)
            # One row of blocks shares one row of scales, repeated over each block's columns.
            out[r - start:end - start] *= np.repeat(scale[r // b0 - first], b1)[: q.shape[1]]
        return out

    def close(self) -> None:
        self.reader.close()


def _block_starts(start: int, stop: int, b0: int):
    """First row of each block row that [start, stop) touches (the first may start mid-block)."""
    if start >= stop:
        return
    yield start
    yield from range((start // b0 + 1) * b0, stop, b0)
