"""DeepSeek's FP8 release (docs/deepseek_v3.md §8): block-quantized linear weights, dequantized as they are read
and quantized as they are written.

A quantized weight `W [rows, cols]` is float8_e4m3fn with a float32 companion `W_scale_inv` of shape
`[ceil(rows / b0), ceil(cols / b1)]`, `(b0, b1) = quantization_config.weight_block_size`:
`w[r, c] = q[r, c] * scale_inv[r // b0, c // b1]`, edge blocks partial. The product is taken in
float32, as DeepSeek's own `weight_dequant` kernel does, and rounded once to the target dtype by
the caller. Weights without a companion (embeddings, norms, the router) are stored as they are.

Quantizing follows DeepSeek's `weight_quant` kernel (inference/kernel.py), per 128x128 block:
`s = amax / 448`, `q = e4m3(w / s)` in float32, `scale_inv = s`. The release quantizes the
attention and MLP projections (dense, shared and routed experts) and nothing else: the embedding,
lm_head, the MTP module's eh_proj and shared head, the router and the norms stay bf16 (vLLM and
SGLang load eh_proj as a plain bf16 Linear).
"""

from __future__ import annotations

import math
import re

import ml_dtypes
import numpy as np

from r1jax.convert.safetensors_io import SafetensorsReader
from r1jax.errors import CheckpointError, ConfigError

SCALE_SUFFIX = "_scale_inv"
QUANTIZED_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_DTYPES = ("F32", "BF16", "F16")  # any of these holds the release's float32 scales' values exactly
BLOCK = (128, 128)  # the release's weight_block_size
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
# Elements per numpy step when (de)quantizing: temporaries stay in cache and below the 1 MB mmap threshold
# convert.commands sets, ~5x faster than whole block rows of a 7168-wide weight.
STEP_ELEMENTS = 1 << 16
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": list(BLOCK)}
_QUANTIZED = re.compile(r"model\.layers\.\d+\."
                        r"(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                        r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")
# float8 -> float32 by table: ml_dtypes' per-element astype runs ~10x slower than a 256-entry lookup.
_TO_F32 = {name: np.arange(256, dtype=np.uint8).view(dt).astype(np.float32)
           for name, dt in (("F8_E4M3", ml_dtypes.float8_e4m3fn), ("F8_E5M2", ml_dtypes.float8_e5m2))}


def quantized(name: str) -> bool:
    """Whether the release stores HF tensor `name` as block FP8."""
    return _QUANTIZED.fullmatch(name) is not None


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
        out = _TO_F32[self.reader.dtype(name)][q.view(np.uint8)]
        for r in _block_starts(start, stop, b0):
            end = min(stop, (r // b0 + 1) * b0)
            # One row of blocks shares one row of scales, repeated over each block's columns.
            out[r - start:end - start] *= np.repeat(scale[r // b0 - first], b1)[: q.shape[1]]
        return out

    def read_into(self, name: str, out: np.ndarray) -> None:
        """out[...] = the whole (dequantized) tensor, cast to out's dtype: a block row at a time, a few
        blocks wide per numpy step (as quantize does, to keep temporaries small)."""
        if name not in self.scale_of:
            self.reader.read_into(name, out)
            return
        b0, b1 = self.block
        rows, cols = self.shape(name)
        scale = self.reader.read(self.scale_of[name]).astype(np.float32)
        to_f32 = _TO_F32[self.reader.dtype(name)]
        step = b1 * max(1, STEP_ELEMENTS // (b0 * b1))
        for r in range(0, rows, b0):
            q = self.reader.read_rows(name, r, min(rows, r + b0)).view(np.uint8)
            s = np.repeat(scale[r // b0], b1)[:cols]
            for c in range(0, cols, step):
                out[r:r + b0, c:c + step] = to_f32[q[:, c:c + step]] * s[c:c + step]

    def close(self) -> None:
        self.reader.close()


def _block_starts(start: int, stop: int, b0: int):
    """First row of each block row that [start, stop) touches (the first may start mid-block)."""
    if start >= stop:
        return
    yield start
    yield from range((start // b0 + 1) * b0, stop, b0)


# --------------------------------------------------------------------------- quantizing


def to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn, round to nearest even, for |x| <= 448: the value ml_dtypes' astype
    gives, computed with integer ops on the float32 bits (~5x faster than its per-element cast)."""
    x = np.ascontiguousarray(x, np.float32)
    bits = x.view(np.uint32)
    mag = bits & np.uint32(0x7FFFFFFF)
    # Normal e4m3 (|x| >= 2^-6): round the 23-bit mantissa to 3 bits, ties to even (a carry rolls
    # into the exponent, as it should), then rebias the exponent from 127 to 7.
    code = mag + ((mag >> 20) & np.uint32(1))
    code += np.uint32(0x7FFFF)
    code >>= 20
    code -= np.uint32(120 << 3)
    # Subnormal e4m3 (|x| < 2^-6) are the multiples of 2^-9; x * 512 is exact, so rint rounds once.
    small = np.flatnonzero(mag < np.uint32(121 << 23))  # few: below 2^-6 of the block's largest / 448
    code.ravel()[small] = np.rint(np.abs(x.ravel()[small]) * np.float32(512)).astype(np.uint32)
    code |= (bits >> 24) & np.uint32(0x80)
    return code.astype(np.uint8).view(ml_dtypes.float8_e4m3fn)


def quantize(w: np.ndarray, name: str, block: tuple[int, int] = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Block FP8 of a 2-d weight `w [rows, cols]` (any float dtype; rows a multiple of block[0] unless
    they end the tensor): (q float8_e4m3fn [rows, cols], scale_inv float32 [ceil(rows/b0), ceil(cols/b1)]).
    Per block, DeepSeek's weight_quant (inference/kernel.py): `s = amax / 448`, `q = e4m3(w / s)` in
    float32. An all-zero block, where that is 0/0, gets q = 0 and s = 1."""
    b0, b1 = block
    rows, cols = w.shape
    q = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    scale_inv = np.empty((-(-rows // b0), -(-cols // b1)), np.float32)
    for i, r in enumerate(range(0, rows, b0)):
        x = w[r:r + b0]
        step = b1 * max(1, STEP_ELEMENTS // (len(x) * b1))
        amax = np.empty(-(-cols // b1), np.float32)
        for c in range(0, cols, step):
            part = np.maximum.reduceat(np.abs(np.asarray(x[:, c:c + step], np.float32)).max(axis=0),
                                       np.arange(0, min(step, cols - c), b1))
            amax[c // b1:c // b1 + len(part)] = part
        if not np.isfinite(amax).all():
            raise CheckpointError(f"{name}: cannot quantize to FP8, rows {r}:{r + len(x)} hold inf or nan")
        s = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1))
        scale_inv[i] = s
        inv = np.repeat(s, b1)[:cols]
        for c in range(0, cols, step):
            q[r:r + b0, c:c + step] = to_e4m3(np.asarray(x[:, c:c + step], np.float32) / inv[c:c + step])
    return q, scale_inv
