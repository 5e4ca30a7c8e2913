"""ModelConfig: HF config.json round trips, YAML loading, overrides, and named errors."""

import glob
import json
from pathlib import Path

import pytest

import r1jax
from r1jax import config
from r1jax.config import ModelConfig
from r1jax.errors import ConfigError

# The released DeepSeek-V3 / R1 config.json (auto_map trimmed).
V3_671B_JSON = json.loads("""{
  "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
  "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
  "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
  "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
  "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
  "n_shared_experts": 1, "norm_topk_prob": true, "num_attention_heads": 128, "num_experts_per_tok": 8,
  "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
  "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                          "weight_block_size": [128, 128]},
  "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": true,
  "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
  "transformers_version": "4.46.3", "use_cache": true, "v_head_dim": 128, "vocab_size": 129280}""")

V2_LITE_JSON = json.loads("""{
  "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
  "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
  "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
  "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
  "n_shared_experts": 2, "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6,
  "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": null,
  "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
  "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                   "original_max_position_embeddings": 4096, "type": "yarn"},
  "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": true,
  "tie_word_embeddings": false, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
  "transformers_version": "4.33.1", "use_cache": true, "v_head_dim": 128, "vocab_size": 102400}""")


@pytest.mark.parametrize("raw", [V3_671B_JSON, V2_LITE_JSON], ids=["v3_671b", "v2_lite"])
def test_real_config_json_round_trips(raw):
    cfg = ModelConfig.from_hf_config(raw)
    out = cfg.to_hf_config()
    for key, value in raw.items():
        assert out[key] == value, key
    assert ModelConfig.from_hf_config(out) == cfg
    assert cfg.hf_extra["quantization_config"]["weight_block_size"] == (128, 128) if "quantization_config" in raw else True


def test_671b_fields_and_sizes():
    cfg = ModelConfig.from_hf_config(V3_671B_JSON)
    assert (cfg.num_dense_layers, cfg.num_moe_layers, cfg.qk_head_dim) == (3, 58, 192)
    assert cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 40
    from r1jax.model.params import count_params

    # DeepSeek-V3 report: 671B total (+14B MTP module, whose embedding and head are shared), 37B active.
    main = count_params(cfg.replace(num_nextn_predict_layers=0))
    assert 670e9 < main < 672e9, main
    assert 36.5e9 < count_params(cfg.replace(num_nextn_predict_layers=0), active=True) < 38e9


def test_671b_yaml_matches_released_config_json():
    yaml_cfg = config.load(ModelConfig, "configs/model/deepseek_v3_671b.yaml")
    hf_cfg = ModelConfig.from_hf_config(V3_671B_JSON)
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "n_routed_experts", "kv_lora_rank",
                  "q_lora_rank", "rope_scaling", "rope_theta", "n_group", "topk_group", "routed_scaling_factor",
                  "first_k_dense_replace", "num_nextn_predict_layers", "moe_intermediate_size"):
        assert getattr(yaml_cfg, field) == getattr(hf_cfg, field), field


def test_rope_parameters_style_round_trips_through_transformers():
    from transformers import DeepseekV3Config

    hf = DeepseekV3Config(num_hidden_layers=2, hidden_size=32, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500.0})
    raw = hf.to_dict()
    cfg = ModelConfig.from_hf_config(raw)
    assert cfg.rope_theta == 500.0 and cfg.rope_type == "yarn" and cfg.hf_rope_key == "rope_parameters"
    back = DeepseekV3Config(**cfg.to_hf_config())
    assert back.rope_parameters == hf.rope_parameters
    assert back.n_routed_experts == hf.n_routed_experts


def test_every_yaml_in_configs_model_loads():
    files = sorted(glob.glob("configs/model/*.yaml"))
    assert len(files) >= 4
    for f in files:  # DeepSeek models and dense students (model_type qwen2/llama)
        assert isinstance(config.load_model(f), (ModelConfig, config.DenseConfig))


def test_demo_default_equals_tiny_yaml():
    from r1jax.demo import tiny_config

    assert config.load(ModelConfig, "configs/model/tiny_v3.yaml") == tiny_config()


def test_overrides_apply_and_are_typed():
    cfg = config.load(ModelConfig, "configs/model/tiny_v3.yaml",
                      ["num_hidden_layers=5", "rope_scaling.factor=8", "moe_dispatch=dense", "q_lora_rank=null"])
    assert cfg.num_hidden_layers == 5 and cfg.rope_scaling["factor"] == 8
    assert cfg.moe_dispatch == "dense" and cfg.q_lora_rank is None


