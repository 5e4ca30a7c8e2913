"""Dense students (the R1-Distill bases: Qwen2, Llama) against transformers' Qwen2ForCausalLM and
LlamaForCausalLM on the same random weights (fp32): logits, the HF tensor round trip, greedy
generation with the GQA KV cache; and packing, gradients, the training step, configs.

Conversion goes through `r1jax.convert.hf` (the table-driven name map) with an in-memory source and
writer defined here, so these tests do not depend on the safetensors and directory layers.
"""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import r1jax
from hf_reference import rel_err
from r1jax import config
from r1jax.config import DenseConfig, ModelConfig, OptimizerConfig, config_from_hf
from r1jax.convert import hf
from r1jax.errors import ConfigError
from r1jax.model import dense, forward_jit, rope
from r1jax.model import params as P
from r1jax import sample as sample_command
from r1jax.infer import sampler
from r1jax.model import kv_cache
from r1jax.model import sharding
from r1jax.rl import grpo
from r1jax.train import losses
from r1jax.train import optimizer as opt_lib
from r1jax.train.step import StepOptions, init_state, make_train_step

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
CONFIGS = {
    # GQA (6 query heads over 2 kv heads), q/k/v biases, untied head.
    "qwen2_gqa": ("qwen2", dict(BASE, rope_theta=10000.0)),
    # Qwen2.5-Math-1.5B's features: tied embeddings, θ = 1e6; here 4 query heads share 1 kv head.
    "qwen2_tied": ("qwen2", dict(BASE, hidden_size=32, num_attention_heads=4, num_key_value_heads=1,
                                 tie_word_embeddings=True, rope_theta=1e6)),
    # Qwen2.5's long-context YaRN (attention factor folded into cos/sin, plain softmax scale).
    "qwen2_yarn": ("qwen2", dict(BASE, max_position_embeddings=256, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0})),
    # Llama 3.1: llama3 RoPE scaling (all three frequency bands occur at head dim 16), head_dim ≠ D/H.
    "llama3": ("llama", dict(BASE, head_dim=16, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0})),
    # Llama with attention_bias (q/k/v and o), plain multi-head attention.
    "llama_bias_mha": ("llama", dict(BASE, attention_bias=True, num_key_value_heads=6)),
}
PROMPTS = [[5, 17, 3, 40, 22], [9, 2, 61], [33, 8, 71, 4, 50, 12, 27]]  # ragged, all in bucket 8
M = 8


# --------------------------------------------------------------------------- HF models and conversion


def make_hf_model(kind: str, kwargs: dict, seed: int = 0, std: float = 0.2):
    """A transformers model with random weights (std 0.2: attention is far from uniform) and norm
    weights near 1."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cls, cfg_cls = (Qwen2ForCausalLM, Qwen2Config) if kind == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    model = cls(cfg_cls(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, std)
    return model


def hf_tensors(model) -> dict[str, np.ndarray]:
    """The state dict as save_pretrained writes it: float32, a tied head left out."""
    out = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight")
    return out


class StateDictSource:
    """An in-memory conversion source: the interface convert/hf.py reads (names, shape, value_dtype,
    read_rows)."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors, self.names = tensors, set(tensors)

    def shape(self, name):
        return self.tensors[name].shape

    def value_dtype(self, name):
        return "F32"

    def read_rows(self, name, start, stop):
        t = self.tensors[name]
        return t if t.ndim == 0 else t[start:stop]


class CollectingWriter:
    """An in-memory writer for convert/hf.write_leaf: blocks of HF rows into preallocated arrays."""

    def __init__(self, plan):
        self.out = {p.name: np.empty(p.shape, np.float32) for p in plan}

    def write(self, name, block, row):
        t = self.out[name]
        if t.ndim == 0:
            t[...] = block
        else:
            t[row:row + len(block)] = block


def hf_to_params(cfg, tensors: dict) -> dict:
    source = StateDictSource(tensors)
    hf.check_source(cfg, source, "state_dict")
    params = {}
    for e in hf.entries(cfg):
        leaf = hf.fill_slab(e, source, hf.full_slab(e), P.param_dtype(e.spec, cfg))
        hf.set_leaf(params, e.keys, jnp.asarray(leaf))
    return params


def params_to_hf(cfg, params) -> dict[str, np.ndarray]:
    hf.check_params(cfg, params)
    writer = CollectingWriter(hf.tensor_plan(cfg))
    for e in hf.entries(cfg):
        hf.write_leaf(writer, e, cfg, hf.full_slab(e), np.asarray(hf.get_leaf(params, e.keys)))
    return writer.out


