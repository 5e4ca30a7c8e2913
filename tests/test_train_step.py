"""Optimizer vs a float64 numpy AdamW, gradient accumulation, the router-bias balancing rule,
non-finite steps leaving the state intact, the loss's composition vs float64, and bf16 compute over
fp32 master weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r1jax import config
from r1jax.config import ModelConfig, OptimizerConfig
from r1jax.model.params import init_params
from r1jax.train import optimizer as opt_lib
from r1jax.train.step import StepOptions, init_state, make_train_step


def tiny(**kw) -> ModelConfig:
    return config.load(ModelConfig, "configs/model/tiny_v3.yaml", [f"{k}={v}" for k, v in kw.items()])


def numpy_adamw(params, grads_seq, cfg: OptimizerConfig, total_steps):
    """Decoupled AdamW (Loshchilov & Hutter) in float64 with bias correction, global-norm clipping,
    decay only on matrices, frozen `router_bias`, warmup + cosine schedule."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq):
        if t < cfg.warmup_steps:
            lr = cfg.learning_rate * t / cfg.warmup_steps
        else:
            frac = min((t - cfg.warmup_steps) / (total_steps - cfg.warmup_steps), 1.0)
            cos = 0.5 * (1 + np.cos(np.pi * frac))
            lr = cfg.learning_rate * ((1 - cfg.min_lr_ratio) * cos + cfg.min_lr_ratio)
        g = {k: x.astype(np.float64) for k, x in g.items() if k != "router_bias"}
        norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
        scale = min(1.0, cfg.grad_clip_norm / norm)
        for k, x in g.items():
            x = x * scale
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * x
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * x * x
            mh = m[k] / (1 - cfg.b1 ** (t + 1))
            vh = v[k] / (1 - cfg.b2 ** (t + 1))
            upd = mh / (np.sqrt(vh) + cfg.eps)
            if p[k].ndim > 1:
                upd = upd + cfg.weight_decay * p[k]
            p[k] = p[k] - lr * upd
    return p


def test_optimizer_matches_float64_adamw():
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, grad_clip_norm=0.5,
                          min_lr_ratio=0.1)
    rng = np.random.RandomState(0)
    params = {"w": rng.normal(size=(4, 3)).astype(np.float32), "norm": rng.normal(size=3).astype(np.float32),
              "router_bias": rng.normal(size=5).astype(np.float32)}
    grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(6)]
    tx = opt_lib.build(cfg, total_steps=6)
    state = tx.init(jax.tree.map(jnp.asarray, params))
    p = jax.tree.map(jnp.asarray, params)
    for g in grads_seq:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    ref = numpy_adamw(params, grads_seq, cfg, 6)
    for k in ("w", "norm"):
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(p["router_bias"]), params["router_bias"])  # frozen


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedules(kind):
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, schedule=kind, min_lr_ratio=0.2)
    f = opt_lib.schedule(cfg, total_steps=110)
    assert float(f(0)) == 0.0 and float(f(5)) == pytest.approx(0.5)
    assert float(f(10)) == pytest.approx(1.0)
    end = {"cosine": 0.2, "linear": 0.2, "constant": 1.0}[kind]
    assert float(f(110)) == pytest.approx(end, rel=1e-5)
    if kind == "cosine":
        assert float(f(60)) == pytest.approx(0.2 + 0.8 * 0.5, rel=1e-5)


