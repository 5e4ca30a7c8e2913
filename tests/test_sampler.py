"""The KV-cache sampler against transformers' generate, against full recomputation without a cache,
and against the distributions its temperature / top-p / top-k define.

Most tests share one compiled loop: batch 3, prompt bucket 8, 8 new tokens, on one tiny V3 model.
"""

from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch

import r1jax
from hf_reference import V2_CONFIGS, V3_CONFIGS, make_hf_model, rel_err, to_r1jax
from r1jax.errors import ConfigError, DataError
from r1jax import sample as sample_command
from r1jax.infer import sampler
from r1jax.infer import tokens as token_choice
from r1jax.model import kv_cache

PROMPTS = [[5, 17, 3, 40, 22], [9, 2, 61], [33, 8, 71, 4, 50, 12, 27]]  # ragged, all in bucket 8
M = 8


# The sampler's second V3 shape, everything the main one (v3_yarn_grouped) lacks in one compile: no
# q compression, the half-split rope layout, attention biases (kv_a_proj_with_mqa feeds the latent
# cache; o_proj follows the folded value projection), YaRN with mscale ≠ mscale_all_dim (attention
# factor ≠ 1), no top-k renormalisation; vocabulary 64.
V3_QPROJ_BIAS = dict(V3_CONFIGS["v3_qproj_plain_rope"], attention_bias=True, max_position_embeddings=256,
                     rope_parameters={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                                      "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5,
                                      "rope_theta": 5000.0})


def _model(kind, name, tmp_path_factory, kwargs=None):
    model = make_hf_model(kind, kwargs or (V3_CONFIGS if kind == "v3" else V2_CONFIGS)[name])
    path = tmp_path_factory.mktemp(name) / "hf"
    cfg, params = to_r1jax(model, path)
    return SimpleNamespace(model=model, cfg=cfg, params=params, dir=path)


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return _model("v3", "v3_yarn_grouped", tmp_path_factory)


@pytest.fixture(scope="module")
def v2(tmp_path_factory):
    return _model("v2", "v2_lite_greedy", tmp_path_factory)


@pytest.fixture(scope="module")
def v3_qproj_bias(tmp_path_factory):
    return _model("v3", "v3_qproj_bias", tmp_path_factory, V3_QPROJ_BIAS)


def prompts_for(m) -> list[list[int]]:
    """PROMPTS folded into the model's vocabulary (unchanged when it holds them)."""
    return [[t % m.cfg.vocab_size for t in p] for p in PROMPTS]


def full_step_logits(m, prompts, tokens) -> list[np.ndarray]:
    """Per row, [M, W] logits of a cache-free forward over prompt + generated tokens at the
    positions that predicted each generated token. One right-padded batch: causal, so the padding
    after a row cannot change its earlier positions."""
    seqs = [list(p) + list(t) for p, t in zip(prompts, tokens)]
    width = max(map(len, seqs))
    batch = np.array([s + [0] * (width - len(s)) for s in seqs], np.int32)
    logits = np.asarray(r1jax.forward(m.params, batch, m.cfg))
    return [logits[b, len(p) - 1 : len(p) - 1 + len(t)] for b, (p, t) in enumerate(zip(prompts, tokens))]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# --------------------------------------------------------------------------- reference parity


