"""ragged_ep's bounded receive buffer (`ragged_buffer_factor`) on 8 simulated CPU devices, the ragged
all-to-all emulated as in tests/test_parallel_model.py: with room to spare it is the unbounded exchange
and the local dispatch, forward and backward; under a flood it keeps exactly the copies a round-robin
share of each receiver's rows keeps (written here in numpy), computes those exactly and counts the
rest as dropped. And XLA:TPU's temporaries shrink with the factor."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from test_parallel_model import MESHES, assert_close, emulated_ragged_all_to_all, inputs, tiny
from test_tpu_compile import _devices, needs_libtpu

from r1jax import config
from r1jax.config import MeshConfig, ModelConfig
from r1jax.errors import ConfigError
from r1jax.model import experts, moe, sharding, transformer
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import rules

TOKENS = 256  # 8 rows of 32 tokens: 32 per token shard on 8 devices
K = 2  # tiny_v3's experts per token (of 8)


@pytest.fixture(autouse=True)
def _emulated(monkeypatch):
    monkeypatch.setattr(experts, "ragged_all_to_all", emulated_ragged_all_to_all)


def room(factor, group, n, k=K, num_experts=8):
    """Receive rows: the worst case, or ceil(factor·n·k) rounded up to 16 rows, whichever is fewer."""
    worst = group * n * min(k, num_experts // group)
    return worst if factor is None else min(worst, 16 * math.ceil(math.ceil(factor * n * k) / 16))


def kept_copies(ids, shards, group, rows, num_experts=8):
    """bool [T,k]: the copies the bounded exchange runs, by another algorithm than r1jax's: tokens are
    in `shards` equal blocks, `group` consecutive blocks exchange; each receiver takes one row from each
    sender in turn (lowest-numbered first) until `rows` are taken; a sender's rows for a receiver are
    its copies of that receiver's experts, ordered by expert, token, choice."""
    n, local = ids.shape[0] // shards, num_experts // group
    keep = np.zeros(ids.shape, bool)
    for first in range(0, shards, group):
        for dst in range(group):
            queues = [sorted((ids[t, j], t, j) for t in range(s * n, (s + 1) * n) for j in range(ids.shape[1])
                             if ids[t, j] // local == dst) for s in range(first, first + group)]
            taken, left = [0] * group, rows
            while left and any(t < len(q) for t, q in zip(taken, queues)):
                for i, q in enumerate(queues):
                    if left and taken[i] < len(q):
                        taken[i], left = taken[i] + 1, left - 1
            for q, t in zip(queues, taken):
                for _, tok, j in q[:t]:
                    keep[tok, j] = True
    return keep


def routing(flood: float, seed=0):
    """Distinct expert pairs per token; a `flood` share of the tokens all pick experts 0 and 1."""
    rng = np.random.RandomState(seed)
    ids = np.stack([rng.permutation(8)[:K] for _ in range(TOKENS)])
    ids[rng.rand(TOKENS) < flood] = [0, 1]
    return jnp.asarray(ids, jnp.int32)


def expert_params(cfg):
    rng = np.random.RandomState(1)
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    return {"gate": rng.randn(E, D, F), "up": rng.randn(E, D, F), "down": rng.randn(E, F, D)}


def run(cfg, ids, mesh_cfg=None, keep=None):
    """(y, dropped, grads of Σ y·r wrt experts, x, weights) of cfg's dispatch, on a mesh or one device;
    `keep` zeroes the other copies' weights before the dispatch (the reference's way to drop)."""
    rng = np.random.RandomState(2)
    p = jax.tree.map(lambda a: jnp.asarray(0.1 * a, jnp.float32), expert_params(cfg))
    x = jnp.asarray(rng.randn(TOKENS, cfg.hidden_size), jnp.float32)
    w = jnp.asarray(rng.rand(TOKENS, K) + 0.5, jnp.float32)
    r = jnp.asarray(rng.randn(TOKENS, cfg.hidden_size), jnp.float32)
    mask = jnp.ones((TOKENS, K), jnp.float32) if keep is None else jnp.asarray(keep, jnp.float32)

    def loss(p, x, w):
        y, dropped = moe.DISPATCH[cfg.moe_dispatch](p, x, w * mask, ids, cfg)
        return jnp.sum(y * r), (y, dropped)

    f = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
    if mesh_cfg is None:
        grads, (y, dropped) = f(p, x, w)
    else:
        with rules.sharding_context(mesh_lib.build_mesh(mesh_cfg), mesh_cfg):
            grads, (y, dropped) = f(p, x, w)
    return jax.device_get((y, grads)), int(dropped)


# --------------------------------------------------------------------------- room to spare


def test_a_buffer_with_room_to_spare_is_the_unbounded_exchange_and_the_local_dispatch():
    """data=2 × expert=4: 32 tokens per device, 64 copies; 1.5 × 64 = 96 receive rows of the worst
    case's 256, enough for this routing (checked in numpy), so nothing drops and nothing changes."""
    ids, mesh = routing(flood=0.0), MESHES["data=2,expert=4"]
    assert room(1.5, 4, 32) == 96 and kept_copies(np.asarray(ids), 8, 4, 96).all()
    bounded, dropped = run(tiny(moe_dispatch="ragged_ep", ragged_buffer_factor=1.5), ids, mesh)
    unbounded, none = run(tiny(moe_dispatch="ragged_ep"), ids, mesh)
    assert dropped == none == 0
    # Same rows, same experts: only the buffer's unused tail is shorter.
    np.testing.assert_array_equal(bounded[0], unbounded[0])
    assert_close(bounded, unbounded, tol=1e-6)
    assert_close(bounded, run(tiny(moe_dispatch="ragged"), ids)[0])
    assert_close(bounded, run(tiny(moe_dispatch="dense"), ids)[0], tol=2e-5)


def test_the_default_buffer_is_the_true_worst_case_when_a_device_has_fewer_experts_than_k():
    """expert=8: one expert per device, so a token sends at most one of its 2 copies to a device and
    the dropless buffer is 8·32 rows, not 8·64. Every copy of every token floods device 0's expert
    ([0, 1] for all): its buffer is exactly full, still nothing drops."""
    cfg = tiny(moe_dispatch="ragged_ep")
    assert experts.receive_rows(cfg, 8, 32) == room(None, 8, 32) == 8 * 32
    ids = routing(flood=1.0)
    out, dropped = run(cfg, ids, MeshConfig(data=1, expert=8))
    assert dropped == 0
    assert_close(out, run(tiny(moe_dispatch="ragged"), ids)[0])


# --------------------------------------------------------------------------- a flood


@pytest.mark.parametrize("mesh, shards, group", [("data=2,expert=4", 8, 4), ("fsdp=2,expert=2,tensor=2", 4, 2)])
def test_a_flood_drops_the_copies_numpy_predicts_and_keeps_the_rest_exact(mesh, shards, group):
    """Half the tokens pick experts 0 and 1 (device 0's); factor 1 leaves each device room for as many
    copies as it sends. The dropped count is the numpy round robin's, and every kept copy's output and
    gradients equal the dense reference with the dropped copies' weights zeroed."""
    ids = routing(flood=0.5)
    n = TOKENS // shards
    rows = room(1.0, group, n)
    assert experts.receive_rows(tiny(ragged_buffer_factor=1.0), group, n) == rows == n * K
    keep = kept_copies(np.asarray(ids), shards, group, rows)
    # A fair share: every sender to a flooded device loses copies, not only the last ones.
    assert 0 < (~keep).sum() < keep.size // 2
    assert all((~keep[s * n:(s + 1) * n]).any() for s in range(shards))
    out, dropped = run(tiny(moe_dispatch="ragged_ep", ragged_buffer_factor=1.0), ids, MESHES[mesh])
    assert dropped == int((~keep).sum())
    assert_close(out, run(tiny(moe_dispatch="dense"), ids, keep=keep)[0], tol=2e-5)


@pytest.mark.slow  # ~55 s here: the whole model under a mesh
def test_the_layer_stats_count_a_floods_drops_per_layer():
    """A router bias of 100 on experts 0 and 1 sends every token's two copies to device 0 of its group in
    every MoE layer (main and MTP): 4 senders × 64 copies for 64 rows, in each of 2 groups. The train
    step reports the sum of these as moe/dropped."""
    params, tokens = inputs()
    params = jax.tree.map(lambda a: a, params)  # a new tree: inputs() is cached for other tests
    cfg = tiny(moe_dispatch="ragged_ep", ragged_buffer_factor=1.0)
    bias = np.zeros(cfg.n_routed_experts, np.float32)
    bias[:2] = 100.0
    for key in ("moe_layers", "mtp"):
        mlp = params[key]["mlp"]
        mlp["router_bias"] = jnp.broadcast_to(bias, mlp["router_bias"].shape)
    mesh_cfg = MESHES["data=2,expert=4"]
    mesh = mesh_lib.build_mesh(mesh_cfg)
    with rules.sharding_context(mesh, mesh_cfg):
        out = jax.jit(lambda p, t: transformer.apply(p, t, cfg, with_mtp=True))(
            jax.device_put(params, sharding.param_shardings(cfg, mesh)), tokens)
    keep = kept_copies(np.tile([0, 1], (TOKENS, 1)), 8, 4, room(1.0, 4, 32))
    assert int((~keep).sum()) == 2 * (4 * 64 - 64)
    assert np.asarray(out["moe"]["dropped"]).tolist() == [384] * cfg.num_moe_layers
    assert np.asarray(out["mtp_moe"]["dropped"]).tolist() == [384]


# --------------------------------------------------------------------------- the key


@pytest.mark.parametrize("value, match", [
    ("0", "must be null \\(worst-case buffer\\) or a positive number, got 0.0"), ("-1", "got -1.0"),
    (".nan", "or a positive number, got nan"), (".inf", "or a positive number, got inf"),
    ("big", "expected float"), ("true", "expected float"),
])
def test_bad_factors_name_the_key(value, match):
    with pytest.raises(ConfigError, match=f"^ragged_buffer_factor: .*{match}"):
        config.load(ModelConfig, "configs/model/tiny_v3.yaml", [f"ragged_buffer_factor={value}"])


def test_the_factor_round_trips_through_yaml_and_stays_out_of_config_json():
    cfg = config.load(ModelConfig, "configs/model/tiny_v3.yaml", ["ragged_buffer_factor=2"])
    assert cfg.ragged_buffer_factor == 2.0 and tiny().ragged_buffer_factor is None
    assert config.from_dict(ModelConfig, yaml.safe_load(yaml.safe_dump(config.to_dict(cfg)))) == cfg
    hf = cfg.to_hf_config()
    assert "ragged_buffer_factor" not in hf
    assert ModelConfig.from_hf_config(hf).ragged_buffer_factor is None
    assert ModelConfig.from_hf_config(hf, ragged_buffer_factor=2.0).to_hf_config() == hf


def test_sampling_runs_the_worst_case_buffer():
    """Inference is dropless: the sampler drops the bound, whichever dispatch it starts from."""
    from r1jax.infer import sampler

    bounded = tiny(moe_dispatch="ragged_ep", ragged_buffer_factor=1.0)
    assert sampler.DROPLESS["ragged_ep"](bounded, "tpu") == bounded.replace(ragged_buffer_factor=None)
    capacity = bounded.replace(moe_dispatch="capacity_ep")
    assert sampler.DROPLESS["capacity_ep"](capacity, "tpu") == bounded.replace(ragged_buffer_factor=None)


# --------------------------------------------------------------------------- XLA:TPU


@needs_libtpu
@pytest.mark.slow  # two XLA:TPU compiles of a 2-layer 50M model: 23 min on a 2-core host shared six ways
def test_xla_tpu_temporaries_shrink_with_the_factor():
    """bench_50m_v3 (D 384, 16 experts, k 4) cut to one dense and one MoE layer, ragged_ep over
    expert=4 of a v5p:2x2x1, 2048 tokens per chip: the worst-case buffer is 4·2048·4 = 32,768 rows,
    factor 1.25 makes it 10,240. Measured 2026-12-02: temporaries 984,755,776 bytes unbounded,
    852,121,632 bounded (-132.6 MB, 3.8 fp32 [22,528, 384] buffers: the received rows, their sorted
    copy and the FFN's output, forward and backward); arguments 60,165,632 both."""
    from r1jax.plan import load_plan_config, lower_step

    temps, rows = {}, {}
    for factor in (None, 1.25):
        overrides = ["model.moe_dispatch=ragged_ep", "model.num_hidden_layers=2", "model.num_nextn_predict_layers=0",
                     f"model.ragged_buffer_factor={'null' if factor is None else factor}"]
        cfg, _ = load_plan_config("configs/model/bench_50m_v3.yaml", overrides, "data=1,fsdp=1,expert=4",
                                  seq_len=2048, devices=4)
        mesh = mesh_lib.build_mesh(cfg.mesh, _devices("v5p:2x2x1"))
        temps[factor] = lower_step(cfg, cfg.model, mesh).compile().memory_analysis().temp_size_in_bytes
        rows[factor] = experts.receive_rows(cfg.model, 4, 2048)
    assert rows == {None: 32768, 1.25: 10240}
    buffer = (rows[None] - rows[1.25]) * 384 * 4  # one fp32 [R,D] buffer's worth of the rows saved
    assert temps[None] - temps[1.25] >= 2 * buffer, temps
