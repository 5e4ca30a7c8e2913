"""Rollout mini-batches on a tiny model: one mini-batch is the plain update (μ full-batch steps), gradient
accumulation inside a mini-batch changes nothing but memory, the second of four mini-batches is
off-policy by exactly the ratio a float64 numpy recomputation from the model's logits gives, and bad
splits are named before any work."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import r1jax
from r1jax import config
from r1jax.errors import ConfigError
from r1jax.model.params import init_params
from r1jax.rl import grpo
from r1jax.rl.grpo_update import GRPOState, row_order, update


def setup(overrides, rows=16, seed=0):
    gcfg = config.load_stage("configs/train/tiny_grpo.yaml", ["prompts.batch_size=4", "num_generations=4"] + overrides)
    cfg = gcfg.model
    params = init_params(cfg.replace(initializer_range=0.1), jax.random.key(seed))
    rng = np.random.RandomState(seed)
    T, L = 12, 6
    batch = {"tokens": rng.randint(3, cfg.vocab_size, (rows, T)).astype(np.int32),
             "positions": np.tile(np.arange(T, dtype=np.int32), (rows, 1)),
             "segment_ids": np.ones((rows, T), np.int32), "completion_mask": rng.rand(rows, L) > 0.2,
             "advantages": rng.normal(0, 1, rows).astype(np.float32), "sample_mask": np.ones(rows, bool)}
    batch["completion_mask"][3] = False  # a truncated row under overlong: mask
    batch = jax.tree.map(jnp.asarray, batch)
    batch["old_logp"] = grpo.rollout_logprobs(params, batch, cfg, gcfg)
    if gcfg.beta > 0:
        batch["ref_logp"] = batch["old_logp"] - 0.05
    return gcfg, cfg, params, batch


def run_update(gcfg, cfg, params, batch, tx, order=None):
    state = GRPOState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(0),
                      jax.tree.map(jnp.copy, params))
    if order is not None:
        batch = {k: v[order] for k, v in batch.items()}
    fn = jax.jit(functools.partial(update, cfg=cfg, gcfg=gcfg, tx=tx))
    return fn(state, batch)


def test_one_mini_batch_is_the_plain_update():
    """M = 1: μ = 2 optimizer steps on the whole batch, each value_and_grad(loss_fn) + Adam: the update
    gives those params and losses (the same operations, so to float32 rounding of fusion only)."""
    gcfg, cfg, params, batch = setup(["beta=0.04", "num_iterations=2", "rollout_batches=1"])
    tx = optax.adam(1e-3)
    new, metrics = run_update(gcfg, cfg, params, batch, tx)

    @jax.jit
    def plain(p, opt):
        (loss, _), g = jax.value_and_grad(grpo.loss_fn, has_aux=True)(p, batch, cfg, gcfg)
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt, loss

    p, opt, losses = params, tx.init(params), []
    for _ in range(2):
        p, opt, loss = plain(p, opt)
        losses.append(float(loss))
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=1e-6)
    assert metrics["loss"].shape == (2,) and losses[0] != losses[1]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), new.params, p)


@pytest.mark.parametrize("aggregation", ["sequence_mean", "token_mean", "fixed_length"])
def test_gradient_accumulation_inside_a_mini_batch_changes_nothing(aggregation):
    """M = 2 mini-batches of A = 2 micro-batches each give the params of M = 2 without accumulation (the
    micro-batch losses are shares of the mini-batch's loss, with the mini-batch's normalisers)."""
    common = ["beta=0.04", "rollout_batches=2", f"loss_aggregation={aggregation}"]
    outs = []
    for accum in (1, 2):
        gcfg, cfg, params, batch = setup(common + [f"optimizer.grad_accum_steps={accum}"])
        # the same rows in each mini-batch: a fixed split (the seeded shuffle), laid out for A micro-batches
        split = row_order(16, config.load_stage("configs/train/tiny_grpo.yaml",
                                                ["prompts.batch_size=4", "num_generations=4"] + common), 0)
        minis = [split[m::2] for m in range(2)]
        order = np.stack(minis).reshape(2, accum, -1).transpose(2, 0, 1).reshape(-1)
        outs.append(run_update(gcfg, cfg, params, batch, optax.sgd(0.1), order))
    (s1, m1), (s2, m2) = outs
    np.testing.assert_allclose(np.asarray(m2["loss"]), np.asarray(m1["loss"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s2.params, s1.params)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), s1.params, setup([])[2]))
    assert max(moved) > 1e-3


def numpy_ratio(params, cfg, batch, rows):
    """exp(log π_new − log π_old) averaged over the rows' unmasked completion tokens, with the log-probs
    from the model's full logits in float64 (no chunking, no r1jax log-prob code)."""
    tokens = np.asarray(batch["tokens"])[rows]
    logits = np.asarray(r1jax.forward(params, jnp.asarray(tokens), cfg), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    lp = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0] - logz
    L = batch["completion_mask"].shape[1]
    lp = lp[:, -L:]
    old = np.asarray(batch["old_logp"], np.float64)[rows]
    mask = np.asarray(batch["completion_mask"])[rows]
    return (np.exp(lp - old) * mask).sum() / mask.sum()


