"""Tiny random Hugging Face DeepSeek models for parity tests (transformers is the reference)."""

from __future__ import annotations

import numpy as np
import torch

import r1jax

V3_CONFIGS = {
    # q compression, YaRN (released mscale), interleaved rope, group-limited routing, one dense layer.
    "v3_yarn_grouped": dict(
        vocab_size=97, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
        topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
        qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=256, routed_scaling_factor=2.5,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "rope_theta": 10000.0}),
    # No q compression, plain rope in the half-split layout, no renormalisation, all layers MoE.
    "v3_qproj_plain_rope": dict(
        vocab_size=64, hidden_size=24, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=3, n_shared_experts=2, n_routed_experts=6, num_experts_per_tok=3, n_group=1,
        topk_group=1, first_k_dense_replace=0, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=128, routed_scaling_factor=1.0,
        norm_topk_prob=False, rope_interleave=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    # Attention biases, YaRN with mscale ≠ mscale_all_dim (attention factor ≠ 1), 16 experts in 8 groups.
    "v3_bias_yarn_mscale": dict(
        vocab_size=80, hidden_size=48, intermediate_size=64, moe_intermediate_size=8, num_hidden_layers=4,
        num_attention_heads=2, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=4, n_group=8,
        topk_group=3, first_k_dense_replace=2, kv_lora_rank=12, q_lora_rank=20, qk_rope_head_dim=6,
        qk_nope_head_dim=10, v_head_dim=14, max_position_embeddings=512, routed_scaling_factor=1.5,
        attention_bias=True,
        rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                         "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5,
                         "rope_theta": 5000.0}),
    # q compression with the half-split rope layout under YaRN; one group of four kept (topk_group=1),
    # 3 experts per group; rope dim > nope dim, odd v dim, 6 heads. (transformers' CPU grouped_mm
    # needs hidden_size and moe_intermediate_size to be multiples of 4.)
    "v3_one_group_half_split": dict(
        vocab_size=61, hidden_size=36, intermediate_size=44, moe_intermediate_size=20, num_hidden_layers=3,
        num_attention_heads=6, n_shared_experts=1, n_routed_experts=12, num_experts_per_tok=2, n_group=4,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=14, q_lora_rank=18, qk_rope_head_dim=10,
        qk_nope_head_dim=4, v_head_dim=7, max_position_embeddings=192, routed_scaling_factor=3.0,
        rope_interleave=False,
        rope_parameters={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 64,
                         "beta_fast": 24, "beta_slow": 1, "mscale": 0.8, "mscale_all_dim": 0.8,
                         "rope_theta": 20000.0}),
    # Dense-only (first_k_dense_replace ≥ layers), untruncated YaRN correction range.
    "v3_all_dense_untruncated": dict(
        vocab_size=50, hidden_size=40, intermediate_size=72, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=5, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=2, kv_lora_rank=10, q_lora_rank=16, qk_rope_head_dim=4,
        qk_nope_head_dim=6, v_head_dim=6, max_position_embeddings=300,
        rope_parameters={"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 40,
                         "truncate": False, "rope_theta": 10000.0}),
}

V2_CONFIGS = {
    # V2-Lite shape (scaled down): no q compression, softmax greedy top-6 of 64... here 6 of 16.
    "v2_lite_greedy": dict(
        vocab_size=90, hidden_size=32, intermediate_size=56, moe_intermediate_size=12, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=2, n_routed_experts=16, num_experts_per_tok=6, n_group=1,
        topk_group=1, topk_method="greedy", first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256,
        routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_parameters={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "rope_theta": 10000.0}),
    "v2_group_limited": dict(
        vocab_size=70, hidden_size=32, intermediate_size=40, moe_intermediate_size=8, num_hidden_layers=2,
        num_attention_heads=2, n_shared_experts=1, n_routed_experts=12, num_experts_per_tok=3, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=0, kv_lora_rank=8,
        q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=128,
        routed_scaling_factor=2.0, norm_topk_prob=False),
}


def make_hf_model(kind: str, kwargs: dict, seed: int = 0, std: float = 0.2):
    """A transformers model with random weights large enough that routing decisions are sharp, norm
    weights near 1, and (V3) a random non-zero e_score_correction_bias."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    if kind == "v3":
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs))
    else:
        model = DeepseekV2ForCausalLM(DeepseekV2Config(**kwargs))
    model.eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def to_r1jax(model, directory, **load_kwargs):
    model.save_pretrained(directory)
    return r1jax.load_pretrained(directory, **load_kwargs)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
