"""attention_impl's fused kernels (model/kernels.py) against the materialized `dot` path and numpy float64:
"splash" (jax's Pallas TPU kernel) run in Pallas' interpreter, and "cudnn" (jax.nn.dot_product_attention)
run with implementation="xla" — the same layout, mask, padding and scale, XLA in place of cuDNN, which
needs an NVIDIA GPU. Forward and gradient at the chunked tests' 1e-5, with packed segments and padding;
MLA with YaRN and K ≠ V; the sampler's prefill; per-shard runs on a mesh; the refusals; "auto"; and the
splash train step compiled by XLA:TPU (libtpu) against dot's memory.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention_impl import (SEGMENTS, T, _dot, _gqa_inputs, _grads, _mla_inputs, _np_attention, _tiny,
                                 sample_both)
from test_tpu_compile import _devices, needs_libtpu

from r1jax.config import MeshConfig
from r1jax.errors import ConfigError
from r1jax.model import attention, dense, flash, kernels, rope
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import rules as rules_lib

# The table's entries as they run here: splash interpreted, the cuDNN wrapper through XLA.
ON_CPU = {"splash": functools.partial(kernels.splash, interpret=True),
          "cudnn": functools.partial(kernels.cudnn, implementation="xla")}


@pytest.fixture
def on_cpu(monkeypatch):
    """flash.IMPLEMENTATIONS' splash and cudnn replaced by their CPU forms; returns the list of the calls'
    plain query shapes, so a test can see the model really ran a kernel."""
    calls = []

    def entry(name):
        def run(q, kv, *args, heads, **kw):
            calls.append((name, jax.eval_shape(heads, q, kv)[0].shape))
            return ON_CPU[name](q, kv, *args, heads=heads, **kw)
        return run

    for name in ON_CPU:
        monkeypatch.setitem(flash.IMPLEMENTATIONS, name, entry(name))
    return calls


def _fused(name, **kw):
    def f(q, k, v, q_seg, k_seg, scale):
        return ON_CPU[name](q, {"k": k, "v": v}, dense.scores, dense.mix, q_seg, k_seg, scale, heads=dense.heads,
                            **kw)
    return f


@pytest.mark.parametrize("name", ["splash", "cudnn"])
def test_kernel_matches_float64_and_dot_forward_and_gradient(name):
    """GQA (3 query heads per kv head), K ≠ V, packed segments + padding, T = 37 (splash pads it to one
    128-row block, the cuDNN wrapper to 38)."""
    q, k, v, ct = _gqa_inputs()
    seg = jnp.asarray(SEGMENTS)
    f = jax.jit(_fused(name), static_argnums=5)
    out = f(q, k, v, seg, seg, 0.3)
    assert out.shape == (2, T, 6, 6)
    ref = _np_attention(q, k, v, SEGMENTS, SEGMENTS, 0.3).reshape(out.shape)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out, _dot(q, k, v, seg, seg, 0.3), atol=1e-5, rtol=0)
    grads = jax.jit(lambda *a: _grads(_fused(name), *a, seg, seg, 0.3))(q, k, v, ct)
    for n, a, b in zip("qkv", grads, _grads(_dot, q, k, v, ct, seg, seg, 0.3)):
        assert float(jnp.abs(b).max()) > 0.1, n
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=n)


def test_splash_over_several_blocks():
    """T = 300 in 128-row blocks (3 × 3, the last partial; blocks above the diagonal skipped), a segment
    boundary inside a block and one on a block edge: forward and gradient against float64 numpy."""
    n = 300
    segs = np.array([[1] * 128 + [2] * 100 + [3] * 50 + [0] * 22, [4] * n], np.int32)
    ks = jax.random.split(jax.random.PRNGKey(5), 4)
    q, k = jax.random.normal(ks[0], (2, n, 1, 2, 8)), jax.random.normal(ks[1], (2, n, 1, 8))
    v, ct = jax.random.normal(ks[2], (2, n, 1, 4)), jax.random.normal(ks[3], (2, n, 2, 4))
    seg = jnp.asarray(segs)
    f = _fused("splash", block=128)
    out = jax.jit(f, static_argnums=5)(q, k, v, seg, seg, 0.35)
    np.testing.assert_allclose(out, _np_attention(q, k, v, segs, segs, 0.35).reshape(out.shape), atol=1e-5, rtol=0)
    grads = jax.jit(lambda *a: _grads(f, *a, seg, seg, 0.35))(q, k, v, ct)
    for name, a, b in zip("qkv", grads, _grads(_dot, q, k, v, ct, seg, seg, 0.35)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("name", ["splash", "cudnn"])
def test_bfloat16_as_accurate_as_dot_in_bfloat16(name):
    """bf16 q, k, v: the kernel's distance to the float64 attention of the same bf16 inputs is at most
    the bf16 `dot` path's plus, for splash, what rounding q·scale to bf16 (its only way to take a scale)
    moves the float64 result. Measured: splash 0.00825, dot 0.00815, that rounding 0.0053."""
    q, k, v, _ = _gqa_inputs()
    seg = jnp.asarray(SEGMENTS)
    bf = [a.astype(jnp.bfloat16) for a in (q, k, v)]
    ref = _np_attention(*bf, SEGMENTS, SEGMENTS, 0.3).reshape(2, T, 6, 6)
    slack = 0.0
    if name == "splash":
        prescaled = _np_attention((bf[0] * jnp.asarray(0.3, jnp.bfloat16)), *bf[1:], SEGMENTS, SEGMENTS, 1.0)
        slack = float(np.abs(prescaled.reshape(ref.shape) - ref).max())
    out = jax.jit(_fused(name), static_argnums=5)(*bf, seg, seg, 0.3)
    assert out.dtype == jnp.bfloat16
    err, dot_err = (float(np.abs(np.asarray(x, np.float64) - ref).max()) for x in (out, _dot(*bf, seg, seg, 0.3)))
    print(f"bf16 {name}: max error {err:.5f}, dot {dot_err:.5f}, q·scale rounding {slack:.5f}")
    assert 0 < err <= dot_err + slack, (err, dot_err, slack)


@pytest.mark.parametrize("name", ["splash", "cudnn"])
def test_padding_queries_are_finite_and_valid_rows_match_dot(name):
    """The sampler's prefill form (queries all segment 1, keys valid from position 20 in row 0, none in
    row 1): every valid query's output and gradient equal dot's; the padding queries, which see no key
    under dot, attend the padding before them instead (kernels.py) — finite, forward and backward."""
    q, k, v, ct = _gqa_inputs(seed=1)
    q_seg = jnp.ones((2, T), jnp.int32)
    valid = np.stack([np.arange(T) >= 20, np.zeros(T, bool)])
    k_seg = jnp.asarray(valid.astype(np.int32))
    out = jax.jit(_fused(name), static_argnums=5)(q, k, v, q_seg, k_seg, 0.5)
    assert bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(out[0, 20:], _dot(q, k, v, q_seg, k_seg, 0.5)[0, 20:], atol=1e-5, rtol=0)
    # A padding query now averages v over the padding keys up to itself: row 1's first query reads key 0.
    np.testing.assert_allclose(out[1, 0], jnp.repeat(v[1, 0], 3, axis=0), atol=1e-6)
    ct = ct * jnp.asarray(valid)[:, :, None, None]  # the loss reads valid rows only, as the sampler does
    grads = jax.jit(lambda *a: _grads(_fused(name), *a, q_seg, k_seg, 0.5))(q, k, v, ct)
    for n, a, b in zip("qkv", grads, _grads(_dot, q, k, v, ct, q_seg, k_seg, 0.5)):
        assert bool(jnp.isfinite(a).all()), n
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=n)


@pytest.mark.parametrize("name", ["splash", "cudnn"])
def test_mla_attention_equals_dot(name, on_cpu):
    """attention.attend on tiny V3 through the table (YaRN: the mscale² softmax scale; K = 32 ≠ V = 16,
    so the cuDNN wrapper zero-pads v to 32), packed rows: output and gradients w.r.t. the input and every
    attention parameter."""
    dot_cfg = _tiny("tiny_v3")
    assert dot_cfg.rope_type == "yarn" and rope.softmax_scale(dot_cfg) != dot_cfg.qk_head_dim ** -0.5
    p, x, positions = _mla_inputs(dot_cfg)
    seg = jnp.asarray(SEGMENTS)
    ct = jax.random.normal(jax.random.PRNGKey(7), x.shape)
    results = {}
    for impl in ("dot", name):
        cfg = dot_cfg.replace(attention_impl=impl)
        f = lambda p, x: attention.attend(p, x, positions, seg, cfg)  # noqa: E731
        results[impl] = jax.jit(lambda p, x: (f(p, x), jax.grad(lambda p, x: jnp.sum(f(p, x) * ct),
                                                                  argnums=(0, 1))(p, x)))(p, x)
    assert on_cpu and set(on_cpu) == {(name, (2, T, 4, 32))}  # plain [B,T,H,K] heads, K = nope + rope
    (y_dot, g_dot), (y_k, g_k) = results["dot"], results[name]
    np.testing.assert_allclose(y_k, y_dot, atol=1e-5, rtol=0)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_dot), jax.tree.leaves(g_k)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("model,cache,name,heads", [
    ("tiny_qwen2_student", None, "splash", (3, 32, 4, 16)),
    ("tiny_qwen2_student", None, "cudnn", (3, 32, 4, 16)),
    pytest.param("tiny_v3", "latent", "splash", (3, 32, 4, 48), marks=pytest.mark.slow),
    pytest.param("tiny_v3", "expanded", "cudnn", (3, 32, 4, 32), marks=pytest.mark.slow)])
def test_sampler_prefill_same_greedy_tokens(model, cache, name, heads, on_cpu):
    """Ragged prompts in a 32-slot bucket (left padding: padding queries, masked keys): the same greedy
    tokens, and every step's logits to 1e-5, whether the prefill is dot or the kernel. The latent
    cache's prefill is MQA over [c, k_rope] (K = L + R = 48, V = L = 32)."""
    runs = sample_both(model, cache, name)
    assert (name, heads) in on_cpu  # the prefill ran the kernel (decode steps keep the cache's own form)
    np.testing.assert_array_equal(runs[name].tokens, runs["dot"].tokens)
    np.testing.assert_allclose(runs[name].logits, runs["dot"].logits, atol=1e-5, rtol=0)
    assert len(set(map(tuple, runs["dot"].tokens.tolist()))) > 1