def test_second_of_four_mini_batches_is_off_policy_by_the_numpy_ratio():
    """M = 4, π_old the params that sampled: mini-batch 0 is on-policy (ratio 1); mini-batch 1 is scored
    by the params after one step, and its logged mean ratio is the float64 numpy one from those params."""
    gcfg, cfg, params, batch = setup(["beta=0", "rollout_batches=4", "loss_aggregation=sequence_mean"])
    tx = optax.sgd(0.5)
    new, metrics = run_update(gcfg, cfg, params, batch, tx)  # rows laid out: mini-batch m = rows m::4
    ratio = np.asarray(metrics["ratio_mean"])
    assert ratio.shape == (4,) and ratio[0] == pytest.approx(1.0, abs=1e-6)
    # the params after the first step: one plain step on mini-batch 0 (its own π_old: the same params)
    one = config.load_stage("configs/train/tiny_grpo.yaml", ["prompts.batch_size=4", "num_generations=4", "beta=0",
                                                             "loss_aggregation=sequence_mean"])
    first = {k: v[0::4] for k, v in batch.items()}
    after_one, _ = run_update(one, cfg, params, first, tx)
    want = numpy_ratio(after_one.params, cfg, batch, np.arange(16)[1::4])
    assert abs(want - 1) > 1e-3
    assert ratio[1] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("overrides,match", [
    (["rollout_batches=3"], r"rollout_batches: rollout_batches × optimizer.grad_accum_steps = 3 × 1 must divide "
                            r"the rollout's prompts.batch_size × num_generations = 64 rows"),
    (["rollout_batches=16", "optimizer.grad_accum_steps=8"], r"= 16 × 8 must divide"),
    (["rollout_batches=0"], r"rollout_batches: must be >= 1"),
    (["delta=1.0"], r"delta: the two-sided clip caps ratios at delta: must be > 1"),
    (["scale_rewards=std"], r"scale_rewards"),
    (["importance_sampling_level=sequence_token"], r"importance_sampling_level: must be one of"),
])
def test_bad_mini_batch_settings_are_named(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config.load_stage("configs/train/tiny_grpo.yaml", overrides)


def test_mini_batch_rows_must_split_over_the_mesh_before_any_work(tmp_path):
    """Each micro-batch's rows split over the batch axes: 32 rows / 8 mini-batches = 4 < 8 devices."""
    from r1jax.rl.grpo_loop import train_grpo

    cfg = config.load_stage("configs/train/tiny_grpo.yaml", [
        "progress=false", f"out_dir={tmp_path / 'g'}", "prompts.batch_size=8", "num_generations=4",
        "rollout_batches=8", "mesh.data=8"])
    with pytest.raises(ConfigError, match=r"/ \(rollout_batches × optimizer.grad_accum_steps\): 4 rows do not split "
                                          r"over the batch axes data=8"):
        train_grpo(cfg)
    assert not (tmp_path / "g").exists()


def test_scale_rewards_accepts_trl_booleans():
    assert config.load_stage("configs/train/tiny_grpo.yaml", ["scale_rewards=false"]).scale_rewards == "none"
    assert config.load_stage("configs/train/tiny_grpo.yaml", ["scale_rewards=true"]).scale_rewards == "group"
    assert config.load_stage("configs/train/tiny_grpo.yaml", []).scale_rewards == "group"


def test_r1_setting_is_expressed_by_the_671b_config():
    """R1 (Nature version, Methods): 512 prompts × 16 = 8,192 completions per rollout in 16 mini-batches,
    β 0.001, ε 10, lr 3e-6, π_ref refreshed every 400 optimizer steps; the rows split on 512 chips."""
    from r1jax.rl.grpo_update import check_mesh, micro_batches, optimizer_steps

    cfg = config.load_stage("configs/train/deepseek_v3_671b_grpo_v5p.yaml")
    assert (cfg.prompts.batch_size, cfg.num_generations, cfg.rollout_batches, cfg.num_iterations) == (512, 16, 16, 1)
    assert (cfg.beta, cfg.epsilon_low, cfg.epsilon_high, cfg.optimizer.learning_rate) == (0.001, 10.0, 10.0, 3e-6)
    assert cfg.ref_refresh_steps * optimizer_steps(cfg) == 400
    check_mesh(cfg, cfg.model, cfg.mesh.shape(512))
    assert 512 * 16 // micro_batches(cfg) == 512  # one row per chip per micro-batch, as the update was planned
