"""Adam with its moments stored in bf16 (optimizer.moment_dtype, DeepSeek-V3 §3.3): each step against a
numpy float64 AdamW that rounds μ and ν to bf16 for storage; float32 stays optax.adamw bit for bit; the
state's leaves are bf16; `r1jax plan` counts half the bytes and the compiled step agrees; a bf16-moment
run resumes exactly."""

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

from r1jax.config import OptimizerConfig
from r1jax.errors import ConfigError
from r1jax.train import optimizer

B1, B2, EPS, LR, WD, CLIP = 0.9, 0.95, 1e-8, 1e-2, 0.1, 1.0


def _cfg(moment_dtype):
    return OptimizerConfig(learning_rate=LR, schedule="constant", b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                           grad_clip_norm=CLIP, moment_dtype=moment_dtype)


def _params(rng):
    # a decayed matrix, an undecayed norm and the frozen router bias (decay_mask, trainable_labels)
    return {"w": rng.normal(size=(16, 24)).astype(np.float32), "attn_norm": rng.normal(size=(24,)).astype(np.float32),
            "router_bias": rng.normal(size=(8,)).astype(np.float32)}


def _grads(rng, step):
    # grads whose global norm crosses the clip threshold on some steps, not on others
    scale = 0.02 if step % 2 else 0.2
    return {k: (scale * rng.normal(size=v.shape)).astype(np.float32) for k, v in _params(rng).items()}


def _adam_state(opt_state):
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)][0]


def _reference_step(params, mu, nu, grads, t):
    """float64 AdamW from the stored (bf16) moments: clip by the trainable leaves' global norm, moments,
    optax's bias correction, decay on matrices only, router bias untouched; μ, ν rounded to bf16. Also
    the size of the terms each new moment sums (for the fp32 rounding bound)."""
    f64 = lambda d: {k: np.asarray(v, np.float64) for k, v in d.items()}  # noqa: E731
    p, g, mu, nu = f64(params), f64(grads), f64(mu), f64(nu)
    train = ("w", "attn_norm")
    norm = np.sqrt(sum((g[k] ** 2).sum() for k in train))
    out, new_mu, new_nu, size = dict(p), {}, {}, {}
    for k in train:
        gk = g[k] * min(1.0, CLIP / norm)
        m = (1 - B1) * gk + B1 * mu[k]
        v = (1 - B2) * gk ** 2 + B2 * nu[k]
        u = (m / (1 - B1 ** t)) / (np.sqrt(v / (1 - B2 ** t)) + EPS) + (WD * p[k] if k == "w" else 0.0)
        out[k] = p[k] - LR * u
        new_mu[k], new_nu[k] = m.astype(ml_dtypes.bfloat16), v.astype(ml_dtypes.bfloat16)
        size[k] = ((1 - B1) * np.abs(gk) + B1 * np.abs(mu[k]), (1 - B2) * gk ** 2 + B2 * nu[k])
    return out, new_mu, new_nu, size


def test_bf16_moments_step_by_step_against_a_float64_reference():
    rng = np.random.default_rng(0)
    params = jax.tree.map(jnp.asarray, _params(rng))
    tx = optimizer.build(_cfg("bfloat16"), total_steps=10)
    state = tx.init(params)
    adam = _adam_state(state)
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
    step = jax.jit(lambda p, s, g: (lambda u, s2: (optax.apply_updates(p, u), s2))(*tx.update(g, s, p)))
    worst = 0.0
    for t in range(1, 7):
        grads = _grads(rng, t)
        before = _adam_state(state)
        want, want_mu, want_nu, size = _reference_step(params, {k: np.asarray(v) for k, v in before.mu.items()},
                                                 {k: np.asarray(v) for k, v in before.nu.items()}, grads, t)
        old = {k: np.asarray(v, np.float64) for k, v in params.items()}
        params, state = step(params, state, jax.tree.map(jnp.asarray, grads))
        adam = _adam_state(state)
        assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}  # fp32 master weights
        assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.bfloat16)}
        for k in want:
            got = np.asarray(params[k], np.float64)
            # fp32 compute: about eight roundings form u (moments, bias corrections, sqrt, divide, decay,
            # lr), each within ½ ulp relative, and one more forms p - lr·u: ≤ 4.5 ulps of |p| + lr·|u|.
            scale = np.abs(old[k]) + np.abs(want[k] - old[k])
            err = np.abs(got - want[k]) / np.spacing(scale.astype(np.float32))
            worst = max(worst, float(err.max()))
            assert (err <= 4.5).all(), (k, t, err.max())
        for k in want_mu:
            # new μ, ν are computed in fp32 (error: a few fp32 ulps of the summed terms' size, more than
            # of the sum where they cancel) and rounded to bf16: the float64 values rounded to bf16,
            # or, where the fp32 value fell on the other side of a bf16 rounding midpoint, next to it.
            for got, ref, terms in ((adam.mu[k], want_mu[k], size[k][0]), (adam.nu[k], want_nu[k], size[k][1])):
                got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
                ulp = np.spacing(np.abs(ref).astype(ml_dtypes.bfloat16)).astype(np.float64)
                assert (np.abs(got - ref) <= ulp + 2.0 ** -21 * terms).all(), (k, t)
                assert (got == ref).mean() > 0.99, (k, t, (got != ref).sum())
    np.testing.assert_array_equal(params["router_bias"], _params(np.random.default_rng(0))["router_bias"])
    print("worst param error in fp32 ulps:", worst)


