"""r1jax logits vs transformers DeepseekV3/V2ForCausalLM on the same random weights (fp32)."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

import r1jax
from hf_reference import V2_CONFIGS, V3_CONFIGS, hf_logits, make_hf_model, rel_err, to_r1jax

ALL_DISPATCHES = ("auto", "ragged", "blocked", "dense", "capacity")
# The dispatch strategies each config runs against transformers. test_model.py checks that they
# agree, so a later-added config checks the default (auto: dropless) only, and a config without MoE
# layers runs once (the dispatch is unused there).
DISPATCHES = {"v3_one_group_half_split": ("auto",), "v3_all_dense_untruncated": ("auto",)}
CASES = [("v3", k) for k in V3_CONFIGS] + [("v2", k) for k in V2_CONFIGS]


def _tokens(vocab, shape, seed=1):
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


@pytest.mark.parametrize("kind,name", CASES)
def test_logits_match_transformers(kind, name, tmp_path):
    kwargs = (V3_CONFIGS if kind == "v3" else V2_CONFIGS)[name]
    model = make_hf_model(kind, kwargs)
    cfg, params = to_r1jax(model, tmp_path / "hf")
    for dispatch in DISPATCHES.get(name, ALL_DISPATCHES):
        c = cfg.replace(moe_dispatch=dispatch, capacity_factor=float(cfg.n_routed_experts))
        tokens = _tokens(cfg.vocab_size, (3, 13))
        err = rel_err(r1jax.forward(params, tokens, c), hf_logits(model, tokens))
        assert err < 1e-5, (name, dispatch, err)


def test_routing_is_sharp_in_parity_models(tmp_path):
    """The parity weights must make routing matter: dropping the correction bias changes the
    chosen experts for many tokens, so a bias bug could not hide."""
    import jax.numpy as jnp

    from r1jax.model import moe

    model = make_hf_model("v3", V3_CONFIGS["v3_yarn_grouped"])
    cfg, params = to_r1jax(model, tmp_path / "hf")
    x = np.random.RandomState(0).normal(0, 1, (64, cfg.hidden_size)).astype(np.float32)
    p = {k: params["moe_layers"]["mlp"][k][0] for k in ("router", "router_bias")}
    _, ids, _ = moe.route(p, jnp.asarray(x), cfg)
    _, ids0, _ = moe.route({**p, "router_bias": jnp.zeros_like(p["router_bias"])}, jnp.asarray(x), cfg)
    changed = np.mean(np.any(np.sort(np.asarray(ids), -1) != np.sort(np.asarray(ids0), -1), -1))
    assert changed > 0.2, changed


def test_long_positions_match_transformers(tmp_path):
    """YaRN frequencies past the original context: positions up to 200 with original_max 64."""
    model = make_hf_model("v3", V3_CONFIGS["v3_yarn_grouped"], seed=3)
    cfg, params = to_r1jax(model, tmp_path / "hf")
    tokens = _tokens(cfg.vocab_size, (1, 200), seed=4)
    assert rel_err(r1jax.forward(params, tokens, cfg), hf_logits(model, tokens)) < 1e-5


def test_hf_round_trip_is_tensor_identical(tmp_path):
    model = make_hf_model("v3", V3_CONFIGS["v3_bias_yarn_mscale"])
    model.save_pretrained(tmp_path / "a")
    cfg, params = r1jax.load_pretrained(tmp_path / "a")
    assert cfg.moe_dispatch == "auto"  # a user loading HF weights gets the per-backend choice
    r1jax.save_pretrained(tmp_path / "b", cfg, params)
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    cfg_a = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    for key, value in cfg_a.items():
        if key != "num_nextn_predict_layers":  # HF wrote no MTP weights, so r1jax loads none
            assert cfg_b[key] == value, key


def test_saved_directory_loads_in_transformers(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    cfg = r1jax.ModelConfig.from_hf_config({**V3_CONFIGS["v3_yarn_grouped"], "model_type": "deepseek_v3",
                                            "num_nextn_predict_layers": 0})
    from r1jax.model.params import init_params
    import jax

    params = init_params(cfg, jax.random.key(0))
    r1jax.save_pretrained(tmp_path / "out", cfg, params, max_shard_size=20_000)  # forces several shards
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    model = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = _tokens(cfg.vocab_size, (2, 9))
    assert rel_err(r1jax.forward(params, tokens, cfg), hf_logits(model, tokens)) < 1e-5
    cfg2, params2 = r1jax.load_pretrained(tmp_path / "out")
    assert cfg2.replace(hf_extra=cfg.hf_extra) == cfg  # plus architectures and dtype
    jax.tree.map(np.testing.assert_array_equal, params, params2)


def test_bf16_checkpoint_loads_as_bf16(tmp_path):
    import torch

    model = make_hf_model("v3", V3_CONFIGS["v3_qproj_plain_rope"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    cfg, params = r1jax.load_pretrained(tmp_path / "bf16")
    assert cfg.param_dtype == "bfloat16" and params["embed"].dtype.name == "bfloat16"
    assert params["moe_layers"]["mlp"]["router_bias"].dtype.name == "float32"
    cfg32, params32 = r1jax.load_pretrained(tmp_path / "bf16", dtype="float32")
    assert params32["embed"].dtype.name == "float32"
    tokens = _tokens(cfg.vocab_size, (2, 7))
    # Same bf16 weights, both computing in fp32. (A fresh load: `.to(bfloat16)` also rounded the
    # in-memory rope inv_freq buffer, which `.float()` would not undo.)
    from transformers import DeepseekV3ForCausalLM

    ref = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    assert rel_err(r1jax.forward(params32, tokens, cfg32), hf_logits(ref, tokens)) < 1e-5
