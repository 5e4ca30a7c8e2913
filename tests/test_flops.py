"""Training FLOPs per token (for MFU) against a hand count written here from the config fields.

Convention (PaLM appendix B, Chowdhery et al. 2022): a training step costs 6 FLOPs per weight a token
is multiplied by (2 forward, 4 backward) plus, per attention layer, 6·H·(K+V)·T for the scores QKᵀ
and the weighted values AV over the T positions of a row (no causal halving). The embedding lookup is
not a matmul, so the input embedding is left out, unless it is tied to the output head (then the
head's matmul uses it). Only k of the E routed experts count; the MTP modules (V3 §2.2) run a whole
transformer block each, so their attention counts like a main layer's."""

import pytest

from r1jax import config
from r1jax.config import DenseConfig, ModelConfig
from r1jax.train.flops import train_flops_per_token


def v3_hand_count(c: ModelConfig, T: int) -> float:
    D, V, H = c.hidden_size, c.vocab_size, c.num_attention_heads
    N, R, Vh, Lkv, Q = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.q_lora_rank
    attn = (D * Q + Q + Q * H * (N + R)  # q_a, its norm, q_b
            + D * (Lkv + R) + Lkv  # kv_a (latent + shared rope key), its norm
            + Lkv * H * (N + Vh)  # kv_b
            + H * Vh * D)  # o
    norms = 2 * D  # input and post-attention RMSNorm
    dense_ffn = 3 * D * c.intermediate_size
    E, k, Fm = c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size
    moe_ffn = D * E + E + k * 3 * D * Fm + 3 * D * Fm * c.n_shared_experts  # router, its bias, k experts, shared
    n_dense = c.first_k_dense_replace
    n_moe = c.num_hidden_layers - n_dense
    M = c.num_nextn_predict_layers
    mtp_block = attn + norms + (moe_ffn if n_moe > 0 else dense_ffn)
    mtp = M * (mtp_block + 2 * D + 2 * D * D + D + D * V)  # enorm, hnorm, eh_proj, head norm, head
    weights = n_dense * (attn + norms + dense_ffn) + n_moe * (attn + norms + moe_ffn) + D + D * V + mtp
    attention_layers = c.num_hidden_layers + M
    return 6.0 * weights + 6.0 * attention_layers * H * ((N + R) + Vh) * T


def dense_hand_count(c: DenseConfig, T: int) -> float:
    D, V, H, G, F = c.hidden_size, c.vocab_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    K = D // H  # head_dim null
    attn = D * H * K + 2 * D * G * K + H * K * D + (H * K + 2 * G * K)  # q, k, v, o, q/k/v biases (qwen2)
    layer = attn + 2 * D + 3 * D * F
    head = D * V  # tied: the embedding matrix is the head's weight
    return 6.0 * (c.num_hidden_layers * layer + D + head) + 6.0 * c.num_hidden_layers * H * (K + K) * T


def test_v3_flops_match_the_hand_count():
    c = config.load(ModelConfig, "configs/model/tiny_v3.yaml")
    assert c.q_lora_rank and not c.tie_word_embeddings and c.num_nextn_predict_layers == 1  # what the count assumes
    for T in (64, 1024):
        assert train_flops_per_token(c, T) == pytest.approx(v3_hand_count(c, T), rel=1e-12)
    # The numbers for T=64, so a wrong hand count cannot agree by construction:
    # weights 238,168 (both 64×512 heads included) → 1,429,008; attention 4 layers·6·4·(32+16)·64 = 294,912.
    assert v3_hand_count(c, 64) == 1_429_008 + 294_912


def test_dense_flops_match_the_hand_count():
    c = config.load(DenseConfig, "configs/model/tiny_qwen2_student.yaml")
    assert c.tie_word_embeddings and c.attention_bias and c.head_dim is None
    for T in (64, 1024):
        assert train_flops_per_token(c, T) == pytest.approx(dense_hand_count(c, T), rel=1e-12)
    # T=64 by hand: weights 3·43,264 + 64 + 32,768 (tied head) = 162,624 → 975,744;
    # attention 3·6·4·32·64 = 147,456.
    assert dense_hand_count(c, 64) == 975_744 + 147_456