def _batch(cfg, B=4, T=16, seed=0, mask_seed=None):
    rng = np.random.RandomState(seed)
    toks = rng.randint(0, cfg.vocab_size, (B, T + 1))
    mask = np.ones((B, T), np.int32)
    if mask_seed is not None:
        mask = (np.random.RandomState(mask_seed).uniform(size=(B, T)) > 0.3).astype(np.int32)
    return {"inputs": jnp.asarray(toks[:, :-1], jnp.int32), "targets": jnp.asarray(toks[:, 1:], jnp.int32),
            "segment_ids": jnp.ones((B, T), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
            "loss_mask": jnp.asarray(mask)}


def test_gradient_accumulation_equals_one_big_batch():
    """Gradients (not post-Adam params: Adam's m/√v amplifies rounding where |g| ~ eps) of A=2
    micro-batches with unequal token counts equal one big batch's."""
    from r1jax.train.step import grads_and_aux

    cfg = tiny(moe_dispatch="dense")
    params = init_params(cfg, jax.random.key(0))
    batch = _batch(cfg, mask_seed=1)
    out = {}
    for a in (1, 2):
        opts = StepOptions(mtp_weight=0.3, balance_alpha=1e-2, bias_rate=0.0, grad_accum_steps=a)
        out[a] = jax.jit(lambda p, b, o=opts: grads_and_aux(p, b, cfg, o))(params, batch)
    (g1, aux1), (g2, aux2) = out[1], out[2]
    assert float(aux1["ce"]) == pytest.approx(float(aux2["ce"]), rel=1e-6)
    assert float(aux1["tokens"]) == float(aux2["tokens"])
    np.testing.assert_allclose(aux1["moe"]["load"], aux2["moe"]["load"])
    # MTP and balance terms are per-micro-batch means, so only the CE part is exact; with these
    # weights their share of the gradient is small but not zero: compare with CE-only too.
    for a in (1, 2):
        opts = StepOptions(mtp_weight=0.0, balance_alpha=0.0, bias_rate=0.0, grad_accum_steps=a)
        out[a] = jax.jit(lambda p, b, o=opts: grads_and_aux(p, b, cfg, o))(params, batch)
    # fp32 summation order differs (two halves vs one sum): absolute error relative to the leaf's scale
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6 * np.abs(y).max()),
                 out[1][0], out[2][0])


def test_router_bias_update_evens_expert_load():
    """With the model frozen (lr ≈ 0) and inputs that favour a few experts, the sign rule alone
    must even the load out (V3 §2.1.2)."""
    cfg = tiny(num_nextn_predict_layers=0)
    params = init_params(cfg.replace(initializer_range=0.1), jax.random.key(1))
    # Skew routing: a shared offset in every embedding aligned with two experts' router columns.
    router = params["moe_layers"]["mlp"]["router"]
    offset = 0.6 * (router[0, :, 0] + router[0, :, 5]) / jnp.linalg.norm(router[0, :, 0] + router[0, :, 5])
    params["embed"] = params["embed"] + offset
    tx = opt_lib.build(OptimizerConfig(learning_rate=1e-12, weight_decay=0.0), 100)
    step = make_train_step(cfg, tx, StepOptions(mtp_weight=0.0, balance_alpha=0.0, bias_rate=0.01))
    state = init_state(params, tx, 0)
    ratios, spreads = [], []
    for i in range(60):
        state, m = step(state, _batch(cfg, B=16, T=64, seed=i))
        ratios.append(np.asarray(m["moe/load_max_over_mean"]))
        spreads.append(np.asarray(m["moe/load_max_over_mean"]) / np.asarray(m["moe/load_min_over_mean"]))
    before, after = ratios[0].max(), np.mean(ratios[-10:], axis=0).max()
    assert before > 2.0, before
    assert after < 1.5, after
    # The measure, max/min load per MoE layer. Measured on CPU: step 1 [443, 27] (an
    # expert gets 1-2 of ~256 mean copies); median of the last 10 steps [1.93, 1.90]. 2,048 routed
    # copies a step and γ=0.01 sign steps keep it oscillating between 1.3 and 3.3 from step to step.
    assert (spreads[0] > 20).all(), spreads[0]
    assert (np.median(spreads[-10:], axis=0) < 3.0).all(), spreads[-10:]
    assert float(np.abs(np.asarray(state.params["moe_layers"]["mlp"]["router_bias"])).max()) > 0.05


def test_non_finite_step_keeps_the_last_good_state():
    cfg = tiny()
    params = init_params(cfg, jax.random.key(0))
    tx = opt_lib.build(OptimizerConfig(), 10)
    step = make_train_step(cfg, tx, StepOptions())
    state = init_state(params, tx, 0)
    state, m = step(state, _batch(cfg))
    assert bool(m["finite"])
    good = jax.tree.map(np.asarray, state.params)
    bad = jax.tree.map(lambda x: x, state)
    bad = bad.replace(params={**bad.params, "final_norm": bad.params["final_norm"] * jnp.nan})
    new, m = step(bad, _batch(cfg, seed=1))
    assert not bool(m["finite"])
    np.testing.assert_array_equal(np.asarray(new.params["embed"]), good["embed"])


# --------------------------------------------------------------------------- loss composition, bf16

MTP_W, ALPHA = 0.3, 0.1  # alpha far above the default so the balance term shows in the total


