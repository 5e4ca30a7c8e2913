"""orbax checkpoints: model-only directories and training checkpoints (r1jax/checkpoint/)."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

import r1jax
from r1jax.checkpoint import manager as manager_lib
from r1jax.checkpoint.manager import CheckpointConfig, CheckpointManager
from r1jax.checkpoint.orbax_io import is_model_checkpoint, load_model, save_model
from r1jax.demo import tiny_config
from r1jax.errors import CheckpointError, ConfigError
from r1jax.model.params import init_params, param_shapes


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


@pytest.fixture(scope="module")
def cfg():
    return tiny_config()


@pytest.fixture(scope="module")
def params(cfg):
    return init_params(cfg, jax.random.key(0))


def as_dtype(cfg, params, dtype):
    """(cfg, params) in `dtype`; the router bias keeps its fixed fp32 like init_params does."""
    cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
    return cfg, jax.tree.map(lambda p, s: p.astype(s.dtype), params, param_shapes(cfg))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def opt_state(params):
    """An optax.adamw state with non-zero moments, so a restore that returned zeros would be caught."""
    adam, *rest = optax.adamw(1e-3).init(params)
    # numpy moments: eager jax ops would compile once per leaf shape, which is slow on 2 cores.
    adam = adam._replace(count=jnp.int32(4), mu=jax.tree.map(lambda p: np.asarray(p) * 0.5, params),
                         nu=jax.tree.map(lambda p: np.asarray(p) ** 2, params))
    return (adam, *rest)


@pytest.fixture
def make_state(params, opt_state):
    def make(step=0, seed=1):
        return TrainState(step=jnp.int32(step), params=params, opt_state=opt_state, rng=jax.random.key(seed))
    return make


def assert_states_equal(a, b):
    assert jax.random.key_impl(a.rng) == jax.random.key_impl(b.rng)
    assert_trees_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))
    assert_trees_equal(a.replace(rng=None), b.replace(rng=None))


def ckpt_config(tmp_path, **kw):
    kw.setdefault("save_interval_steps", 1)
    kw.setdefault("max_to_keep", 3)
    return CheckpointConfig(directory=str(tmp_path / "ckpt"), **kw)


# --------------------------------------------------------------------------- model checkpoints


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_round_trip_is_exact(tmp_path, cfg, params, dtype):
    cfg, params = as_dtype(cfg, params, dtype)
    save_model(tmp_path / "m", cfg, params)
    assert is_model_checkpoint(tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary directory left behind
    cfg2, params2 = load_model(tmp_path / "m")
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    assert params2["moe_layers"]["mlp"]["router_bias"].dtype == jnp.float32


def test_relative_paths_save_and_load(tmp_path, cfg, params, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r1jax.save_pretrained("rel/m", cfg, params, format="orbax")
    cfg2, params2 = r1jax.load_pretrained("rel/m")
    assert cfg2 == cfg
    assert_trees_equal(params2, params)


def test_load_converts_dtype_but_keeps_router_bias_fp32(tmp_path, cfg, params):
    save_model(tmp_path / "m", cfg, params)
    cfg16, params16 = load_model(tmp_path / "m", dtype=jnp.bfloat16)
    assert cfg16.param_dtype == "bfloat16" and cfg16.dtype == "bfloat16"
    assert_trees_equal(params16, as_dtype(cfg, params, "bfloat16")[1])


def test_save_pretrained_orbax_then_load_pretrained(tmp_path, cfg, params):
    r1jax.save_pretrained(tmp_path / "m", cfg, params, format="orbax")
    cfg2, params2 = r1jax.load_pretrained(tmp_path / "m")
    assert cfg2 == cfg
    assert_trees_equal(params2, params)


def test_existing_destination_is_an_error_and_untouched(tmp_path, cfg, params):
    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(dst, cfg, params)
    assert sorted(os.listdir(dst)) == ["keep.txt"] and (dst / "keep.txt").read_text() == "old"
    save_model(dst, cfg, params, overwrite=True)
    assert sorted(os.listdir(dst)) == ["config.yaml", "params"]
    assert_trees_equal(load_model(dst)[1], params)


def test_saving_a_wrong_leaf_shape_names_the_leaf(tmp_path, cfg, params):
    bad = jax.tree.map(lambda x: x, params)
    bad["moe_layers"]["attn"]["q_b"] = bad["moe_layers"]["attn"]["q_b"][..., :-1]
    with pytest.raises(CheckpointError, match=r"moe_layers\.attn\.q_b.*shape"):
        save_model(tmp_path / "m", cfg, bad)
    assert not (tmp_path / "m").exists()


def edit_config(path, **changes):
    d = yaml.safe_load((path / "config.yaml").read_text())
    d.update(changes)
    (path / "config.yaml").write_text(yaml.safe_dump(d))


def test_load_errors_name_the_problem(tmp_path, cfg, params):
    m = tmp_path / "m"
    save_model(m, cfg, params)
    edit_config(m, moe_intermediate_size=cfg.moe_intermediate_size * 2)
    with pytest.raises(CheckpointError, match=r"moe_layers\.mlp\.experts\.down' has shape \[2,8,32,64\], "
                                              r"expected \[2,8,64,64\]"):
        load_model(m)
    edit_config(m, moe_intermediate_size=cfg.moe_intermediate_size, attention_bias=True)
    with pytest.raises(CheckpointError, match=r"missing leaf 'dense_layers\.attn\.kv_a_bias'"):
        load_model(m)
    edit_config(m, attention_bias=False, not_a_field=1)
    with pytest.raises(ConfigError, match=r"config\.yaml: not_a_field: unknown key"):
        load_model(m)
    (m / "config.yaml").unlink()
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_model(m)
    assert not is_model_checkpoint(m)


# --------------------------------------------------------------------------- training checkpoints


def test_train_state_round_trip(tmp_path, make_state):
    state = make_state(step=7)
    data_state = {"epoch": 1, "next_index": 1234, "shuffle_seed": 5}
    with CheckpointManager(ckpt_config(tmp_path)) as mngr:
        assert mngr.save(7, state, data_state, metadata={"loss": 2.5})
        mngr.wait()
        restored, data2 = mngr.restore(abstract_state=jax.eval_shape(lambda: state))
        assert mngr.metadata(7) == {"loss": 2.5}
        with pytest.raises(CheckpointError, match="data_state: must be JSON-serializable"):
            mngr.save(9, state, {"sampler": object()}, force=True)
    assert data2 == data_state
    assert_states_equal(restored, state)
    # bytes data state (grain DataLoader iterators) and a non-default key implementation
    state = state.replace(rng=jax.random.key(3, impl="rbg"))
    with CheckpointManager(ckpt_config(tmp_path)) as mngr:
        mngr.save(8, state, b'{"last_seen_indices": {"0": 9}}')
        restored, data2 = mngr.restore(8, abstract_state=jax.eval_shape(lambda: state))
    assert data2 == b'{"last_seen_indices": {"0": 9}}'
    assert_states_equal(restored, state)


def test_interval_keep_n_and_never_overwrite(tmp_path, make_state):
    state = make_state()
    config = ckpt_config(tmp_path, save_interval_steps=2, max_to_keep=2)
    with CheckpointManager(config) as mngr:
        assert [mngr.save(s, state) for s in range(1, 7)] == [False, True, False, True, False, True]
        assert mngr.save(7, state, force=True)
        mngr.wait()
        assert mngr.all_steps() == [6, 7]
        assert not mngr.save(7, state.replace(step=jnp.int32(99)), force=True)  # never overwritten
        with pytest.raises(CheckpointError, match="older than the latest"):
            mngr.save(5, state, force=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["6", "7"]
    with CheckpointManager(config) as mngr:
        restored, _ = mngr.restore(abstract_state=jax.eval_shape(lambda: state))
        assert int(restored.step) == 0
        wrong = jax.eval_shape(lambda: state.replace(params={**state.params, "embed": state.params["embed"][:8]}))
        with pytest.raises(CheckpointError, match=r"7/params: leaf 'embed' has shape \[512,64\], expected \[8,64\]"):
            mngr.restore(abstract_state=wrong)
        with pytest.raises(CheckpointError, match="no complete checkpoint at step 5"):
            mngr.restore(5, abstract_state=jax.eval_shape(lambda: state))


def test_keep_period_keeps_every_nth_step(tmp_path, make_state):
    state = make_state()
    with CheckpointManager(ckpt_config(tmp_path, max_to_keep=1, keep_period=2, async_save=False)) as mngr:
        for step in range(1, 6):
            mngr.save(step, state)
        assert mngr.all_steps() == [2, 4, 5]


def test_incomplete_latest_checkpoint_is_ignored(tmp_path, cfg, params, make_state):
    config = ckpt_config(tmp_path, async_save=False)
    with CheckpointManager(config, model_config=cfg) as mngr:
        mngr.save(1, make_state(step=1), {"i": 1})
        mngr.save(2, make_state(step=2), {"i": 2})
    # A save killed mid-write leaves orbax's temporary directory and no step 3.
    partial = tmp_path / "ckpt" / "3.orbax-checkpoint-tmp-1234567"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "junk").write_bytes(b"\0" * 10)
    assert load_model(tmp_path / "ckpt")[0] == cfg  # the latest complete step's params
    with CheckpointManager(config, model_config=cfg) as mngr:
        assert mngr.latest_step() == 2
        restored, data = mngr.restore(abstract_state=jax.eval_shape(lambda: make_state()))
        assert int(restored.step) == 2 and data == {"i": 2}
        assert mngr.save(3, make_state(step=3))
    assert not partial.exists()


def test_load_model_from_training_checkpoint(tmp_path, cfg, params, make_state):
    with CheckpointManager(ckpt_config(tmp_path), model_config=cfg) as mngr:
        mngr.save(5, make_state())
    assert is_model_checkpoint(tmp_path / "ckpt")
    cfg2, params2 = r1jax.load_pretrained(tmp_path / "ckpt")
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    with pytest.raises(CheckpointError, match="different model"):
        CheckpointManager(ckpt_config(tmp_path), model_config=cfg.replace(hidden_size=32))


def mesh_shardings(tree, mesh):
    """Shard each leaf's first dim that divides by the mesh size (experts: [layers, E, ...] on E)."""
    def one(x):
        dims = [i for i, n in enumerate(x.shape) if n % mesh.size == 0]
        return NamedSharding(mesh, P(*[None] * dims[0], "data") if dims else P())
    return jax.tree.map(one, tree)