def to_r1jax(model):
    cfg = config_from_hf(model.config.to_dict())
    return cfg, hf_to_params(cfg, hf_tensors(model))


def hf_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _tokens(vocab, shape, seed=1):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.fixture(scope="module")
def models():
    """Every CONFIGS entry as (HF model, r1jax config, params), built once per module."""
    out = {}
    for name, (kind, kwargs) in CONFIGS.items():
        model = make_hf_model(kind, kwargs)
        cfg, params = to_r1jax(model)
        out[name] = SimpleNamespace(model=model, cfg=cfg, params=params)
    return out


def tiny_student(**overrides) -> DenseConfig:
    return config.load_model("configs/model/tiny_qwen2_student.yaml", [f"{k}={v}" for k, v in overrides.items()])


# --------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, models):
    m = models[name]
    assert isinstance(m.cfg, DenseConfig) and m.cfg.model_type == CONFIGS[name][0]
    assert P.count_params(m.cfg) == sum(p.numel() for p in m.model.parameters())
    tokens = _tokens(m.cfg.vocab_size, (2, 96))  # positions past the scaled ropes' original 64
    err = rel_err(forward_jit(m.params, tokens, m.cfg), hf_logits(m.model, tokens))
    assert err < 1e-5, (name, err)


def test_rope_scaling_is_what_makes_llama3_match(models):
    """The llama3 and YaRN frequencies matter at these positions: plain RoPE would be far off."""
    tokens = _tokens(97, (2, 96))
    for name in ("llama3", "qwen2_yarn"):
        m = models[name]
        plain = m.cfg.replace(rope_scaling=None)
        assert rel_err(forward_jit(m.params, tokens, plain), hf_logits(m.model, tokens)) > 1e-3, name


