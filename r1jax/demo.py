"""`r1jax demo`: the main job on its embedded default, with no downloads.

Builds the tiny V3-architecture model (MLA + YaRN, grouped sigmoid routing, a dense layer, MTP),
runs it, exports it to a Hugging Face directory, reads the export back and checks that the logits
are bit-identical.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

import r1jax
from r1jax.config import ModelConfig
from r1jax.model import transformer
from r1jax.model.params import count_params, init_params

# The embedded default (also in configs/model/tiny_v3.yaml; a test keeps the two equal).
TINY_V3 = dict(
    model_type="deepseek_v3", vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
    n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
    kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    max_position_embeddings=1024, rope_theta=10000,
    rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=256, beta_fast=32, beta_slow=1,
                      mscale=1.0, mscale_all_dim=1.0),
    num_nextn_predict_layers=1, dtype="float32", param_dtype="float32", moe_dispatch="ragged",
)


def tiny_config() -> ModelConfig:
    from r1jax.config import from_dict

    return from_dict(ModelConfig, TINY_V3)


def run_demo(out: str | Path) -> dict:
    out = Path(out)
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(0))
    print(f"model: DeepSeek-V3 architecture, {count_params(cfg):,} parameters "
          f"({count_params(cfg, active=True):,} active per token), {cfg.num_dense_layers} dense + "
          f"{cfg.num_moe_layers} MoE layers, MTP depth {cfg.num_nextn_predict_layers}")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 64)).astype(np.int32)
    t0 = time.perf_counter()
    result = transformer.apply(params, tokens, cfg, with_mtp=True)
    logits = np.asarray(result["logits"])
    dt = time.perf_counter() - t0
    load = np.asarray(result["moe"]["load"])
    print(f"forward: logits {list(logits.shape)}, MTP logits {list(result['mtp_logits'].shape)}, {dt:.2f}s "
          f"(with compile); expert load per MoE layer: {load.astype(int).tolist()}")
    hf_dir = out / "hf"
    r1jax.save_pretrained(hf_dir, cfg, params, overwrite=True)
    cfg2, params2 = r1jax.load_pretrained(hf_dir)
    same = np.array_equal(np.asarray(r1jax.forward(params2, tokens, cfg2)), logits)
    print(f"exported to {hf_dir} (Hugging Face format); reloaded logits identical: {same}")
    if not same:
        raise SystemExit("demo: reloaded model gives different logits")
    return {"logits_shape": logits.shape, "hf_dir": str(hf_dir)}