def test_restore_onto_another_mesh_and_back(tmp_path, make_state):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("data",))
    state = make_state(step=3)
    abstract = jax.eval_shape(lambda: state)
    with CheckpointManager(ckpt_config(tmp_path / "one")) as mngr:
        mngr.save(3, state)  # saved from one device
        sharded, _ = mngr.restore(abstract_state=abstract, shardings=mesh_shardings(abstract, mesh))
    assert_states_equal(sharded, state)
    experts = sharded.params["moe_layers"]["mlp"]["experts"]["gate"]
    assert experts.sharding.spec == P(None, "data")
    assert {s.data.shape for s in experts.addressable_shards} == {(2, 1, 64, 32)}

    with CheckpointManager(ckpt_config(tmp_path / "eight")) as mngr:
        mngr.save(3, sharded)  # saved from eight devices
        single, _ = mngr.restore(abstract_state=abstract)
    assert_states_equal(single, state)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(single))


def test_sigterm_forces_a_save(tmp_path, make_state):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert manager_lib.install_sigterm_handler()
        with CheckpointManager(ckpt_config(tmp_path, save_interval_steps=100)) as mngr:
            assert not mngr.save(3, make_state())
            os.kill(os.getpid(), signal.SIGTERM)
            assert manager_lib.preemption_requested() and mngr.reached_preemption(4)
            assert mngr.save(4, make_state())
            mngr.wait()
            assert mngr.all_steps() == [4]
    finally:
        signal.signal(signal.SIGTERM, previous)
        manager_lib._PREEMPTED.clear()


def test_config_is_validated(tmp_path):
    with pytest.raises(ConfigError, match="max_to_keep"):
        CheckpointConfig(directory=str(tmp_path), max_to_keep=0)
    with pytest.raises(ConfigError, match="save_interval_steps"):
        CheckpointConfig(directory=str(tmp_path), save_interval_steps=0)