def test_bf16_rounding_of_the_moments_changes_the_run():
    """The reference above can tell bf16 storage from fp32: the same six steps differ."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        rng = np.random.default_rng(0)
        params = jax.tree.map(jnp.asarray, _params(rng))
        tx = optimizer.build(_cfg(dtype), total_steps=10)
        state = tx.init(params)
        for t in range(1, 7):
            u, state = tx.update(jax.tree.map(jnp.asarray, _grads(rng, t)), state, params)
            params = optax.apply_updates(params, u)
        runs[dtype] = np.asarray(params["w"], np.float64)
    diff = np.abs(runs["float32"] - runs["bfloat16"]) / np.spacing(np.abs(runs["float32"]).astype(np.float32))
    assert diff.max() > 100, diff.max()


def test_float32_moments_are_optax_adamw_bit_for_bit():
    rng = np.random.default_rng(1)
    params = jax.tree.map(jnp.asarray, _params(rng))
    cfg = _cfg("float32")
    ours = optimizer.build(cfg, total_steps=10)
    adamw = optax.adamw(optimizer.schedule(cfg, 10), b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                        mask=optimizer.decay_mask)
    theirs = optax.multi_transform({"train": optax.chain(optax.clip_by_global_norm(CLIP), adamw),
                                    "frozen": optax.set_to_zero()}, optimizer.trainable_labels)
    s1, s2 = ours.init(params), theirs.init(params)
    for t in range(1, 5):
        g = jax.tree.map(jnp.asarray, _grads(rng, t))
        (u1, s1), (u2, s2) = ours.update(g, s1, params), theirs.update(g, s2, params)
        jax.tree.map(np.testing.assert_array_equal, (u1, s1), (u2, s2))
        params = optax.apply_updates(params, u1)
    assert {x.dtype for x in jax.tree.leaves(_adam_state(s1))[1:]} == {jnp.dtype(jnp.float32)}


def test_a_bad_moment_dtype_is_named():
    from r1jax import config

    with pytest.raises(ConfigError, match=r"moment_dtype: must be one of \('float32', 'bfloat16'\), got 'float16'"):
        OptimizerConfig(moment_dtype="float16")
    with pytest.raises(ConfigError, match=r"optimizer\.moment_dtype"):
        config.load_stage("configs/train/tiny_pretrain.yaml", ["optimizer.moment_dtype=fp8"])


def test_plan_counts_bf16_moments_at_half_the_bytes():
    from r1jax import config
    from r1jax.plan import state_bytes

    cfg = config.load_stage("configs/train/tiny_pretrain.yaml", [])
    m, sizes = cfg.model, {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    fp32, bf16 = (state_bytes(m, cfg.mesh, sizes, d) for d in ("float32", "bfloat16"))
    assert m.param_dtype == "float32" and fp32["optimizer"] == 2 * fp32["gradients"] > 0
    assert bf16["optimizer"] == fp32["optimizer"] / 2 and bf16["params"] == fp32["params"]


@pytest.mark.slow
def test_the_compiled_step_holds_the_halved_moments():
    """XLA's argument bytes of the compiled train step with bf16 moments are the analytic params + μ, ν
    (μ, ν now half the params' bytes) + the batch, as test_parallel_plan checks for fp32."""
    import io

    from r1jax.plan import plan_command

    p = plan_command("configs/train/tiny_pretrain.yaml", ["data.batch_size=16", "data.seq_len=64",
                     "model.moe_dispatch=capacity_ep", "optimizer.moment_dtype=bfloat16"], "data=2,expert=4",
                     out=io.StringIO())
    adam, params = p.analytic["optimizer state (Adam mu, nu)"], p.analytic["params"]
    # two bf16 moments of the fp32 trainable params take those params' bytes once (fp32 moments: twice);
    # the trainable params are all but the router bias (a few dozen floats here)
    assert params - 1024 < adam < params
    batch = 5 * p.rows_per_device * 64 * 4  # five int32 [rows, seq] arrays
    assert 0 <= p.compiled["argument_size_in_bytes"] - params - adam - batch < 256  # a few scalars


@pytest.mark.slow
def test_a_bf16_moment_run_saves_and_resumes_exactly(tmp_path, monkeypatch):
    """Four steps saved at 2 and 4; the saved moments are bf16; with step 4's checkpoint removed the
    run resumes from step 2 and ends on the same params."""
    import orbax.checkpoint as ocp
    from test_train_loop import _final_params, cfg_for

    from r1jax.checkpoint.orbax_io import flat_leaves
    import r1jax.train.loop as loop

    real, calls = loop.make_train_step, []

    def counted(*args, **kwargs):
        step_fn = real(*args, **kwargs)
        return lambda *a: (calls.append(1), step_fn(*a))[1]

    monkeypatch.setattr(loop, "make_train_step", counted)

    cfg = cfg_for(tmp_path, "steps=4", "checkpoint.save_interval_steps=2", "eval_data=null",
                  "optimizer.moment_dtype=bfloat16")
    assert loop.train(cfg).step == 4 and len(calls) == 4
    run = Path(cfg.out_dir)
    first = _final_params(run)
    saved = flat_leaves(ocp.StandardCheckpointHandler().metadata(run / "checkpoints" / "2" / "train_state").tree)
    moments = {name: m.dtype for name, m in saved.items() if {"mu", "nu"} & set(name.split("."))}
    assert moments and set(moments.values()) == {np.dtype(ml_dtypes.bfloat16)}, moments
    shutil.rmtree(run / "checkpoints" / "4")
    assert loop.train(cfg).step == 4 and len(calls) == 6  # resumed at step 2, not restarted
    jax.tree.map(np.testing.assert_array_equal, _final_params(run), first)