@pytest.mark.parametrize("name", ["llama3", "qwen2_yarn"])
def test_inverse_frequencies_equal_transformers(name, models):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    m = models[name]
    ref, factor = ROPE_INIT_FUNCTIONS[m.cfg.rope_type](m.model.config, None)
    inv, attention_factor = rope.inverse_frequencies(m.cfg)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=2e-7)
    assert attention_factor == pytest.approx(factor, rel=1e-12)


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hf_round_trip_is_tensor_identical(name, models):
    m = models[name]
    original = hf_tensors(m.model)
    back = params_to_hf(m.cfg, hf_to_params(m.cfg, original))
    assert sorted(back) == sorted(original)
    for k, v in original.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k
    assert [p.name for p in hf.tensor_plan(m.cfg)][0] == "model.embed_tokens.weight"


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_r1jax_params_and_config_load_into_transformers(kind):
    """The other direction: random r1jax params and to_hf_config() build the same model in transformers."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = tiny_student() if kind == "qwen2" else tiny_student(
        model_type="llama", attention_bias=True, tie_word_embeddings=False, head_dim=8,
        rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0)
    cfg = cfg.replace(initializer_range=0.2)
    params = P.init_params(cfg, jax.random.key(0))
    params["final_norm"] = params["final_norm"] + 0.5  # ones-initialized norms would hide a swap
    cls, cfg_cls = (Qwen2ForCausalLM, Qwen2Config) if kind == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    model = cls(cfg_cls(**cfg.to_hf_config())).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in params_to_hf(cfg, params).items()},
                                                strict=False)
    assert unexpected == [] and set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    tokens = _tokens(cfg.vocab_size, (2, 24))
    assert rel_err(forward_jit(params, tokens, cfg), hf_logits(model, tokens)) < 1e-5


# --------------------------------------------------------------------------- packing, gradients, training


def test_packed_rows_equal_separate_sequences(models):
    m = models["qwen2_gqa"]
    a, b = _tokens(97, (1, 10), seed=2), _tokens(97, (1, 14), seed=3)
    packed = np.concatenate([a, b, np.zeros((1, 8), np.int32)], axis=1)
    segment_ids = np.array([[1] * 10 + [2] * 14 + [0] * 8], np.int32)
    positions = np.array([list(range(10)) + list(range(14)) + [0] * 8], np.int32)
    out = np.asarray(dense.apply(m.params, jnp.asarray(packed), m.cfg, jnp.asarray(positions),
                                 jnp.asarray(segment_ids))["logits"])
    assert rel_err(out[0, :10], forward_jit(m.params, a, m.cfg)[0]) < 1e-6
    assert rel_err(out[0, 10:24], forward_jit(m.params, b, m.cfg)[0]) < 1e-6


def _packed_batch(vocab, seed=0):
    rng = np.random.RandomState(seed)
    tokens = rng.randint(3, vocab, (2, 17)).astype(np.int32)
    seg = np.array([[1] * 9 + [2] * 8, [1] * 12 + [0] * 5], np.int32)
    pos = np.array([list(range(9)) + list(range(8)), list(range(12)) + [0] * 5], np.int32)
    nxt = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg[:, :-1],
            "positions": pos[:, :-1], "loss_mask": nxt.astype(np.float32)}


def test_loss_gradients_are_finite_and_reach_every_parameter():
    cfg = tiny_student(initializer_range=0.2)
    params = P.init_params(cfg, jax.random.key(1))
    batch = jax.tree.map(jnp.asarray, _packed_batch(cfg.vocab_size))

    @functools.partial(jax.jit, static_argnums=1)
    def loss_and_grads(p, c):
        return jax.value_and_grad(losses.lm_loss, has_aux=True)(p, batch, c, mtp_weight=0.3, balance_alpha=1e-4)

    (total, aux), grads = loss_and_grads(params, cfg)
    assert np.isfinite(float(total)) and float(total) == pytest.approx(float(aux["ce"]))
    assert set(aux) == {"ce", "tokens", "loss"}  # no MTP, no MoE terms for a dense student
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
    (_, _), remat_grads = loss_and_grads(params, cfg.replace(remat_policy="full"))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(r, g, rtol=1e-5, atol=1e-7)


def test_one_train_step_updates_the_student():
    cfg = tiny_student()
    tx = opt_lib.build(OptimizerConfig(learning_rate=1e-2, warmup_steps=0), total_steps=10)
    params = P.init_params(cfg, jax.random.key(2))
    before = jax.tree.map(np.asarray, params)
    step = make_train_step(cfg, tx, StepOptions())
    state, metrics = step(init_state(params, tx, 0), jax.tree.map(jnp.asarray, _packed_batch(cfg.vocab_size)))
    assert bool(metrics["finite"]) and "moe/dropped" not in metrics
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
    assert all(changed)
    # Biases and norms (2-D once stacked over layers) are not weight-decayed.
    mask = opt_lib.decay_mask(params)
    assert not mask["layers"]["attn"]["q_bias"] and not mask["layers"]["input_norm"] and mask["layers"]["attn"]["q"]


def test_student_on_a_tensor_parallel_mesh_equals_one_device():
    """Sharded by the same rules as DeepSeek: 4 query heads split over tensor=4; the 2 kv heads do not
    divide it and stay replicated (the rules' fallback), and the loss and gradients do not change."""
    from r1jax.config import MeshConfig
    from r1jax.parallel import mesh as mesh_lib
    from r1jax.parallel import rules

    cfg = tiny_student(initializer_range=0.2)
    params = P.init_params(cfg, jax.random.key(3))
    batch = jax.tree.map(jnp.asarray, _packed_batch(cfg.vocab_size))
    f = jax.jit(lambda p, b: jax.value_and_grad(losses.lm_loss, has_aux=True)(
        p, b, cfg, mtp_weight=0.0, balance_alpha=0.0))
    (one, _), g_one = jax.device_get(f(params, batch))
    mesh_cfg = MeshConfig(data=1, fsdp=2, tensor=4)
    mesh = mesh_lib.build_mesh(mesh_cfg)
    assert any("['attn']['k']" in r and "tensor=4" in r for r in sharding.replicated_dims(cfg, mesh, mesh_cfg))
    sharded = jax.device_put(params, sharding.param_shardings(cfg, mesh, mesh_cfg))
    assert sharded["layers"]["attn"]["q"].sharding.spec[2] == "tensor"
    with rules.sharding_context(mesh, mesh_cfg):
        (many, _), g_many = jax.device_get(f(sharded, batch))
    assert float(many) == pytest.approx(float(one), rel=1e-6)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(g_many)[0], jax.tree.leaves(g_one)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()), err_msg=jax.tree_util.keystr(path))


def test_grpo_token_logprobs_use_the_dense_model(models):
    m = models["qwen2_tied"]
    tokens = jnp.asarray(_tokens(97, (2, 12), seed=5))
    pos = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
    lp = grpo.token_logprobs(m.params, tokens, pos, jnp.ones((2, 12), jnp.int32), m.cfg, temperature=0.7, chunk=5)
    logits = np.asarray(forward_jit(m.params, tokens, m.cfg), np.float64)[:, :-1] / 0.7
    logits -= logits.max(-1, keepdims=True)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp, np.take_along_axis(ref, np.asarray(tokens)[:, 1:, None], -1)[..., 0], atol=1e-5)