@pytest.mark.parametrize("name", ["splash", "cudnn"])
def test_runs_per_shard_on_a_mesh(name, monkeypatch):
    """On a data=2 × expert=2 × tensor=2 mesh the kernel runs inside shard_map, each device on its row
    (batch over data; expert does not divide the 2 rows twice) and its 3 query heads with their one kv
    head (tensor splits H = 6 and G = 2 alike): the result and gradient equal unsharded dot's."""
    q, k, v, ct = _gqa_inputs()
    seg = jnp.asarray(SEGMENTS)
    mesh_cfg = MeshConfig(data=2, fsdp=1, expert=2, tensor=2)
    mesh = mesh_lib.build_mesh(mesh_cfg, jax.devices()[:8])
    seen = []

    def spy(body):
        def run(*a):
            seen.append([x.shape for x in a])
            return body(*a)
        return run

    real = kernels._per_shard
    monkeypatch.setattr(kernels, "_per_shard", lambda body, *a: real(spy(body), *a))
    fused = _fused(name)
    with rules_lib.sharding_context(mesh, mesh_cfg):
        out, grads = jax.jit(lambda q, k, v, ct: (fused(q, k, v, seg, seg, 0.3),
                                                  _grads(fused, q, k, v, ct, seg, seg, 0.3)))(q, k, v, ct)
    P_ = 128 if name == "splash" else 38  # rows after padding to the kernel's multiple
    assert seen[0] == [(1, P_, 3, 8), (1, P_, 1, 8), (1, P_, 1, 6), (1, P_)]  # one device's share
    np.testing.assert_allclose(out, _dot(q, k, v, seg, seg, 0.3), atol=1e-5, rtol=0)
    for n, a, b in zip("qkv", grads, _grads(_dot, q, k, v, ct, seg, seg, 0.3)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=n)


