"""attention_impl: the blockwise online-softmax attention (model/flash.py, "chunked") against a numpy
float64 reference and against the materialized "dot" path it replaces: the kernel, MLA and GQA
attention, whole tiny models (logits and parameter gradients), the sampler's prefill, the memory XLA
plans for forward+backward at T = 8192, and the config field.

Block sizes are small here (8 queries × 16 keys; the kernel tests also the reverse) so that a 37-token
row spans several blocks, none of them full at the end.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r1jax import config
from r1jax.config import DenseConfig, ModelConfig
from r1jax.errors import ConfigError
from r1jax.infer import sampler
from r1jax.model import apply, attention, dense, flash, rope
from r1jax.model import params as P

T = 37  # not a multiple of any block below
# Two rows: three packed segments then padding (segment 0); one segment over the whole row.
SEGMENTS = np.array([[1] * 9 + [2] * 13 + [3] * 8 + [0] * 7, [5] * T], np.int32)


BLOCKS = [(8, 16), (16, 8)]  # (block_q, block_k), the kernel tests run both


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """The configured "chunked" entry with 8 × 16 blocks (blockwise() reads the table at each call);
    returns the list of its calls' query shapes, so a test can see the model really ran it."""
    calls = []

    def chunked(q, *args, heads=None):
        calls.append(jax.tree.map(jnp.shape, q))
        return flash.chunked(q, *args, block_q=8, block_k=16)

    monkeypatch.setitem(flash.IMPLEMENTATIONS, "chunked", chunked)
    return calls


def _tiny(name, **kw):
    return config.load_model(f"configs/model/{name}.yaml").replace(**kw)


def _np_attention(q, k, v, q_seg, k_seg, scale):
    """float64 numpy: q [B,T,G,J,K], k [B,S,G,K], v [B,S,G,V] -> [B,T,G,J,V], mask as attention.mask,
    masked scores replaced by -1e30 before the softmax (so a row with no visible key averages all)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    s = np.einsum("btgjk,bsgk->btgjs", q, k) * scale
    Tq, S = q.shape[1], k.shape[1]
    keep = (np.arange(Tq)[:, None] >= np.arange(S)[None, :])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    s = np.where(keep[:, :, None, None, :], s, -1e30)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("btgjs,bsgv->btgjv", w, v)


def _gqa_inputs(B=2, G=2, J=3, K=8, V=6, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, G, J, K))
    k = jax.random.normal(ks[1], (B, T, G, K))
    v = jax.random.normal(ks[2], (B, T, G, V))
    return q, k, v, jax.random.normal(ks[3], (B, T, G * J, V))


def _dot(q, k, v, q_seg, k_seg, scale):
    """The materialized form of the callers (`dense.attend`'s mask, where, softmax), in the cache layout."""
    kv, n = {"k": k, "v": v}, q.shape[1]
    keep = (jnp.arange(n)[:, None] >= jnp.arange(n)[None, :])[None] & (q_seg[:, :, None] == k_seg[:, None, :])
    s = jnp.where(keep[:, :, None, :], dense.scores(q, kv) * scale, attention.NEG_INF)
    return dense.mix(jax.nn.softmax(s, axis=-1), kv)


def _chunked(q, k, v, q_seg, k_seg, scale, blocks):
    return flash.chunked(q, {"k": k, "v": v}, dense.scores, dense.mix, q_seg, k_seg, scale, *blocks)


def _grads(f, q, k, v, ct, *args):
    return jax.grad(lambda q, k, v: jnp.sum(f(q, k, v, *args) * ct), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("blocks", BLOCKS)
def test_kernel_matches_float64_and_dot_forward_and_gradient(blocks):
    """GQA (3 query heads per kv head), K ≠ V, packed segments + padding, T not a multiple of a block."""
    q, k, v, ct = _gqa_inputs()
    seg = jnp.asarray(SEGMENTS)
    out = _chunked(q, k, v, seg, seg, 0.3, blocks)
    ref = _np_attention(q, k, v, SEGMENTS, SEGMENTS, 0.3).reshape(out.shape)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out, _dot(q, k, v, seg, seg, 0.3), atol=1e-5, rtol=0)
    for name, a, b in zip("qkv", _grads(_chunked, q, k, v, ct, seg, seg, 0.3, blocks),
                          _grads(_dot, q, k, v, ct, seg, seg, 0.3)):
        assert float(jnp.abs(b).max()) > 0.1, name  # a gradient that is there to compare
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.parametrize("blocks", BLOCKS)
def test_rows_without_a_visible_key_match_dot(blocks):
    """The sampler's prefill masks keys only (queries are all segment 1): a row whose valid keys are none
    (row 1: no valid key at all; row 0: keys valid from position 20 on, so queries 0..19 see nothing)
    gets dot's uniform average over all keys, forward and backward, on the whole output."""
    q, k, v, ct = _gqa_inputs(seed=1)
    q_seg = jnp.ones((2, T), jnp.int32)
    k_seg = jnp.asarray(np.stack([np.arange(T) >= 20, np.zeros(T, bool)]).astype(np.int32))
    out = _chunked(q, k, v, q_seg, k_seg, 0.5, blocks)
    ref = _np_attention(q, k, v, np.asarray(q_seg), np.asarray(k_seg), 0.5).reshape(out.shape)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    # Those rows really are the mean of v over all keys (not over the key blocks the causal loop visits).
    np.testing.assert_allclose(out[1, 0], jnp.repeat(v[1].mean(0), 3, axis=0), atol=1e-6)
    for name, a, b in zip("qkv", _grads(_chunked, q, k, v, ct, q_seg, k_seg, 0.5, blocks),
                          _grads(_dot, q, k, v, ct, q_seg, k_seg, 0.5)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


def test_chunked_needs_one_sequence():
    """Causal by index means queries and keys are the same positions; anything else is refused."""
    q, k, v, _ = _gqa_inputs()
    seg = jnp.asarray(SEGMENTS)
    with pytest.raises(ValueError, match="T=37, S=30"):
        flash.chunked(q, {"k": k[:, :30], "v": v[:, :30]}, dense.scores, dense.mix, seg, seg[:, :30], 0.3)


def _positions():
    """Rope positions restarting at each segment of SEGMENTS (as packing writes them)."""
    return jnp.asarray(np.stack([np.concatenate([np.arange(n) for n in (9, 13, 8, 7)]), np.arange(T)]))


def _mla_inputs(cfg, seed=0):
    params = P.init_params(cfg, jax.random.PRNGKey(seed))
    p = jax.tree.map(lambda a: a[0], params["dense_layers"]["attn"])
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, T, cfg.hidden_size))
    return p, x, _positions()