# --------------------------------------------------------------------------- the KV-cache sampler


@pytest.mark.parametrize("name", ["qwen2_gqa", "llama3"])
def test_greedy_generate_matches_transformers(name, models):
    m = models[name]
    out = r1jax.generate(m.params, m.cfg, PROMPTS, max_new_tokens=M)
    assert out.dtype == np.int32 and out.shape == (len(PROMPTS), M)
    for b, prompt in enumerate(PROMPTS):  # HF per row, unpadded
        with torch.no_grad():
            ref = m.model.generate(torch.tensor([prompt]), max_new_tokens=M, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
        np.testing.assert_array_equal(out[b], ref[0, len(prompt):].numpy(), err_msg=f"row {b}")


def test_gqa_cache_logits_equal_full_recomputation(models):
    m = models["qwen2_gqa"]
    out = sampler.sample(m.params, m.cfg, PROMPTS, max_new_tokens=M, temperature=0.0, return_logits=True)
    seqs = [list(p) + list(t) for p, t in zip(PROMPTS, out.tokens)]
    width = max(map(len, seqs))
    full = np.asarray(forward_jit(m.params, np.array([s + [0] * (width - len(s)) for s in seqs], np.int32), m.cfg))
    for b, p in enumerate(PROMPTS):
        ref = full[b, len(p) - 1: len(p) - 1 + M]
        assert rel_err(out.logits[b], ref) < 1e-5, b
        np.testing.assert_array_equal(out.tokens[b], ref.argmax(-1))


def test_gqa_cache_size_and_modes(models):
    cfg = models["qwen2_gqa"].cfg
    assert kv_cache.resolve_cache(cfg, None) == "gqa"
    assert kv_cache.cache_bytes_per_token(cfg) == cfg.num_hidden_layers * 2 * 2 * (48 // 6) * 4  # k and v, G=2
    before = sampler.TRACE_COUNT["generate"]
    with pytest.raises(ConfigError, match=r"cache: unknown mode 'latent'.*valid: gqa"):
        sampler.sample(models["qwen2_gqa"].params, cfg, PROMPTS, max_new_tokens=M, cache="latent")
    assert sampler.TRACE_COUNT["generate"] == before


# --------------------------------------------------------------------------- configs

# A hub-style config.json (transformers 4.x spelling: top-level rope_theta, rope_scaling, eos list).
LLAMA31_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
}
QWEN_MATH_JSON = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 4096, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.37.0", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_config_round_trips_exactly(name, models):
    d = models[name].model.config.to_dict()
    cfg = config_from_hf(d)
    assert cfg.hf_rope_key == "rope_parameters" and cfg.to_hf_config() == d
    assert DenseConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_hub_style_configs_round_trip_and_match_the_yaml_files():
    llama = config_from_hf(LLAMA31_JSON)
    out = llama.to_hf_config()  # every key read comes back; absent token ids come back as null
    assert {k: out[k] for k in LLAMA31_JSON} == LLAMA31_JSON and set(out) - set(LLAMA31_JSON) == {"pad_token_id"}
    assert llama.hf_rope_key == "rope_scaling"
    assert llama.rope_type == "llama3" and llama.eos_token_id is None and llama.kv_groups == 4
    assert sample_command._default_stops(llama) == (128001, [128008, 128009])  # every listed eos stops
    qwen = config_from_hf(QWEN_MATH_JSON)
    out = qwen.to_hf_config()
    assert {k: out[k] for k in QWEN_MATH_JSON} == QWEN_MATH_JSON
    assert set(out) - set(QWEN_MATH_JSON) == {"pad_token_id", "rope_scaling"}  # both null
    assert qwen.attention_bias and qwen.attn_head_dim == 128
    for cfg, yaml in ((qwen, "qwen2_5_math_1_5b"), (llama, "llama3_1_8b")):
        from_yaml = config.load_model(f"configs/model/{yaml}.yaml")
        arch = lambda c: {k: v for k, v in config.to_dict(c).items()  # noqa: E731
                          if k not in ("hf_extra", "hf_rope_key", "dtype", "param_dtype", "remat_policy",
                                       "eos_token_id", "head_dim")}
        assert arch(from_yaml) == arch(cfg) and from_yaml.attn_head_dim == cfg.attn_head_dim, yaml
    assert P.count_params(qwen) == 1_543_714_304 and P.count_params(llama) == 8_030_261_248


def test_absent_keys_take_the_transformers_class_defaults():
    minimal = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    qwen = config_from_hf(dict(minimal, model_type="qwen2"))
    llama = config_from_hf(dict(minimal, model_type="llama"))
    assert qwen.attention_bias and not llama.attention_bias and qwen.num_key_value_heads == 4
    assert not qwen.tie_word_embeddings and not llama.tie_word_embeddings
    assert (qwen.max_position_embeddings, llama.max_position_embeddings) == (32768, 2048)
    assert (llama.bos_token_id, llama.eos_token_id, qwen.eos_token_id) == (1, 2, None)
    assert "attention_bias" not in qwen.to_hf_config() and "head_dim" not in qwen.to_hf_config()
    assert isinstance(config_from_hf({**minimal, "model_type": "deepseek_v3", "kv_lora_rank": 8,
                                      "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 4,
                                      "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 2,
                                      "topk_group": 1}), ModelConfig)


def test_tiny_student_yaml_fits_the_builtin_tokenizer():
    from r1jax.data.tokenizer import builtin_tokenizer

    cfg = tiny_student()
    tok = builtin_tokenizer()
    assert isinstance(cfg, DenseConfig) and tok.vocab_size <= cfg.vocab_size <= 512
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.tie_word_embeddings
    assert isinstance(config.load_model("configs/model/tiny_v3.yaml"), ModelConfig)
    assert tiny_student(num_key_value_heads=4).kv_groups == 1


@pytest.mark.parametrize("overrides,match", [
    (["num_key_value_heads=3"], r"num_key_value_heads: must divide num_attention_heads \(4\)"),
    (["head_dim=7"], r"head_dim: must be even"),
    (["hidden_size=66"], r"head_dim: null derives hidden_size // num_attention_heads, but 66"),
    (["num_attention_heads=0"], r"num_attention_heads: must be positive"),
    (["rope_scaling.rope_type=dynamic", "rope_scaling.factor=2"], r"rope_scaling.rope_type: supported: default, llama3"),
    (["rope_scaling.rope_type=llama3", "rope_scaling.factor=8", "rope_scaling.high_freq_factor=4",
      "rope_scaling.original_max_position_embeddings=64"], r"rope_scaling.low_freq_factor: must be a positive number"),
    (["rope_scaling.rope_type=llama3", "rope_scaling.factor=8", "rope_scaling.low_freq_factor=4",
      "rope_scaling.high_freq_factor=1", "rope_scaling.original_max_position_embeddings=64"],
     r"rope_scaling.high_freq_factor: must exceed low_freq_factor"),
    (["rope_scaling.rope_type=llama3", "rope_scaling.factor=8", "rope_scaling.low_freq_factor=1",
      "rope_scaling.high_freq_factor=4"], r"rope_scaling.original_max_position_embeddings: must be a positive int"),
    (["rope_scaling.rope_type=yarn", "rope_scaling.factor=-2"], r"rope_scaling.factor: must be a positive number"),
    (["hf_extra.use_sliding_window=true"], r"use_sliding_window: sliding-window attention is not supported"),
    (["hf_extra.layer_types=[full_attention,sliding_attention,full_attention]"], r"layer_types: only full_attention"),
    (["hf_extra.mlp_bias=true"], r"mlp_bias: MLP biases are not supported"),
    (["attention_bias=false"], r"attention_bias: qwen2 always has q/k/v biases"),
    (["eos_token_id=600"], r"eos_token_id: must be null or in \[0, vocab_size=512\)"),
    (["remat_policy=some"], r"remat_policy: unknown policy 'some'"),
    (["moe_dispatch=dense"], r"moe_dispatch: unknown key for DenseConfig"),
    (["hidden_act=gelu"], r"hidden_act: must be one of \['silu'\]"),
    (["model_type=mistral"], r"model_type: expected one of \['deepseek_v3', 'deepseek_v2', 'qwen2', 'llama'\]"),
])
def test_bad_student_configs_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config.load_model("configs/model/tiny_qwen2_student.yaml", overrides)


@pytest.mark.parametrize("d,match", [
    (dict(model_type="mistral"), r"model_type: expected one of \['deepseek_v3', 'deepseek_v2', 'qwen2', 'llama'\]"),
    (dict(QWEN_MATH_JSON, intermediate_size=None), r"intermediate_size: required field missing"),
    (dict(QWEN_MATH_JSON, rope_scaling="yarn"), r"rope_scaling: expected a mapping or null"),
    (dict(LLAMA31_JSON, num_key_value_heads=5), r"num_key_value_heads: must divide"),
    (dict(QWEN_MATH_JSON, use_sliding_window=True), r"use_sliding_window"),
])
def test_bad_hf_configs_name_the_field(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_hf(d)