@pytest.mark.parametrize("kind", ["v3", "v3_qproj_bias", "v2"])
def test_greedy_generate_matches_transformers(kind, request):
    m = request.getfixturevalue(kind)
    prompts = prompts_for(m)
    out = sampler.generate(m.params, m.cfg, prompts, max_new_tokens=M)
    assert out.dtype == np.int32 and out.shape == (len(prompts), M)
    for b, prompt in enumerate(prompts):  # HF per row, unpadded
        with torch.no_grad():
            ref = m.model.generate(torch.tensor([prompt]), max_new_tokens=M, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
        np.testing.assert_array_equal(out[b], ref[0, len(prompt):].numpy(), err_msg=f"row {b}")


@pytest.mark.parametrize("kind", ["v3", "v3_qproj_bias"])
def test_cached_logits_equal_full_recomputation(kind, request):
    m = request.getfixturevalue(kind)
    # Both caches on the main model, where they must also agree with each other; the default (latent)
    # alone on the second, to keep compiles down.
    modes = ("latent", "expanded") if kind == "v3" else ("latent",)
    prompts = prompts_for(m)
    runs = {mode: sampler.sample(m.params, m.cfg, prompts, max_new_tokens=M, temperature=0.0, cache=mode,
                                 return_logits=True) for mode in modes}
    for mode, out in runs.items():
        ref = full_step_logits(m, prompts, out.tokens)
        for b in range(len(prompts)):
            assert rel_err(out.logits[b], ref[b]) < 1e-5, (mode, b)
            np.testing.assert_array_equal(out.tokens[b], ref[b].argmax(-1))
            np.testing.assert_allclose(out.logprobs[b], _log_softmax(ref[b])[np.arange(M), out.tokens[b]],
                                       atol=1e-5)
    if len(runs) > 1:
        latent, expanded = runs["latent"], runs["expanded"]
        np.testing.assert_array_equal(latent.tokens, expanded.tokens)
        assert rel_err(latent.logits, expanded.logits) < 1e-5


def test_latent_cache_is_kv_lora_plus_rope_per_token(v3):
    cfg = v3.cfg
    per_token = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert kv_cache.cache_bytes_per_token(cfg, "latent") == per_token
    expanded = cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    assert kv_cache.cache_bytes_per_token(cfg, "expanded") == expanded


# --------------------------------------------------------------------------- sampling


def test_sampled_logprobs_match_full_forward_and_seed_is_reproducible(v3):
    kw = dict(max_new_tokens=M, temperature=1.0)
    out = sampler.sample(v3.params, v3.cfg, PROMPTS, seed=3, **kw)
    ref = full_step_logits(v3, PROMPTS, out.tokens)
    for b in range(len(PROMPTS)):
        np.testing.assert_allclose(out.logprobs[b], _log_softmax(ref[b])[np.arange(M), out.tokens[b]], atol=1e-5)
    again = sampler.sample(v3.params, v3.cfg, PROMPTS, seed=3, **kw)
    np.testing.assert_array_equal(out.tokens, again.tokens)
    np.testing.assert_array_equal(out.logprobs, again.logprobs)
    other = sampler.sample(v3.params, v3.cfg, PROMPTS, seed=4, **kw)
    assert (other.tokens != out.tokens).any()
    greedy = sampler.generate(v3.params, v3.cfg, PROMPTS, max_new_tokens=M)
    assert (out.tokens != greedy).any()  # temperature 1 really samples


def test_top_k_1_and_tiny_top_p_are_greedy_in_the_loop(v3):
    greedy = sampler.generate(v3.params, v3.cfg, PROMPTS, max_new_tokens=M)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        out = sampler.sample(v3.params, v3.cfg, PROMPTS, max_new_tokens=M, temperature=0.7, seed=5, **kw)
        np.testing.assert_array_equal(out.tokens, greedy, err_msg=str(kw))
        # Log-probs are of the temperature-scaled policy before truncation (GRPO's π_old), not 0.
        ref = full_step_logits(v3, PROMPTS, out.tokens)
        for b in range(len(PROMPTS)):
            expected = _log_softmax(ref[b] / 0.7)[np.arange(M), out.tokens[b]]
            np.testing.assert_allclose(out.logprobs[b], expected, atol=1e-5)


def expected_distribution(logits, temperature, top_p, top_k) -> np.ndarray:
    """The distribution temperature → top-k → top-p defines, in float64 (transformers' order)."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.argsort(-z, kind="stable")[: top_k or len(z)]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    kept = order[(np.cumsum(p) - p) < top_p]
    q = np.zeros_like(z)
    q[kept] = np.exp(z[kept] - z[kept].max())
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p,top_k", [
    (1.0, 1.0, 0), (0.6, 1.0, 0), (1.3, 1.0, 4), (1.0, 0.7, 0), (0.8, 0.9, 6), (2.0, 0.5, 3),
])
def test_token_choice_follows_the_distribution_it_defines(temperature, top_p, top_k):
    W, N = 12, 20000
    logits = np.random.RandomState(0).normal(0, 1.5, W).astype(np.float32)
    keys = jax.random.split(jax.random.key(42), N)
    choose = jax.jit(token_choice.choose_tokens, static_argnames=("greedy", "truncate"))
    tokens, logp = choose(np.broadcast_to(logits, (N, W)), keys, np.float32(temperature), np.float32(top_p),
                          np.int32(top_k), greedy=False, truncate=top_p < 1 or top_k > 0)
    tokens = np.asarray(tokens)
    q = expected_distribution(logits, temperature, top_p, top_k)
    freq = np.bincount(tokens, minlength=W) / N
    assert np.all(freq[q == 0] == 0), "a truncated token was sampled"
    assert 0.5 * np.abs(freq - q).sum() < 0.02  # TV distance; ≈ 0.008 expected at N = 20000
    np.testing.assert_allclose(np.asarray(logp), _log_softmax(logits / temperature)[tokens], atol=1e-5)


def test_truncation_on_a_hand_built_distribution():
    probs = np.array([[0.05, 0.5, 0.15, 0.3]])
    scaled = np.log(probs).astype(np.float32)
    kept = lambda top_p, top_k: np.isfinite(np.asarray(token_choice.truncate_logits(scaled, top_p, top_k)))[0].tolist()
    assert kept(0.7, 0) == [False, True, False, True]  # 0.5 < 0.7 keeps the 0.3 token, then 0.8 ≥ 0.7
    assert kept(0.4, 0) == [False, True, False, False]
    assert kept(0.9, 0) == [False, True, True, True]
    assert kept(1.0, 2) == [False, True, False, True]
    assert kept(0.6, 3) == [False, True, False, True]  # top-p on the renormalized top-3
    assert kept(1.0, 0) == [True, True, True, True]
    # top-k alone keeps exactly k (rounding in the cumulative mass must not let top_p = 1 keep more).
    logits = np.random.RandomState(1).normal(0, 3, (64, 50)).astype(np.float32)
    for k in (1, 7, 49):
        survivors = np.isfinite(np.asarray(token_choice.truncate_logits(logits, np.float32(1.0), np.int32(k))))
        assert np.all(survivors.sum(-1) == k), k


# --------------------------------------------------------------------------- stopping


def _expected_after_stop(tokens, stops, fill):
    out, lengths = tokens.copy(), []
    for b, row in enumerate(tokens):
        hit = [j for j, t in enumerate(row) if t in stops[b]]
        n = hit[0] + 1 if hit else len(row)
        out[b, n:] = fill
        lengths.append(n)
    return out, np.array(lengths)


def test_eos_and_per_row_stop_ids(v3):
    free = sampler.generate(v3.params, v3.cfg, PROMPTS, max_new_tokens=M)
    eos = int(next(t for j, t in enumerate(free[0]) if j > 0 and t not in free[0][:j]))
    out = sampler.sample(v3.params, v3.cfg, PROMPTS, max_new_tokens=M, temperature=0.0, eos_id=eos)
    expected, lengths = _expected_after_stop(free, [[eos]] * 3, eos)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, lengths)
    np.testing.assert_array_equal(out.finished, lengths < M)
    assert out.finished[0] and out.finish_reasons[0] == "stop"
    assert np.all(out.logprobs[0, lengths[0]:] == 0)
    np.testing.assert_array_equal(sampler.generate(v3.params, v3.cfg, PROMPTS, max_new_tokens=M, eos_id=eos),
                                  expected)

    stops = [[int(free[0][3])], [int(free[1][1])], []]
    out = sampler.sample(v3.params, v3.cfg, PROMPTS, max_new_tokens=M, temperature=0.0, stop_ids=stops)
    expected, lengths = _expected_after_stop(free, stops, v3.cfg.pad_token_id or 0)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.lengths, lengths)
    assert out.finish_reasons == ["stop", "stop", "length"]


def test_capacity_dispatch_samples_dropless(v3):
    """With one slot per expert (capacity 1.25 · 3 rows · 2 / 8 experts), capacity dispatch would drop
    decode tokens; the sampler runs the dropless strategy, so the tokens match ragged dispatch."""
    greedy = sampler.generate(v3.params, v3.cfg, PROMPTS, max_new_tokens=M)
    capped = sampler.generate(v3.params, v3.cfg.replace(moe_dispatch="capacity"), PROMPTS, max_new_tokens=M)
    np.testing.assert_array_equal(capped, greedy)


def test_prompt_array_input_and_bucketing_avoid_recompiles(v3):
    count = lambda: sampler.TRACE_COUNT["generate"]
    a = np.array([[5, 17, 3, 40, 22], [9, 2, 61, 7, 7]], np.int32)  # length 5 -> bucket 8
    before = count()
    first = sampler.generate(v3.params, v3.cfg, a, max_new_tokens=3)
    assert count() == before + 1
    second = sampler.generate(v3.params, v3.cfg, [[1, 2, 3, 4, 5, 6, 7], [8]], max_new_tokens=3)  # still 8
    assert count() == before + 1 and second.shape == (2, 3)
    assert sampler.prompt_bucket(9) == 16 and sampler.prompt_bucket(3) == 8
    again = sampler.generate(v3.params, v3.cfg, [list(r) for r in a], max_new_tokens=3)
    np.testing.assert_array_equal(first, again)
    assert count() == before + 1


# --------------------------------------------------------------------------- mesh


def test_mesh_splits_batch_and_equals_one_device(v3):
    from jax.sharding import Mesh

    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))  # batch over data×fsdp = 4; 3 rows padded to 4
    kw = dict(max_new_tokens=M, temperature=1.0, seed=3)
    one = sampler.sample(v3.params, v3.cfg, PROMPTS, **kw)
    many = sampler.sample(v3.params, v3.cfg, PROMPTS, mesh=mesh, **kw)
    np.testing.assert_array_equal(many.tokens, one.tokens)
    np.testing.assert_allclose(many.logprobs, one.logprobs, atol=1e-5)
    np.testing.assert_array_equal(many.lengths, one.lengths)


def test_expert_parallel_capacity_samples_dropless_on_an_expert_mesh(v3):
    """capacity_ep with too few slots (0.5 · 2 tokens per device · 2 / 8 experts: one slot) would drop
    decode tokens. Under (data=2, expert=4) the rows split over data×expert (3 rows padded to 8), the
    params are split by the rules, and the sampler runs a dropless expert-parallel dispatch: on CPU,
    which has no ragged all-to-all, capacity_ep with every expert able to take every local token."""
    from r1jax.config import MeshConfig
    from r1jax.parallel import mesh as mesh_lib
    from r1jax.model import sharding

    mesh_cfg = MeshConfig(data=2, expert=4)
    mesh = mesh_lib.build_mesh(mesh_cfg)
    assert sampler._batch_axes(mesh, mesh_cfg.rule_pairs()) == ("data", "fsdp", "expert")
    capped = v3.cfg.replace(moe_dispatch="capacity_ep", capacity_factor=0.5)
    on_cpu = sampler.dropless(capped, mesh)
    assert on_cpu.moe_dispatch == "capacity_ep" and on_cpu.capacity_factor == 8 / 2
    assert sampler.DROPLESS["capacity_ep"](capped, "gpu").moe_dispatch == "ragged_ep"
    assert sampler.dropless(v3.cfg.replace(moe_dispatch="capacity"), mesh).moe_dispatch == "auto"

    kw = dict(max_new_tokens=M, temperature=1.0, seed=3)
    one = sampler.sample(v3.params, v3.cfg, PROMPTS, **kw)  # ragged: the dropless reference
    placed = jax.device_put(v3.params, sharding.param_shardings(capped, mesh, mesh_cfg))
    many = sampler.sample(placed, capped, PROMPTS, mesh=mesh, rules=mesh_cfg, **kw)
    np.testing.assert_array_equal(many.tokens, one.tokens)
    np.testing.assert_allclose(many.logprobs, one.logprobs, atol=1e-5)
    # The same rows without a mesh and with the slots as configured drop tokens, so they differ.
    dropping = jax.jit(lambda p, t: r1jax.forward(p, t, capped.replace(moe_dispatch="capacity")))
    full = np.array([p + list(t) for p, t in zip([PROMPTS[1]], one.tokens[1:2])], np.int32)
    assert not np.allclose(dropping(v3.params, full), r1jax.forward(v3.params, full, v3.cfg), atol=1e-4)


# --------------------------------------------------------------------------- files


def _write_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


def test_sample_file_writes_one_row_per_sample(v3, tmp_path):
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(v3.dir, model_dir)
    _write_tokenizer(model_dir, v3.cfg.vocab_size)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt_ids": PROMPTS[0], "id": "a"}) + "\n\n"
                       + json.dumps({"prompt": " ".join(f"w{t}" for t in PROMPTS[1]), "id": "b"}) + "\n")
    out = tmp_path / "out" / "samples.jsonl"
    before = sampler.TRACE_COUNT["generate"]
    n = sample_command.sample_file(model_dir, prompts, out, max_new_tokens=M, temperature=1.0, top_p=1.0, top_k=0,
                                   seed=3, num_samples=2, batch_size=4)
    assert sampler.TRACE_COUNT["generate"] <= before + 1  # one compile for the whole file
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert n == 4 and [(r["id"], r["prompt_index"], r["sample_index"]) for r in rows] == [
        ("a", 0, 0), ("a", 0, 1), ("b", 1, 0), ("b", 1, 1)]
    # Same draws as sample() on the same four rows (row b uses key fold_in(seed, b)); stops at EOS.
    _assert_rows_are_sample_draws(rows, v3, [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2)
    assert all(r["completion"] == " ".join(f"w{t}" for t in r["completion_ids"]) for r in rows)


def _assert_rows_are_sample_draws(rows, v3, prompts):
    """The rows' completions, log-probs and finish reasons are `sampler.sample`'s on the same prompts
    (temperature 1, seed 3: row b draws from fold_in(seed, b)), each stopped at EOS."""
    ref = sampler.sample(v3.params, v3.cfg, prompts, max_new_tokens=M, temperature=1.0, seed=3,
                         eos_id=v3.cfg.eos_token_id)
    for b, r in enumerate(rows):
        n_b = int(ref.lengths[b])
        assert r["completion_ids"] == ref.tokens[b, :n_b].tolist()
        np.testing.assert_allclose(r["logprobs"], ref.logprobs[b, :n_b], atol=1e-6)
        assert r["finish_reason"] == ref.finish_reasons[b]


def test_sample_command_writes_rows_with_a_progress_bar(v3, tmp_path, capsys):
    """`r1jax sample` in-process. The options match the sample_file test above (one compiled loop for
    both); a flag the CLI dropped would change the rows (seed, length) or their number (samples)."""
    import json

    from r1jax.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_ids": p, "tag": t}) + "\n" for p, t in zip(PROMPTS[::2], "xy")))
    out = tmp_path / "samples.jsonl"
    rc = main(["sample", "--ckpt", str(v3.dir), "--prompts", str(prompts), "--out", str(out), "--max-new-tokens",
               str(M), "--temperature", "1.0", "--top-p", "1.0", "--top-k", "0", "--seed", "3", "--num-samples", "2",
               "--batch-size", "4", "--cache", "latent"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"wrote 4 samples to {out}" in captured.out
    assert "sampling" in captured.err and "4/4" in captured.err  # tqdm's bar, on stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["tag"], r["prompt_ids"], r["prompt_index"], r["sample_index"]) for r in rows] == [
        ("x", PROMPTS[0], 0, 0), ("x", PROMPTS[0], 0, 1), ("y", PROMPTS[2], 1, 0), ("y", PROMPTS[2], 1, 1)]
    _assert_rows_are_sample_draws(rows, v3, [PROMPTS[0]] * 2 + [PROMPTS[2]] * 2)
    assert not any("completion" in r for r in rows)  # no tokenizer.json
    assert len({tuple(r["completion_ids"]) for r in rows}) > 1  # really sampled
    rc = main(["sample", "--ckpt", str(v3.dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
               "--top-p", "0"])
    assert rc == 2 and "r1jax sample: error: top_p" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_sample_file_names_bad_rows(v3, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1, 2]}\n{"prompt": "w1 w2"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*no tokenizer.json"):
        sample_command.sample_file(v3.dir, bad, tmp_path / "o.jsonl", max_new_tokens=2, temperature=1.0, top_p=1.0,
                                   top_k=0, seed=0, num_samples=1, batch_size=2)
    bad.write_text('{"prompt_ids": [1, 2]}\n{"prompt_ids": [1, 2.5]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: prompt_ids must be a list of ints"):
        sample_command.sample_file(v3.dir, bad, tmp_path / "o.jsonl", max_new_tokens=2, temperature=1.0, top_p=1.0,
                                   top_k=0, seed=0, num_samples=1, batch_size=2)
    bad.write_text('{"prompt_ids": [1, 2]}\n\n{"prompt_ids": [1, 500]}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: prompt\[1\] = 500 is outside the vocabulary"):
        sample_command.sample_file(v3.dir, bad, tmp_path / "o.jsonl", max_new_tokens=2, temperature=1.0, top_p=1.0,
                                   top_k=0, seed=0, num_samples=1, batch_size=2)
    assert not (tmp_path / "o.jsonl").exists()  # nothing written before the input is known to be good


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(prompts=[[1, 2], []]), DataError, r"prompts\[1\]: empty prompt"),
    (dict(prompts=[]), DataError, "empty batch"),
    (dict(prompts=[[1, 2, 97]]), DataError, r"prompts\[0\]\[2\] = 97 is outside the vocabulary \[0, 97\)"),
    (dict(prompts=[[3], [-1]]), DataError, r"prompts\[1\]\[0\] = -1"),
    (dict(prompts=[[1.5, 2.0]]), DataError, "must be integers"),
    (dict(prompts=np.zeros((2, 2, 2), np.int32)), DataError, "expected shape"),
    (dict(prompts=[[1] * 250]), DataError, r"prompts\[0\]: 250 prompt tokens \+ max_new_tokens=8 exceed "
                                          r"max_position_embeddings=256"),
    (dict(max_new_tokens=0), ConfigError, "max_new_tokens"),
    (dict(temperature=-0.5), ConfigError, "temperature"),
    (dict(top_p=0.0), ConfigError, "top_p"),
    (dict(top_p=1.5), ConfigError, "top_p"),
    (dict(top_k=-1), ConfigError, "top_k"),
    (dict(cache="paged"), ConfigError, "valid: expanded, latent"),
    (dict(eos_id=97), ConfigError, "eos_id"),
    (dict(stop_ids=[[1], [2]]), ConfigError, "2 per-row lists for a batch of 3"),
    (dict(stop_ids=[500]), ConfigError, r"stop_ids\[0\]"),
    (dict(seed=-1), ConfigError, "seed"),
])
def test_bad_input_raises_named_error_before_compiling(v3, kwargs, error, match):
    call = dict(prompts=PROMPTS, max_new_tokens=M, temperature=1.0)
    call.update(kwargs)
    before = sampler.TRACE_COUNT["generate"]
    with pytest.raises(error, match=match):
        sampler.sample(v3.params, v3.cfg, call.pop("prompts"), **call)
    assert sampler.TRACE_COUNT["generate"] == before