def test_mla_attention_chunked_equals_dot(small_blocks):
    """attention.attend on tiny V3 (YaRN: the mscale² softmax scale; K = 32 ≠ V = 16), packed rows:
    output and gradients w.r.t. the input and every attention parameter."""
    dot_cfg = _tiny("tiny_v3")
    assert dot_cfg.rope_type == "yarn" and rope.softmax_scale(dot_cfg) != dot_cfg.qk_head_dim ** -0.5
    assert dot_cfg.qk_head_dim != dot_cfg.v_head_dim
    p, x, positions = _mla_inputs(dot_cfg)
    seg = jnp.asarray(SEGMENTS)
    results = {}
    for impl in ("dot", "chunked"):
        cfg = dot_cfg.replace(attention_impl=impl)
        f = lambda p, x: attention.attend(p, x, positions, seg, cfg)  # noqa: E731
        ct = jax.random.normal(jax.random.PRNGKey(7), x.shape)
        results[impl] = jax.jit(lambda p, x: (f(p, x), jax.grad(lambda p, x: jnp.sum(f(p, x) * ct),
                                                                  argnums=(0, 1))(p, x)))(p, x)
    assert small_blocks  # the chunked run went through the table
    (y_dot, g_dot), (y_ch, g_ch) = results["dot"], results["chunked"]
    np.testing.assert_allclose(y_ch, y_dot, atol=1e-5, rtol=0)
    flat_dot, flat_ch = jax.tree_util.tree_leaves_with_path(g_dot), jax.tree.leaves(g_ch)
    for (path, a), b in zip(flat_dot, flat_ch):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def _loss(params, tokens, seg, positions, cfg):
    """Next-token cross-entropy within segments (the packed rows' loss), mean over the counted positions."""
    logits = apply(params, tokens, cfg, positions, seg, with_mtp=False)["logits"]
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    counted = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    return jnp.sum(nll * counted) / jnp.sum(counted)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny_v3", "tiny_qwen2_student"])
def test_whole_model_chunked_equals_dot(name, small_blocks):
    """r1jax.model.apply (logits, padding rows included) and the loss's gradient w.r.t. every parameter."""
    dot_cfg = _tiny(name)
    params = P.init_params(dot_cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, T), 3, dot_cfg.vocab_size)
    seg = jnp.asarray(SEGMENTS)
    positions = _positions()
    out = {}
    for impl in ("dot", "chunked"):
        cfg = dot_cfg.replace(attention_impl=impl)
        out[impl] = jax.jit(lambda p: (apply(p, tokens, cfg, positions, seg)["logits"],
                                       jax.grad(_loss)(p, tokens, seg, positions, cfg)))(params)
    assert small_blocks  # the chunked run went through the table (a scanned stack traces its layer once)
    np.testing.assert_allclose(out["chunked"][0], out["dot"][0], atol=1e-5, rtol=0)
    leaves = jax.tree_util.tree_leaves_with_path(out["dot"][1])
    assert len(leaves) > 10
    for (path, a), b in zip(leaves, jax.tree.leaves(out["chunked"][1])):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def sample_both(name, cache, impl):
    """Greedy samples of three ragged prompts in a 32-slot bucket with prefill `dot` and `impl`: {impl: result}."""
    dot_cfg = _tiny(name)
    params = P.init_params(dot_cfg, jax.random.PRNGKey(3))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, dot_cfg.vocab_size, n)) for n in (5, 19, 30)]
    return {i: sampler.sample(params, dot_cfg.replace(attention_impl=i), prompts, max_new_tokens=6, temperature=0.0,
                              cache=cache, bucket=32, return_logits=True) for i in ("dot", impl)}