# --------------------------------------------------------------------------- refusals and "auto"


def test_kernels_refuse_the_wrong_platform_at_trace_time():
    """On this CPU host: the table's splash (not interpreted) and cudnn name the reason, through the model
    too (eval_shape traces, nothing runs)."""
    q, k, v, _ = _gqa_inputs()
    seg = jnp.asarray(SEGMENTS)
    kv = {"k": k, "v": v}
    with pytest.raises(ConfigError, match=r"attention_impl: 'splash' is a Pallas TPU kernel; this computation is "
                                          r"for cpu \(use 'auto'"):
        flash.IMPLEMENTATIONS["splash"](q, kv, dense.scores, dense.mix, seg, seg, 0.3, heads=dense.heads)
    with pytest.raises(ConfigError, match=r"attention_impl: 'cudnn' does not apply: cuDNN's flash attention runs "
                                          r"on NVIDIA GPUs; this computation is for cpu"):
        flash.IMPLEMENTATIONS["cudnn"](q, kv, dense.scores, dense.mix, seg, seg, 0.3, heads=dense.heads)
    cfg = _tiny("tiny_v3", attention_impl="cudnn")
    p, x, positions = _mla_inputs(cfg)
    with pytest.raises(ConfigError, match="'cudnn' does not apply"):
        jax.eval_shape(lambda p, x: attention.attend(p, x, positions, seg, cfg), p, x)


