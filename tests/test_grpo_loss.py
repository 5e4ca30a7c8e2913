"""The GRPO loss and its gradient against an independent float64 numpy transcription of the
formula (docs/grpo.md), for every aggregation, with and without KL and clipping."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import r1jax
from r1jax.rl import grpo


def numpy_loss_and_grad(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, how, max_len):
    """Value and d loss / d logp, by hand: ratio r = exp(logp − old); the min picks the clipped
    branch (constant in logp) only when clipping binds; k3 = e^d − d − 1 with d = ref − logp."""
    logp, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, ref, adv, mask))
    r = np.exp(logp - old)
    A = adv[:, None]
    unc, clp = r * A, np.clip(r, 1 - eps_lo, 1 + eps_hi) * A
    per = -np.minimum(unc, clp)
    dper = np.where(unc <= clp, -A * r, 0.0)  # d(-min)/dlogp
    if beta > 0:
        d = ref - logp
        per = per + beta * (np.exp(d) - d - 1)
        dper = dper + beta * (1 - np.exp(d))
    N = per.shape[0]
    if how == "sequence_mean":
        counts = mask.sum(1)  # an empty row adds 0 but counts among the N rows (TRL's `grpo`)
        w = mask / np.maximum(counts, 1)[:, None] / N
    elif how == "token_mean":
        w = mask / mask.sum()
    else:
        w = mask / (N * max_len)
    return (per * w).sum(), dper * w


CASES = list(itertools.product(["sequence_mean", "token_mean", "fixed_length"], [0.0, 0.04], [(0.2, 0.2), (0.2, 0.28), (10.0, 10.0)]))


@pytest.mark.parametrize("how,beta,eps", CASES)
def test_loss_and_gradient_match_numpy(how, beta, eps):
    rng = np.random.RandomState(hash((how, beta, eps)) % 2**31)
    N, L = 6, 9
    old = rng.normal(-2, 0.5, (N, L))
    logp = old + rng.normal(0, 0.3, (N, L))  # ratios spread across both clip edges
    ref = old + rng.normal(0, 0.2, (N, L))
    adv = rng.normal(0, 1, N)
    mask = (rng.uniform(size=(N, L)) > 0.25).astype(np.float64)
    mask[2] = 0  # an empty completion
    f = lambda lp: grpo.policy_loss(lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32),
                                    jnp.asarray(adv, jnp.float32), jnp.asarray(mask), epsilon_low=eps[0],
                                    epsilon_high=eps[1], beta=beta, aggregation=how, max_len=L)[0]
    lp32 = jnp.asarray(logp, jnp.float32)
    value, grad = jax.value_and_grad(f)(lp32)
    ref_value, ref_grad = numpy_loss_and_grad(np.asarray(lp32), old.astype(np.float32), ref.astype(np.float32),
                                              adv.astype(np.float32), mask, eps[0], eps[1], beta, how, L)
    assert float(value) == pytest.approx(ref_value, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=1e-4, atol=1e-7)
    if eps == (0.2, 0.2):
        assert np.any(ref_grad == 0) or beta > 0  # some tokens really are clipped


def test_mu_one_ratio_is_one_but_carries_the_gradient():
    rng = np.random.RandomState(0)
    logp = jnp.asarray(rng.normal(-2, 0.5, (4, 5)), jnp.float32)
    adv = jnp.asarray([1.0, -1.0, 0.5, 0.0])
    mask = jnp.ones((4, 5))
    f = lambda lp: grpo.policy_loss(lp, jax.lax.stop_gradient(lp), None, adv, mask, epsilon_low=0.2,
                                    epsilon_high=0.2, beta=0.0, aggregation="token_mean", max_len=5)
    (loss, m), g = jax.value_and_grad(f, has_aux=True)(logp)
    assert float(m["ratio_mean"]) == 1.0 and float(loss) == pytest.approx(-float(adv.mean()), rel=1e-6)
    np.testing.assert_allclose(np.asarray(g), -np.asarray(adv)[:, None] / 20 * np.ones((4, 5)), rtol=1e-6)


def test_advantages_match_numpy():
    rng = np.random.RandomState(1)
    r = rng.uniform(size=(5, 4)).astype(np.float32)
    valid = np.ones((5, 4), bool)
    valid[3, 1] = False
    got = np.asarray(grpo.advantages(jnp.asarray(r), jnp.asarray(valid), scale="group", eps=1e-4))
    for p in range(5):
        v = r[p][valid[p]]
        expect = (r[p] - v.mean()) / (v.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(got[p][valid[p]], expect[valid[p]], rtol=1e-5)
        assert np.all(got[p][~valid[p]] == 0)
    dr = np.asarray(grpo.advantages(jnp.asarray(r), jnp.asarray(valid), scale="none", eps=1e-4))
    np.testing.assert_allclose(dr[0], r[0] - r[0].mean(), rtol=1e-5)
    same = np.asarray(grpo.advantages(jnp.ones((1, 4)), jnp.ones((1, 4), bool), scale="group", eps=1e-4))
    assert np.all(same == 0)


@pytest.mark.parametrize("chunk,temperature", [(4, 1.0), (5, 0.7), (64, 1.3)])
def test_chunked_logprobs_equal_full_log_softmax(chunk, temperature):
    from r1jax.demo import tiny_config
    from r1jax.model.params import init_params

    cfg = tiny_config()
    params = init_params(cfg.replace(initializer_range=0.1), jax.random.key(0))
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (3, 13)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(13), (3, 13))
    seg = jnp.ones((3, 13), jnp.int32)
    lp = grpo.token_logprobs(params, tokens, pos, seg, cfg, temperature=temperature, chunk=chunk)
    full = jax.nn.log_softmax(r1jax.forward(params, tokens, cfg)[:, :-1] / temperature, -1)
    ref = jnp.take_along_axis(full, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_one_update_per_rollout_needs_no_old_logprob_pass():
    """μ = 1: π_old's log-probs taken from the update's own forward (detached) give the loss and
    gradient of the separate pass they replace (and the gradient is not the zero of an undetached ratio)."""
    import optax

    from r1jax import config
    from r1jax.model.params import init_params

    gcfg = config.load_stage("configs/train/tiny_grpo.yaml", ["beta=0", "num_iterations=1"])
    cfg = gcfg.model
    params = init_params(cfg.replace(initializer_range=0.1), jax.random.key(0))
    rng = np.random.RandomState(0)
    batch = {"tokens": jnp.asarray(rng.randint(3, cfg.vocab_size, (4, 10)), jnp.int32),
             "positions": jnp.tile(jnp.arange(10, dtype=jnp.int32), (4, 1)), "segment_ids": jnp.ones((4, 10), jnp.int32),
             "completion_mask": jnp.asarray(rng.rand(4, 6) > 0.3), "advantages": jnp.array([1.0, -1.0, 0.5, -0.5])}
    grad = jax.jit(jax.value_and_grad(grpo.loss_fn, has_aux=True), static_argnums=(2, 3))
    (loss, _), g = grad(params, batch, cfg, gcfg)
    old = grpo.rollout_logprobs(params, batch, cfg, gcfg)
    (loss_ref, m_ref), g_ref = grad(params, {**batch, "old_logp": old}, cfg, gcfg)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-9), g, g_ref)
    assert float(optax.global_norm(g)) > 1e-3 and float(m_ref["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
