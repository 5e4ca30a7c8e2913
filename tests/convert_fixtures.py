"""Hugging Face directories for the conversion tests: random models of any size written tensor by
tensor, and DeepSeek-style FP8 releases written with torch's safetensors (a writer r1jax does not own)."""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import ml_dtypes
import numpy as np

import r1jax
from r1jax.convert.hf import tensor_plan
from r1jax.convert.hf_io import write_config_files
from r1jax.convert.safetensors_io import DTYPES, ShardedWriter


def moe_config(hidden=64, vocab=512, layers=3, experts=8, moe_ffn=32, ffn=128, mtp=1) -> r1jax.ModelConfig:
    """A small V3-architecture config (q compression, a dense layer, MoE layers, MTP)."""
    return r1jax.ModelConfig.from_hf_config(dict(
        model_type="deepseek_v3", vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        moe_intermediate_size=moe_ffn, num_hidden_layers=layers, num_attention_heads=4, n_shared_experts=1,
        n_routed_experts=experts, num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
        max_position_embeddings=1024, num_nextn_predict_layers=mtp))


def random_params(cfg, seed=0) -> dict:
    """Random numpy params for `cfg` (init_params would compile; conversion only moves bytes)."""
    import jax

    from r1jax.model.params import param_shapes

    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32).astype(s.dtype), param_shapes(cfg))


def _rng(seed: int, name: str) -> np.random.Generator:
    """One generator per tensor; the MTP module's copy of the embedding gets the embedding's values,
    as in the release (docs/deepseek_v3.md §6: one shared embedding)."""
    name = re.sub(r"^model\.layers\.\d+\.embed_tokens\.weight$", "model.embed_tokens.weight", name)
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def write_random_hf(directory, cfg, dtype="float32", max_shard_bytes=5 * 2**30, seed=0) -> int:
    """A HF directory of random weights for `cfg`, generated and written one tensor at a time (so a
    model larger than memory can be made). Returns the number of weight bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    plan = tensor_plan(cfg, dtype)
    with ShardedWriter(directory, plan, max_shard_bytes) as writer:
        for p in plan:
            writer.write(p.name, (_rng(seed, p.name).random(p.shape, np.float32) - 0.5).astype(DTYPES[p.dtype]))
    write_config_files(directory, cfg, np.dtype(dtype).name)
    return sum(p.nbytes for p in plan)


# Linear weights DeepSeek's release quantizes: the attention and MLP projections. The embedding, lm_head,
# the MTP module's eh_proj and shared head, the router and the norms stay bf16 (vLLM's deepseek_mtp.py
# loads eh_proj as a plain nn.Linear).
RELEASE_FP8 = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")


def quantized(name: str) -> bool:
    return name.startswith("model.layers.") and name.split(".")[-2] in RELEASE_FP8


def write_fp8_release(directory, cfg, block=(128, 128), shards=3, seed=0) -> dict[str, np.ndarray]:
    """A release-style directory: float8_e4m3fn projections with float32 `_scale_inv` per block,
    bfloat16 elsewhere (fp32 router bias), `shards` files + index, quantization_config in config.json.
    Returns {name: float32 value as stored} (the quantized ones still as (q, scale_inv) pairs)."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True)
    stored = {}
    for p in tensor_plan(cfg, "bfloat16"):
        rng = _rng(seed, p.name)
        if quantized(p.name):
            grid = [math.ceil(d / b) for d, b in zip(p.shape, block)]
            q = rng.uniform(-448, 448, p.shape).astype(np.float32)  # the e4m3 range
            stored[p.name] = torch.from_numpy(q).to(torch.float8_e4m3fn)
            stored[p.name + "_scale_inv"] = torch.from_numpy(rng.uniform(1e-5, 1e-3, grid).astype(np.float32))
        else:
            w = rng.standard_normal(p.shape).astype(np.float32) * 0.05
            stored[p.name] = torch.from_numpy(w).to(torch.bfloat16 if p.dtype == "BF16" else torch.float32)
    names = sorted(stored)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, f in enumerate(files):
        part = names[i::shards]
        save_file({n: stored[n] for n in part}, str(directory / f), metadata={"format": "pt"})
        weight_map.update({n: f for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf_cfg = cfg.to_hf_config()
    hf_cfg["torch_dtype"] = "bfloat16"
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (directory / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (directory / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    return {n: _to_numpy(t) for n, t in stored.items()}


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def quantize_reference(w: np.ndarray, block=(128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's weight_quant (inference/kernel.py) written out block by block with numpy and
    ml_dtypes: s = amax / 448 and q = float8_e4m3fn(w / s), both in float32; an all-zero block gets
    s = 1. Returns (q, scale_inv)."""
    w = np.asarray(w, np.float32)
    grid = [math.ceil(d / b) for d, b in zip(w.shape, block)]
    q = np.zeros(w.shape, ml_dtypes.float8_e4m3fn)
    scale = np.zeros(grid, np.float32)
    for i in range(grid[0]):
        for j in range(grid[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            amax = np.abs(w[rows, cols]).max()
            s = amax / np.float32(448) if amax > 0 else np.float32(1)
            scale[i, j] = s
            q[rows, cols] = (w[rows, cols] / s).astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def dequantize_reference(q: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    """Spec §8 written out independently of r1jax: w[r, c] = q[r, c] * scale_inv[r // b0, c // b1],
    in float64 (exact for an fp8 times an fp32), rounded once to float32."""
    rows, cols = np.indices(q.shape)
    return (q.astype(np.float64) * scale_inv.astype(np.float64)[rows // block[0], cols // block[1]]).astype(np.float32)