@pytest.mark.parametrize("name,cache", [pytest.param("tiny_v3", "latent", marks=pytest.mark.slow),
                                        pytest.param("tiny_v3", "expanded", marks=pytest.mark.slow),
                                        ("tiny_qwen2_student", None)])
def test_sampler_chunked_prefill_same_greedy_tokens(name, cache, small_blocks):
    """Ragged prompts in a 32-slot bucket (several blocks, padding keys masked): the same greedy tokens,
    and every step's logits to 1e-5, whether the prefill is dot or chunked."""
    runs = sample_both(name, cache, "chunked")
    assert small_blocks  # the prefill ran the chunked entry (decode steps keep the cache's own form)
    np.testing.assert_array_equal(runs["chunked"].tokens, runs["dot"].tokens)
    np.testing.assert_allclose(runs["chunked"].logits, runs["dot"].logits, atol=1e-5, rtol=0)
    assert len(set(map(tuple, runs["dot"].tokens.tolist()))) > 1  # rows differ: the prompts matter


def _peak_bytes(f, *args) -> tuple[int, int]:
    """XLA's compiled plan on CPU: (temp buffers, temp + arguments + outputs) in bytes."""
    m = jax.jit(f).lower(*args).compile().memory_analysis()
    return m.temp_size_in_bytes, m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def test_memory_linear_at_8192():
    """Forward+backward at T = 8192 (one row, 2 heads, K = 16, V = 8): chunked (default 512 blocks)
    plans under a quarter of dot's memory (dot's [1,2,T,T] f32 scores alone are 512 MiB)."""
    n = 8192
    q = jax.ShapeDtypeStruct((1, n, 2, 1, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((1, n, 2, 16), jnp.float32)
    v = jax.ShapeDtypeStruct((1, n, 2, 8), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, n), jnp.int32)
    ct = jax.ShapeDtypeStruct((1, n, 2, 8), jnp.float32)

    def fwd_bwd(attn):
        def f(q, k, v, seg, ct):
            return jax.value_and_grad(
                lambda q, k, v: jnp.sum(attn(q, {"k": k, "v": v}, seg) * ct), argnums=(0, 1, 2))(q, k, v)
        return f

    def dot(q, kv, seg):
        keep = (jnp.arange(n)[:, None] >= jnp.arange(n)[None, :])[None] & (seg[:, :, None] == seg[:, None, :])
        s = jnp.where(keep[:, :, None, :], dense.scores(q, kv) * 0.25, attention.NEG_INF)
        return dense.mix(jax.nn.softmax(s, axis=-1), kv)

    chunked = lambda q, kv, seg: flash.chunked(q, kv, dense.scores, dense.mix, seg, seg, 0.25)  # noqa: E731
    dot_temp, dot_total = _peak_bytes(fwd_bwd(dot), q, k, v, seg, ct)
    ch_temp, ch_total = _peak_bytes(fwd_bwd(chunked), q, k, v, seg, ct)
    print(f"T=8192 fwd+bwd, temp+args+outputs: dot {dot_total / 2**20:.1f} MiB (temp {dot_temp / 2**20:.1f}), "
          f"chunked {ch_total / 2**20:.1f} MiB (temp {ch_temp / 2**20:.1f})")
    assert dot_total > 4 * ch_total
    assert dot_total > 512 * 2**20  # the reference does hold the T×T scores


def test_config_field(tmp_path):
    """attention_impl: default dot, set from YAML or an override, checked, never written to config.json."""
    assert ModelConfig().attention_impl == "dot" and DenseConfig().attention_impl == "dot"
    assert config.load_model("configs/model/tiny_v3.yaml", ["attention_impl=chunked"]).attention_impl == "chunked"
    yaml = tmp_path / "m.yaml"
    yaml.write_text("model_type: qwen2\nattention_impl: chunked\n")
    cfg = config.load_model(yaml)
    assert isinstance(cfg, DenseConfig) and cfg.attention_impl == "chunked"
    assert "attention_impl" not in cfg.to_hf_config()
    assert "attention_impl" not in ModelConfig(attention_impl="chunked").to_hf_config()
    with pytest.raises(ConfigError, match=r"attention_impl: unknown attention implementation 'flash'"):
        config.load_model("configs/model/tiny_v3.yaml", ["attention_impl=flash"])
    with pytest.raises(ConfigError, match="attention_impl"):
        DenseConfig(attention_impl="pallas")
    assert DenseConfig(attention_impl="splash").attention_impl == "splash"