def _sft_batch(cfg):
    """Two rows: one segment with a 5-token 'prompt', and two packed segments (prompts of 3 and 2
    tokens) before 2 padding positions. loss_mask is 0 on prompts, on a segment's last position (its
    target is the next segment's token) and on padding, like the SFT packer."""
    T = 16
    seg = np.array([[1] * T, [1] * 9 + [2] * 5 + [0] * 2], np.int32)
    pos = np.array([list(range(T)), list(range(9)) + list(range(5)) + [0, 0]], np.int32)
    mask = np.ones((2, T), np.int32)
    mask[0, :5] = 0
    mask[1, :3] = mask[1, 9:11] = 0
    mask[0, T - 1] = mask[1, 8] = mask[1, 13] = 0
    mask[seg == 0] = 0
    toks = np.random.RandomState(7).randint(3, cfg.vocab_size, (2, T + 1))
    return {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32), "segment_ids": seg,
            "positions": pos, "loss_mask": mask}


@jax.jit
def _fp32_forward_and_loss(params, batch):
    """The tiny V3 model's outputs and lm_loss on the same batch (fp32), one compile for two tests."""
    from r1jax import model
    from r1jax.train.losses import lm_loss

    cfg = tiny()
    out = model.apply(params, batch["inputs"], cfg, batch["positions"], batch["segment_ids"], with_mtp=True)
    return out, lm_loss(params, batch, cfg, mtp_weight=MTP_W, balance_alpha=ALPHA)


def _sharp_params():
    # std 0.1 (not 0.02) so the loss is far from ln V and a broken forward could not pass by accident.
    return init_params(tiny(initializer_range=0.1), jax.random.key(3))


def _nll64(logits, targets):
    """-log softmax(logits)[target] in float64. logits [...,V], targets [...]."""
    z = np.asarray(logits, np.float64)
    lse = z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))
    return lse - np.take_along_axis(z, targets[..., None], -1)[..., 0]


def test_total_loss_and_masked_mtp_match_float64():
    """total = CE + mtp_weight·MTP + alpha·Σ balance (V3 §2.1.2, §2.2), from the model's own logits in
    float64: CE over loss-mask tokens; MTP depth k at position t predicts the input token t+k+1 (=
    target t+k), counted only where target t+k is a loss token, inside the same segment and inside the
    row; the depths' token means averaged. The per-layer balance values are the model's (their formula
    is checked against numpy in test_model.py)."""
    cfg = tiny()
    batch = _sft_batch(cfg)
    out, (total, aux) = _fp32_forward_and_loss(_sharp_params(), batch)
    tgt, mask, seg, inp = batch["targets"], batch["loss_mask"], batch["segment_ids"], batch["inputs"]
    B, T = tgt.shape
    ce = (_nll64(out["logits"], tgt) * mask).sum() / mask.sum()
    mtp_logits = np.asarray(out["mtp_logits"])
    M = mtp_logits.shape[0]
    assert M == cfg.num_nextn_predict_layers
    masked, unmasked = [], []
    for k in range(1, M + 1):
        s = n = s_all = n_all = 0.0
        for b in range(B):
            for t in range(T - k - 1):  # the input token t+k+1 must exist in the row
                if seg[b, t] == 0 or seg[b, t + k + 1] != seg[b, t]:
                    continue
                assert inp[b, t + k + 1] == tgt[b, t + k]
                nll = _nll64(mtp_logits[k - 1, b, t], tgt[b, t + k])
                s_all, n_all = s_all + nll, n_all + 1
                if mask[b, t + k]:
                    s, n = s + nll, n + 1
        masked.append(s / n)
        unmasked.append(s_all / n_all)
    mtp, mtp_unmasked = np.mean(masked), np.mean(unmasked)
    balance = sum(float(np.asarray(st["balance_loss"], np.float64).sum()) for st in (out["moe"], out["mtp_moe"]))
    assert float(aux["ce"]) == pytest.approx(ce, rel=2e-6)
    assert float(aux["mtp_ce"]) == pytest.approx(mtp, rel=2e-6)
    assert abs(mtp - mtp_unmasked) > 1e-3  # the mask matters on this batch: the check above is not vacuous
    assert float(aux["balance_loss"]) == pytest.approx(balance, rel=2e-6)
    assert float(total) == pytest.approx(ce + MTP_W * mtp + ALPHA * balance, rel=2e-6)
    assert float(aux["tokens"]) == mask.sum()
    assert abs(ce - np.log(cfg.vocab_size)) > 0.2, ce  # sharp params: far from the uniform loss