def test_cudnn_constraints_are_named():
    """What cuDNN's flash attention takes (jax's checks): bf16/fp16 and one head dim ≤ 256, a multiple
    of 8 — V3's 192/128 MLA heads fit once v is padded; the latent prefill's 576 does not."""
    bf16 = jnp.bfloat16
    assert kernels.cudnn_unsupported("gpu", bf16, 192, 128) is None
    assert kernels.cudnn_unsupported("gpu", jnp.float16, 128, 128) is None
    assert "takes bfloat16 or float16; the activations are float32" in kernels.cudnn_unsupported(
        "gpu", jnp.float32, 192, 128)
    assert "up to 256, multiples of 8; this attention's is 576 (q·k 576, v 512)" in kernels.cudnn_unsupported(
        "gpu", bf16, 576, 512)
    assert "this attention's is 100" in kernels.cudnn_unsupported("gpu", bf16, 100, 100)
    assert "runs on NVIDIA GPUs; this computation is for tpu" in kernels.cudnn_unsupported("tpu", bf16, 128, 128)


@pytest.mark.parametrize("where,dtype,k_dim,chosen", [
    ("cpu", jnp.float32, 8, "chunked"), ("tpu", jnp.float32, 8, "splash"), ("gpu", jnp.bfloat16, 8, "cudnn"),
    ("gpu", jnp.float32, 8, "chunked"), ("gpu", jnp.bfloat16, 576, "chunked")])
def test_auto_picks_the_platforms_kernel(where, dtype, k_dim, chosen, monkeypatch):
    """auto: splash on TPU, cudnn on a GPU where it applies (fp32 or a 576 head dim falls back), chunked
    elsewhere."""
    picked = []
    for n in ("splash", "cudnn"):
        monkeypatch.setattr(kernels, n, lambda *a, _n=n, **kw: picked.append(_n))
    monkeypatch.setattr(flash, "chunked", lambda *a, **kw: picked.append("chunked"))
    monkeypatch.setattr(kernels, "platform", lambda: where)
    q = jnp.zeros((1, 4, 1, 2, k_dim), dtype)
    kv = {"k": jnp.zeros((1, 4, 1, k_dim), dtype), "v": jnp.zeros((1, 4, 1, 8), dtype)}
    seg = jnp.ones((1, 4), jnp.int32)
    flash.auto(q, kv, dense.scores, dense.mix, seg, seg, 0.5, heads=dense.heads)
    assert picked == [chosen]


def test_auto_on_cpu_is_chunked_bit_for_bit():
    q, k, v, _ = _gqa_inputs()
    seg = jnp.asarray(SEGMENTS)
    kv = {"k": k, "v": v}
    args = (q, kv, dense.scores, dense.mix, seg, seg, 0.3)
    np.testing.assert_array_equal(flash.auto(*args, heads=dense.heads), flash.chunked(*args))


# --------------------------------------------------------------------------- XLA:TPU


@needs_libtpu
@pytest.mark.slow  # two XLA:TPU compiles of the train step (~2 × 40 s unloaded; 2 × 3 min on a busy host)
def test_tiny_v3_train_step_with_splash_compiles_for_v5p_in_less_memory_than_dot():
    """The train step (forward, backward, Adam) of tiny V3 at T = 2048 compiled by XLA:TPU for a v5p
    2x2x1 slice, one row per chip, the Pallas kernel in the program. dot's backward keeps each attention
    layer's [1,4,T,T] fp32 softmax (64 MiB; three decoder layers at least), splash none of them.
    Measured 2026-12-02, temp per chip: dot 766 MiB, splash 215 MiB (399 MiB at T = 4096: linear),
    chunked 152 MiB (splash keeps its log-sum-exp lane-padded to 128, [H,T,128] fp32 per layer)."""
    from r1jax.plan import load_plan_config, lower_step

    temps = {}
    for impl in ("dot", "splash"):
        cfg, _ = load_plan_config("configs/model/tiny_v3.yaml", ["model.moe_dispatch=capacity_ep",
                                                                 f"model.attention_impl={impl}"],
                                  "data=1,fsdp=1,expert=4", seq_len=2048, devices=4)
        mesh = mesh_lib.build_mesh(cfg.mesh, _devices("v5p:2x2x1"))
        compiled = lower_step(cfg, cfg.model, mesh).compile()
        assert ("splash_mha" in compiled.as_text()) == (impl == "splash")
        temps[impl] = compiled.memory_analysis().temp_size_in_bytes
    print(f"tiny V3 train step, T=2048, v5p:2x2x1, temp per chip: dot {temps['dot'] / 2**20:.1f} MiB, "
          f"splash {temps['splash'] / 2**20:.1f} MiB")
    scores = 4 * 2048 * 2048 * 4  # one layer's [1,4,T,T] fp32
    assert temps["dot"] - temps["splash"] >= 3 * scores
