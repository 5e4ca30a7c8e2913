"""Logit-level distillation: the mixed KL/CE loss and its gradient against a float64 numpy reference,
alpha=0 against plain SFT, chunked == whole logits, gradient accumulation, a short training run in
which the student moves towards a tiny V3 teacher, and config errors named before any compile."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config
from r1jax.config import DistillConfig
from r1jax.errors import ConfigError
from r1jax.model.params import init_params
from r1jax.train import distill, losses
from r1jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TEACHER_MODEL = ROOT / "configs/model/tiny_v3.yaml"
STUDENT_MODEL = ROOT / "configs/model/tiny_qwen2_student.yaml"


# --------------------------------------------------------------------------- numpy float64 reference


def _log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def reference(s, t, targets, mask, *, alpha, tau, top_k):
    """(loss, d loss / d student logits) in float64, written from the definitions:
    KL = τ² Σ_i p_i (log p_i − log q_i), d/ds = τ (q − p̃) with p̃ the teacher's (top-k) probabilities
    scattered over the vocabulary; CE = lse(s) − s_y, d/ds = softmax(s) − onehot(y)."""
    s, t, m = s.astype(np.float64), t.astype(np.float64), mask.astype(np.float64)
    n = max(m.sum(), 1.0)
    log_q = _log_softmax(s / tau)
    if top_k is None:
        log_p = _log_softmax(t / tau)
        kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
        p_full = np.exp(log_p)
    else:
        ids = np.argsort(-t, axis=-1)[..., :top_k]
        log_p = _log_softmax(np.take_along_axis(t / tau, ids, -1))
        kl = (np.exp(log_p) * (log_p - np.take_along_axis(log_q, ids, -1))).sum(-1)
        p_full = np.zeros_like(t)
        np.put_along_axis(p_full, ids, np.exp(log_p), -1)
    kl = tau**2 * kl
    log_s = _log_softmax(s)
    ce = -np.take_along_axis(log_s, targets[..., None], -1)[..., 0]
    loss = alpha * (kl * m).sum() / n + (1 - alpha) * (ce * m).sum() / n
    onehot = np.eye(s.shape[-1])[targets]
    grad = (alpha * tau * (np.exp(log_q) - p_full) + (1 - alpha) * (np.exp(log_s) - onehot)) * m[..., None] / n
    return loss, grad, (kl * m).sum() / n, (ce * m).sum() / n


def _logits(seed, B=2, T=6, V=13):
    rng = np.random.default_rng(seed)
    s = (3 * rng.standard_normal((B, T, V))).astype(np.float32)
    t = (3 * rng.standard_normal((B, T, V))).astype(np.float32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.7).astype(np.int32)
    mask[0, 0] = 1
    return s, t, targets, mask


def test_reference_gradient_matches_finite_differences():
    s, t, y, m = _logits(0)
    s = s.astype(np.float64)
    for top_k, tau, alpha in [(None, 2.0, 0.5), (4, 0.7, 0.8)]:
        _, grad, _, _ = reference(s, t, y, m, alpha=alpha, tau=tau, top_k=top_k)
        rng = np.random.default_rng(1)
        for _ in range(6):
            idx = tuple(rng.integers(0, d) for d in s.shape)
            e = np.zeros_like(s)
            e[idx] = 1e-6
            up = reference(s + e, t, y, m, alpha=alpha, tau=tau, top_k=top_k)[0]
            down = reference(s - e, t, y, m, alpha=alpha, tau=tau, top_k=top_k)[0]
            assert abs((up - down) / 2e-6 - grad[idx]) < 1e-6


@pytest.mark.parametrize("top_k,tau,alpha", [
    (None, 1.0, 0.5), (None, 1.0, 0.0), (None, 1.0, 1.0), (None, 2.5, 0.5),
    (5, 1.0, 0.5), (3, 0.7, 1.0), (4, 2.0, 0.0), (4, 2.0, 0.5), (1, 3.0, 0.5),
])
def test_loss_and_gradient_match_float64_numpy(top_k, tau, alpha):
    s, t, y, m = _logits(int(100 * tau + 10 * alpha) + (top_k or 0))
    want, want_grad, want_kl, want_ce = reference(s, t, y, m, alpha=alpha, tau=tau, top_k=top_k)
    f = jax.jit(jax.value_and_grad(
        lambda x: distill.token_loss(x, jnp.asarray(t), y, m, alpha=alpha, temperature=tau, top_k=top_k),
        has_aux=True))
    (loss, aux), grad = f(jnp.asarray(s))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux["kl"]), want_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(aux["ce"]), want_ce, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-6)
    agree = (s.argmax(-1) == t.argmax(-1)) * m
    np.testing.assert_allclose(float(aux["top1_agreement"]), agree.sum() / m.sum(), rtol=1e-6)
    assert float(aux["tokens"]) == m.sum()


def test_kl_is_zero_for_the_teachers_own_logits():
    s, _, y, m = _logits(3)
    for top_k in (None, 4):
        kl = distill.forward_kl(jnp.asarray(s), jnp.asarray(s), temperature=1.7, top_k=top_k)
        # Top-k: p renormalised over K vs q over V, so KL = −log Σ_K q >= 0, and 0 only without truncation.
        if top_k is None:
            np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-5)
        else:
            assert (np.asarray(kl) > 0).all()


# --------------------------------------------------------------------------- the model-level loss


def _student(**kw):
    return config.load_model(STUDENT_MODEL, [f"{k}={v}" for k, v in kw.items()])


def _teacher(**kw):
    return config.load_model(TEACHER_MODEL, [f"{k}={v}" for k, v in kw.items()])


def _batch(V, B=4, T=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, V, (B, T + 1)).astype(np.int32)
    mask = (rng.random((B, T)) < 0.6).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "segment_ids": np.ones((B, T), np.int32), "positions": np.broadcast_to(np.arange(T), (B, T)).copy()}


def test_alpha_zero_is_sft_and_chunks_equal_whole_logits():
    from r1jax import model

    cfg, tcfg = _student(), _teacher()
    params, tparams = init_params(cfg, jax.random.key(0)), init_params(tcfg, jax.random.key(1))
    batch = _batch(cfg.vocab_size)
    kw = dict(mtp_weight=0.0, balance_alpha=0.0)

    def both(p, dcfg):
        feats = distill.teacher_features(tparams, batch, tcfg)
        return jax.value_and_grad(distill.distill_loss, has_aux=True)(p, batch, feats, cfg, tcfg, dcfg, **kw)

    sft = jax.jit(lambda p: jax.value_and_grad(losses.lm_loss, has_aux=True)(p, batch, cfg, **kw))
    (l_sft, _), g_sft = sft(params)
    (l0, aux0), g0 = jax.jit(lambda p: both(p, DistillConfig("t", alpha=0.0, logit_chunk=5)))(params)
    np.testing.assert_allclose(float(l0), float(l_sft), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7),
                 g0, g_sft)

    # Chunks of 5 over 16 positions (padded) == the whole [B,T,V] logits of both models at once.
    dcfg = DistillConfig("t", alpha=0.3, temperature=2.0, top_k=7, logit_chunk=5)
    (l_c, aux_c), g_c = jax.jit(lambda p: both(p, dcfg))(params)

    def whole(p):
        s = model.apply(p, batch["inputs"], cfg, batch["positions"], batch["segment_ids"])["logits"]
        t = model.apply(tparams, batch["inputs"], tcfg, batch["positions"], batch["segment_ids"])["logits"]
        return distill.token_loss(s, t, batch["targets"], batch["loss_mask"], alpha=0.3, temperature=2.0, top_k=7)

    (l_w, aux_w), g_w = jax.jit(jax.value_and_grad(whole, has_aux=True))(params)
    np.testing.assert_allclose(float(l_c), float(l_w), rtol=1e-5)
    for k in ("ce", "kl", "top1_agreement", "tokens"):
        np.testing.assert_allclose(float(aux_c[k]), float(aux_w[k]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 g_c, g_w)


def test_moe_student_keeps_its_mtp_and_balance_terms():
    """A V3 student: at alpha=0 the distillation loss is lm_loss, MTP and balance loss included."""
    cfg, tcfg = _teacher(), _student()
    params, tparams = init_params(cfg, jax.random.key(0)), init_params(tcfg, jax.random.key(1))
    batch = _batch(cfg.vocab_size, B=2, T=12)
    kw = dict(mtp_weight=0.3, balance_alpha=1e-2)
    _, want = jax.jit(lambda p: losses.lm_loss(p, batch, cfg, **kw))(params)
    feats = distill.teacher_features(tparams, batch, tcfg)
    _, got = jax.jit(lambda p: distill.distill_loss(p, batch, feats, cfg, tcfg, DistillConfig("t", alpha=0.0),
                                                    **kw))(params)
    for k in ("loss", "ce", "mtp_ce", "balance_loss"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got["moe"]["load"]), np.asarray(want["moe"]["load"]))


def test_gradient_accumulation_equals_one_big_batch():
    from r1jax.train.step import StepOptions, grads_and_aux

    cfg, tcfg = _student(), _teacher()
    params, tparams = init_params(cfg, jax.random.key(0)), init_params(tcfg, jax.random.key(1))
    batch = _batch(cfg.vocab_size, B=4, T=8)
    dcfg = DistillConfig("t", alpha=0.6, temperature=1.5, top_k=16)
    out = {}
    for a in (1, 2):
        opts = StepOptions(mtp_weight=0.0, balance_alpha=0.0, bias_rate=0.0, grad_accum_steps=a, distill=dcfg)
        out[a] = jax.jit(lambda p, t, o=opts: grads_and_aux(p, batch, cfg, o, t, tcfg))(params, tparams)
    for k in ("loss", "ce", "kl", "top1_agreement", "tokens"):
        np.testing.assert_allclose(float(out[2][1][k]), float(out[1][1][k]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7),
                 out[2][0], out[1][0])


# --------------------------------------------------------------------------- the training loop


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A randomly initialised tiny V3 teacher saved as an r1jax model checkpoint."""
    from r1jax.api import save_pretrained

    tcfg = _teacher()
    params = init_params(tcfg, jax.random.key(7))
    return str(save_pretrained(tmp_path_factory.mktemp("teacher") / "model", tcfg, params, format="orbax"))