@pytest.mark.parametrize("overrides,match", [
    (["num_hiden_layers=5"], r"num_hiden_layers: unknown key"),
    (["hidden_size=big"], r"hidden_size: expected int"),
    (["norm_topk_prob=3"], r"norm_topk_prob: expected bool"),
    (["n_group=3"], r"n_group: n_routed_experts \(8\) must be divisible"),
    (["topk_group=5"], r"topk_group: must be in \[1, n_group=4\]"),
    (["num_experts_per_tok=9"], r"num_experts_per_tok: must be in"),
    (["moe_dispatch=magic"], r"moe_dispatch: unknown strategy 'magic'; valid: auto, blocked, capacity, capacity_ep, dense, ragged, ragged_ep"),
    (["remat_policy=some"], r"remat_policy: unknown policy"),
    (["rope_scaling.type=dynamic"], r"rope_scaling.type: only 'yarn'"),
    (["rope_scaling.factor=-1"], r"rope_scaling.factor: must be a positive number"),
    (["qk_rope_head_dim=7"], r"qk_rope_head_dim: must be even"),
    (["scoring_func=softmax"], r"scoring_func: model_type deepseek_v3 routes with a sigmoid gate"),
    (["dtype=float64"], r"dtype: must be one of"),
    (["nonsense"], r"expected key.path=value"),
])
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config.load(ModelConfig, "configs/model/tiny_v3.yaml", overrides)


def test_hf_config_errors_name_the_field():
    bad = dict(V3_671B_JSON)
    del bad["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size: required field missing"):
        ModelConfig.from_hf_config(bad)
    with pytest.raises(ConfigError, match="model_type: expected one of"):
        ModelConfig.from_hf_config({**V3_671B_JSON, "model_type": "llama"})
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig.from_hf_config({**V3_671B_JSON, "topk_group": 9})
    with pytest.raises(ConfigError, match="num_attention_heads: expected int"):
        ModelConfig.from_hf_config({**V3_671B_JSON, "num_attention_heads": "128"})
    with pytest.raises(ConfigError, match="rope_scaling: expected a mapping"):
        ModelConfig.from_hf_config({**V3_671B_JSON, "rope_scaling": 40})


def test_config_is_hashable_and_frozen():
    cfg = ModelConfig.from_hf_config(V3_671B_JSON)
    assert hash(cfg) == hash(ModelConfig.from_hf_config(dict(V3_671B_JSON)))
    with pytest.raises(Exception):
        cfg.hidden_size = 1


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(ModelConfig, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(ModelConfig, tmp_path / "bad.yaml")


def test_include_then_change_some_keys(tmp_path):
    """`model: {include: file, key: value}` equals the file loaded with those keys as overrides, nested
    mappings merged key by key; a later command-line override still wins."""
    from r1jax.config import TrainConfig

    base = tmp_path / "run.yaml"
    base.write_text(f"stage: pretrain\nmodel: {{include: {Path('configs/model/tiny_v3.yaml').resolve()}, "
                    f"moe_dispatch: capacity, rope_scaling: {{factor: 8}}}}\n")
    got = config.load(TrainConfig, base, ["model.num_hidden_layers=4"]).model
    want = config.load(ModelConfig, "configs/model/tiny_v3.yaml",
                       ["moe_dispatch=capacity", "rope_scaling.factor=8", "num_hidden_layers=4"])
    assert got == want
    assert got.rope_scaling["original_max_position_embeddings"] == want.rope_scaling["original_max_position_embeddings"]
    base.write_text("stage: pretrain\nmodel: {include: nope.yaml, moe_dispatch: capacity}\n")
    with pytest.raises(ConfigError, match=r"model.include: included file 'nope.yaml' not found"):
        config.load(TrainConfig, base)
    base.write_text("stage: pretrain\nmodel: {include: 3}\n")
    with pytest.raises(ConfigError, match=r"model.include: expected a .yaml file name, got 3"):
        config.load(TrainConfig, base)


def test_671b_pod_configs_load():
    from r1jax.config import TrainConfig

    cfg = config.load(TrainConfig, "configs/train/deepseek_v3_671b_v5p.yaml")
    assert cfg.model.num_hidden_layers == 61 and cfg.model.num_nextn_predict_layers == 1
    assert cfg.model.moe_dispatch == "ragged_ep" and cfg.data.seq_len == 4096
    assert cfg.model.ragged_buffer_factor is None and cfg.loss_chunk == 1024  # dropless, as BUILD.md planned it
    assert cfg.model == config.load(ModelConfig, "configs/model/deepseek_v3_671b.yaml",
                                    ["moe_dispatch=ragged_ep", "attention_impl=chunked"])
    grpo = config.load(config.GRPOConfig, "configs/train/deepseek_v3_671b_grpo_v5p.yaml")
    assert grpo.model.num_hidden_layers == 61 and grpo.beta == 0.001 and grpo.num_generations == 16