def test_bf16_compute_keeps_fp32_master_weights_and_moments():
    """dtype=bfloat16, param_dtype=float32: params, Adam's moments and the router bias stay fp32 and the
    step's loss (computed before its update) is close to the fp32 loss at the same params."""
    cfg = tiny(dtype="bfloat16")
    assert cfg.param_dtype == "float32"
    params = _sharp_params()
    batch = _sft_batch(cfg)
    _, (want, _) = _fp32_forward_and_loss(params, batch)
    tx = opt_lib.build(OptimizerConfig(learning_rate=1e-3), 10)
    step = make_train_step(cfg, tx, StepOptions(mtp_weight=MTP_W, balance_alpha=ALPHA))
    state, m = step(init_state(params, tx, 0), jax.tree.map(jnp.asarray, batch))
    assert bool(m["finite"]) and np.isfinite(float(m["loss"]))
    for path, x in jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]:
        if jnp.issubdtype(x.dtype, jnp.floating):
            assert x.dtype == jnp.float32, jax.tree_util.keystr(path)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)  # noqa: E731
    (adam,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(s)]
    moments = jax.tree.leaves((adam.mu, adam.nu))
    assert len(moments) == 2 * (len(jax.tree.leaves(state.params)) - 2)  # all but the 2 frozen router biases
    assert all(x.dtype == jnp.float32 and np.any(np.asarray(x)) for x in moments)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    # bf16 keeps 8 significant bits: spacing 2^-8 ≈ 0.4%, and every matmul output (logits included) is
    # rounded to it. Measured on CPU: 8.8307 (bf16) vs 8.8581 (fp32), 0.31%; the bound is 1% (2.5
    # spacings). The fp32 loss is CE 6.59 + 0.3·MTP 6.38 + 0.1·balance 3.59: dropping the balance or MTP
    # term, or uniform logits (CE and MTP at ln V = 6.24), each moves it by more than 4%.
    assert float(m["loss"]) == pytest.approx(float(want), rel=1e-2)


@pytest.mark.parametrize("chunk", [5, 16])
def test_chunked_loss_equals_whole_logits(chunk):
    """loss_chunk projects to the vocabulary a few positions at a time (a chunk that does not divide T,
    and one that is all of it): the same CE and MTP CE as the float64 reference of the whole logits'
    test above, and the same gradient as the unchunked loss, every leaf."""
    from r1jax.train.losses import lm_loss

    cfg, params, batch = tiny(), _sharp_params(), _sft_batch(tiny())
    out, (total, aux) = _fp32_forward_and_loss(params, batch)
    loss = lambda p, c: lm_loss(p, batch, cfg, mtp_weight=MTP_W, balance_alpha=ALPHA, loss_chunk=c)  # noqa: E731
    (t_c, aux_c), g_c = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, chunk)
    (t_0, _), g_0 = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, 0)
    ce = (_nll64(out["logits"], batch["targets"]) * batch["loss_mask"]).sum() / batch["loss_mask"].sum()
    assert float(aux_c["ce"]) == pytest.approx(ce, rel=2e-6)
    assert float(aux_c["mtp_ce"]) == pytest.approx(float(aux["mtp_ce"]), rel=2e-6)
    assert float(aux_c["tokens"]) == float(aux["tokens"])
    assert float(t_c) == pytest.approx(float(total), rel=2e-6) and float(t_0) == pytest.approx(float(total), rel=1e-7)
    flat_c, flat_0 = jax.tree_util.tree_leaves_with_path(g_c), jax.tree.leaves(g_0)
    for (path, a), b in zip(flat_c, flat_0):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))
    assert any(float(np.abs(b).max()) > 0 for b in flat_0)


def test_loss_chunk_config_errors():
    from r1jax.errors import ConfigError

    with pytest.raises(ConfigError, match=r"loss_chunk: must be >= 0 \(0: the whole sequence\), got -1"):
        config.load(config.TrainConfig, "configs/train/tiny_sft.yaml", ["loss_chunk=-1"])
    with pytest.raises(ConfigError, match="loss_chunk: distillation compares whole logits"):
        config.load(config.TrainConfig, "configs/train/tiny_sft.yaml",
                    ["loss_chunk=8", "distill.teacher=runs/teacher"])