def _write_config(tmp_path, distill_block: str | None, stage="sft", data_kind="sft", mesh="{}") -> Path:
    text = f"""
stage: {stage}
mesh: {mesh}
model: {STUDENT_MODEL}
out_dir: {tmp_path / 'run'}
steps: 20
log_every: 1
progress: false
data: {{kind: {data_kind}, sources: ["task:train"], seq_len: 64, batch_size: 8, num_epochs: null}}
optimizer: {{learning_rate: 3.0e-3, warmup_steps: 2, weight_decay: 0.0}}
checkpoint: {{save_interval_steps: 10, max_to_keep: 1, async_save: false}}
"""
    if distill_block is not None:
        text += f"distill: {distill_block}\n"
    path = tmp_path / "distill.yaml"
    path.write_text(text)
    return path


def test_training_moves_the_student_towards_the_teacher(tmp_path, teacher_dir):
    from r1jax.checkpoint.orbax_io import load_model
    from r1jax.train.loop import train

    # Over 8 devices: the teacher's experts and both models' params split by the same rules as the student's.
    path = _write_config(tmp_path, f"{{teacher: {teacher_dir}, alpha: 0.9, temperature: 2.0, top_k: 32}}",
                         mesh="{data: 2, fsdp: 2, expert: 2}")
    cfg = config.load_stage(path)
    assert cfg.distill == DistillConfig(teacher_dir, alpha=0.9, temperature=2.0, top_k=32)
    result = train(cfg)
    assert result.status == "completed" and result.step == 20
    rows = read_metrics(cfg.out_dir)
    for key in ("loss", "loss/ce", "loss/kl", "distill/top1_agreement", "grad_norm"):
        assert key in rows[-1], key
    kl = [r["loss/kl"] for r in rows]
    assert np.mean(kl[-3:]) < 0.9 * np.mean(kl[:3]), kl
    agree = [r["distill/top1_agreement"] for r in rows]
    assert np.mean(agree[-3:]) > np.mean(agree[:3]), agree
    # The checkpoint holds the student alone; the run's config.yaml round-trips the distill block.
    student_cfg, params = load_model(Path(cfg.out_dir) / "checkpoints")
    assert student_cfg == cfg.model and set(params) == set(init_params(cfg.model, jax.random.key(0)))
    assert config.load_stage(Path(cfg.out_dir) / "config.yaml").distill == cfg.distill
    assert json.loads((Path(cfg.out_dir) / "result.json").read_text())["status"] == "completed"


