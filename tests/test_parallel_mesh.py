"""Mesh configs, logical-axis rules and multi-host settings: sizes, named errors before any compile,
rules that cover the param table, divisibility fallbacks, and the launch environment."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from r1jax import config
from r1jax.config import DEFAULT_RULES, MeshConfig, ModelConfig, TrainConfig
from r1jax.errors import ConfigError
from r1jax.model import sharding
from r1jax.model.params import is_spec, param_table
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import rules


def tiny(**kw) -> ModelConfig:
    return config.load(ModelConfig, "configs/model/tiny_v3.yaml", [f"{k}={v}" for k, v in kw.items()])


def sizes(**kw):
    return {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **kw}


# --------------------------------------------------------------------------- MeshConfig


def test_minus_one_fills_the_remaining_devices():
    assert MeshConfig().shape(8) == sizes(data=8)
    assert MeshConfig(data=2, expert=4).shape(8) == sizes(data=2, expert=4)
    assert MeshConfig(data=1, fsdp=-1, expert=2, tensor=2).shape(8) == sizes(fsdp=2, expert=2, tensor=2)
    # Two slices of 4: in-slice factors tile a slice, dcn factors tile the slices.
    assert MeshConfig(data=1, fsdp=-1, dcn_data=2).shape(8, num_slices=2) == sizes(data=2, fsdp=4)


@pytest.mark.parametrize("kw,devices,match", [
    (dict(data=2, expert=2), 8, r"mesh.data: the mesh data×fsdp×expert×tensor = 2×1×2×1 = 4 does not match the 8 devices"),
    (dict(data=-1, expert=3), 8, r"mesh.data: -1 cannot fill the mesh: 8 devices are not divisible by .* 3"),
    (dict(data=1, fsdp=16), 8, r"mesh.data: .* = 16 does not match the 8 devices"),
])
def test_wrong_products_are_named(kw, devices, match):
    with pytest.raises(ConfigError, match=match):
        mesh_lib.mesh_shape(MeshConfig(**kw), devices)


@pytest.mark.parametrize("override,match", [
    ("mesh.fsdp=0", r"mesh.fsdp: must be >= 1 or -1"),
    ("mesh.expert=-1", r"mesh.expert: only one in-slice axis may be -1"),
    ("mesh.tensr=2", r"mesh.tensr: unknown key for MeshConfig"),
    ("mesh.rules.embd=fsdp", r"mesh.rules.embd: unknown logical axis"),
    ("mesh.rules.embed=[fsdp, tensr]", r"mesh.rules.embed: unknown mesh axis 'tensr'"),
    ("mesh.rules.heads=[tensor, tensor]", r"mesh.rules.heads: names a mesh axis twice"),
])
def test_bad_mesh_keys_are_named_when_loading(override, match):
    with pytest.raises(ConfigError, match=match):
        config.load_stage("configs/train/tiny_pretrain.yaml", [override])


def test_rules_override_one_row_and_keep_the_rest():
    cfg = config.load_stage("configs/train/tiny_pretrain.yaml", ["mesh.rules.vocab=null", "mesh.rules.embed=[fsdp]"])
    assert cfg.mesh.rules["vocab"] == () and cfg.mesh.rules["embed"] == ("fsdp",)
    assert cfg.mesh.rules["heads"] == DEFAULT_RULES["heads"]
    assert list(cfg.mesh.rules) == list(DEFAULT_RULES)  # priority order is the default table's
    again = config.from_dict(TrainConfig, config.to_dict(cfg))  # what config.yaml round-trips to
    assert again.mesh == cfg.mesh


@pytest.mark.parametrize("shape,model,match", [
    (sizes(expert=8), dict(n_routed_experts=12, n_group=4),
     r"mesh.expert: n_routed_experts=12 is not divisible by the expert axis \(8\)"),
    (sizes(tensor=8), {}, r"mesh.tensor: num_attention_heads=4 is not divisible by the tensor axis \(8\)"),
])
def test_model_splits_are_checked(shape, model, match):
    with pytest.raises(ConfigError, match=match):
        mesh_lib.check_model(tiny(**model), shape)


def test_batch_must_split_over_the_batch_axes():
    cfg = config.load_stage("configs/train/tiny_pretrain.yaml", ["data.batch_size=12", "mesh.data=2", "mesh.expert=4"])
    shape = mesh_lib.mesh_shape(cfg.mesh, 8)
    with pytest.raises(ConfigError, match=r"data.batch_size: 12 rows do not split over the batch axes data=2×fsdp=1×expert=4"):
        mesh_lib.check_train(cfg, cfg.model, shape)
    accum = config.load_stage("configs/train/tiny_pretrain.yaml", ["data.batch_size=16", "optimizer.grad_accum_steps=4"])
    with pytest.raises(ConfigError, match=r"data.batch_size / optimizer.grad_accum_steps: 4 rows"):
        mesh_lib.check_train(accum, accum.model, mesh_lib.mesh_shape(accum.mesh, 8))


def test_bad_mesh_fails_before_compiling(tmp_path, monkeypatch):
    import r1jax.train.loop as loop

    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
    for override, match in (("mesh.expert=3", r"mesh.fsdp: -1 cannot fill"),
                            ("model.num_attention_heads=3", r"mesh.tensor: num_attention_heads=3"),
                            ("data.batch_size=6", r"data.batch_size: 6 rows do not split")):
        cfg = config.load_stage("configs/train/tiny_pretrain.yaml", [
            f"out_dir={tmp_path}", "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=2", override])
        with pytest.raises(ConfigError, match=match):
            loop.train(cfg)


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize("path", ["configs/model/tiny_v3.yaml", "configs/model/deepseek_v3_671b.yaml",
                                  "configs/model/deepseek_v2_lite.yaml"])
def test_default_rules_cover_every_logical_axis_of_the_param_table(path):
    cfg = config.load(ModelConfig, path)
    names = {a for s in jax.tree.leaves(param_table(cfg), is_leaf=is_spec) for a in s.axes}
    assert names <= set(DEFAULT_RULES), names - set(DEFAULT_RULES)


def test_specs_follow_priority_and_fall_back_to_replicated_when_not_divisible():
    shape = sizes(fsdp=2, expert=2, tensor=2)
    r = MeshConfig().rule_pairs()
    # Experts take `expert` first; the model dim keeps fsdp only; the ffn dim goes to tensor.
    assert rules.logical_spec(("layers", "expert", "embed", "expert_mlp"), (2, 8, 64, 32), r, shape) == \
        P(None, "expert", "fsdp", "tensor")
    # No expert dim: the model dim is split over fsdp and expert (ZeRO-3 over both).
    assert rules.logical_spec(("embed", "q_lora"), (64, 48), r, shape) == P(("fsdp", "expert"), None)
    # 6 does not divide by fsdp×expert = 4, but by fsdp = 2: replicated over expert only.
    assert rules.logical_spec(("embed", "vocab"), (6, 5), r, shape) == P("fsdp", None)
    # Activations: rows over data×fsdp×expert; a batch of 2 splits over the first axis that fits.
    # Size-1 axes stay in the specs (harmless), so every mesh has the same four axes to exchange over.
    assert rules.logical_spec(("batch", "length", "act_embed"), (8, 16, 64), r, shape) == \
        P(("data", "fsdp", "expert"), None, None)
    assert rules.logical_spec(("batch", "length"), (2, 16), r, sizes(data=4, expert=2)) == P(("fsdp", "expert"), None)


def test_param_shardings_on_a_mesh_and_the_fallback_report():
    cfg = tiny(kv_lora_rank=30)  # kv_a's kv_lora dim is 30 + 16 = 46: not divisible by 4
    mesh = mesh_lib.build_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    sh = sharding.param_shardings(cfg, mesh)
    assert sh["moe_layers"]["mlp"]["experts"]["gate"].spec == P(None, "expert", "fsdp", "tensor")
    assert sh["moe_layers"]["attn"]["q_b"].spec == P(None, ("fsdp", "expert"), "tensor", None)
    assert sh["moe_layers"]["mlp"]["router_bias"].spec == P(None, None)
    report = sharding.replicated_dims(cfg, mesh)
    assert any("kv_b" in r and "kv_lora=30" in r and "not split over expert=2" in r for r in report), report


def test_constrain_is_the_identity_without_a_sharding_context():
    from r1jax.model import transformer
    from r1jax.model.params import init_params

    cfg = tiny()
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.numpy.zeros((8, 16), jax.numpy.int32)
    plain = str(jax.make_jaxpr(lambda p, t: transformer.apply(p, t, cfg)["logits"])(params, tokens))
    assert "sharding_constraint" not in plain
    mesh = mesh_lib.build_mesh(MeshConfig(data=2, expert=4))
    with rules.sharding_context(mesh):
        meshed = str(jax.make_jaxpr(lambda p, t: transformer.apply(p, t, cfg)["logits"])(params, tokens))
    assert "sharding_constraint" in meshed
    with jax.set_mesh(mesh):  # a mesh without the rules: still untouched
        assert "sharding_constraint" not in str(
            jax.make_jaxpr(lambda p, t: transformer.apply(p, t, cfg)["logits"])(params, tokens))


def test_parse_mesh_spec():
    assert mesh_lib.parse_mesh_spec("data=2, expert=4") == ["mesh.data=2", "mesh.expert=4"]
    with pytest.raises(ConfigError, match=r"--mesh: expected axis=size pairs"):
        mesh_lib.parse_mesh_spec("data2")


# --------------------------------------------------------------------------- multi-host settings


def test_distributed_settings_from_the_environment():
    assert mesh_lib.settings_from_env({}) is None
    s = mesh_lib.settings_from_env({"R1JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "R1JAX_NUM_PROCESSES": "4",
                                    "R1JAX_PROCESS_ID": "3", "R1JAX_LOCAL_DEVICE_IDS": "0,1,2,3"})
    assert s == mesh_lib.DistributedSettings("explicit", "10.0.0.1:1234", 4, 3, (0, 1, 2, 3))
    assert mesh_lib.settings_from_env({"R1JAX_DISTRIBUTED": "auto"}).method == "auto"
    assert mesh_lib.settings_from_env({"R1JAX_DISTRIBUTED": "off", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}) is None
    assert mesh_lib.settings_from_env({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4"}).method == "slurm"
    assert mesh_lib.settings_from_env({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}) is None
    assert mesh_lib.settings_from_env({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}).method == "tpu"
    assert mesh_lib.settings_from_env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None


@pytest.mark.parametrize("env,match", [
    ({"R1JAX_COORDINATOR_ADDRESS": "host", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "0"},
     r"R1JAX_COORDINATOR_ADDRESS: expected host:port"),
    ({"R1JAX_COORDINATOR_ADDRESS": "h:1", "R1JAX_PROCESS_ID": "0"}, r"R1JAX_NUM_PROCESSES: required"),
    ({"R1JAX_COORDINATOR_ADDRESS": "h:1", "R1JAX_NUM_PROCESSES": "2", "R1JAX_PROCESS_ID": "2"},
     r"R1JAX_PROCESS_ID: must be < R1JAX_NUM_PROCESSES=2"),
    ({"R1JAX_COORDINATOR_ADDRESS": "h:1", "R1JAX_NUM_PROCESSES": "two", "R1JAX_PROCESS_ID": "0"},
     r"R1JAX_NUM_PROCESSES: expected an integer"),
    ({"R1JAX_DISTRIBUTED": "yes"}, r"R1JAX_DISTRIBUTED: expected 'auto' or 'off'"),
])
def test_bad_distributed_settings_are_named(env, match):
    with pytest.raises(ConfigError, match=match):
        mesh_lib.settings_from_env(env)