def test_teacher_loads_from_orbax_or_hf_into_the_runs_shardings(tmp_path, teacher_dir):
    from r1jax.api import load_pretrained, save_pretrained
    from r1jax.config import MeshConfig
    from r1jax.parallel import mesh as mesh_lib
    from r1jax.model import sharding
    from r1jax.parallel import rules as rules_lib
    from r1jax.train.loop import load_teacher, teacher_config

    mesh_cfg = MeshConfig(data=2, fsdp=2, expert=2)
    mesh = mesh_lib.build_mesh(mesh_cfg)
    tcfg, want = load_pretrained(teacher_dir)
    hf_dir = save_pretrained(tmp_path / "hf", tcfg, want, format="hf")
    for path in (teacher_dir, hf_dir):
        dcfg = DistillConfig(str(path))
        got_cfg = teacher_config(dcfg, _student(), rules_lib.mesh_sizes(mesh))
        assert got_cfg.vocab_size == tcfg.vocab_size and got_cfg.n_routed_experts == tcfg.n_routed_experts
        shardings = sharding.param_shardings(got_cfg, mesh, mesh_cfg)
        got = load_teacher(dcfg, shardings)
        flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
        flat_sh = dict(jax.tree_util.tree_flatten_with_path(shardings)[0])
        for k, x in jax.tree_util.tree_flatten_with_path(want)[0]:
            if k in flat_got:  # a HF directory carries no MTP module
                np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(x))
                assert flat_got[k].sharding == flat_sh[k]
        assert any(not s.is_fully_replicated for s in flat_sh.values())


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=1.5), r"alpha: must be in \[0, 1\], got 1.5"),
    (dict(alpha=-0.1), r"alpha: must be in \[0, 1\]"),
    (dict(temperature=0.0), r"temperature: must be > 0, got 0.0"),
    (dict(top_k=0), r"top_k: must be null or >= 1, got 0"),
    (dict(logit_chunk=0), r"logit_chunk: must be >= 1"),
    (dict(teacher=""), r"teacher: required"),
])
def test_distill_config_values_are_checked(kw, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(**{"teacher": "t", **kw})


@pytest.mark.parametrize("block,extra,match", [
    ("{teacher: T, alpha: 1.5}", {}, r"^distill.alpha: must be in \[0, 1\], got 1.5"),
    ("{teacher: T, temperature: 0}", {}, r"^distill.temperature: must be > 0"),
    ("{alpha: 0.5}", {}, r"^distill.teacher"),  # no teacher
    ("{teacher: T}", dict(stage="pretrain", data_kind="pretrain"), r"distill: .*only with stage 'sft'"),
])
def test_bad_distill_yaml_is_named(tmp_path, block, extra, match):
    with pytest.raises(ConfigError, match=match):
        config.load_stage(_write_config(tmp_path, block.replace("T", "x"), **extra))


@pytest.mark.parametrize("overrides,teacher,match", [
    ([], "missing", r"distill.teacher: .*missing does not exist"),
    (["model.vocab_size=300"], None, r"distill.teacher: vocab_size 512 of .* differs from the student's 300"),
    (["distill.top_k=513"], None, r"distill.top_k: 513 is larger than the vocabulary \(512\)"),
])
def test_bad_teacher_is_named_before_compiling(tmp_path, teacher_dir, monkeypatch, overrides, teacher, match):
    import r1jax.train.loop as loop

    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: pytest.fail("compiled"))
    path = _write_config(tmp_path, f"{{teacher: {tmp_path / teacher if teacher else teacher_dir}}}")
    with pytest.raises(ConfigError, match=match):
        loop.train(config.load_stage(path, overrides))
