"""r1jax's GRPO loss, gradient and advantages against TRL 1.16's own code on the same tensors, in float64:
`GRPOTrainer._compute_loss` called unbound on a stand-in trainer holding the attributes it reads (the
model's forward replaced by the log-prob tensor itself), and `_generate_and_score_completions` of a real
trainer on a tiny Qwen2 whose generation is replaced by fixed completions. Variants: every loss both
have (grpo/sequence_mean, bnpo and dapo/token_mean, dr_grpo/fixed_length), clip ranges, β, δ, the
bias-corrected KL, sequence-level ratios (GSPO), fully masked rows, unscored rows, rollout mini-batches
with gradient accumulation; advantages with `None` rewards, several reward functions, group and batch
scaling."""

from __future__ import annotations

import itertools
import zlib
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from r1jax.rl import grpo
from r1jax.rl.grpo_update import _normalisers, _split

AGGREGATION = {"grpo": "sequence_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "fixed_length"}


class _OneProcess:
    """The accelerator calls _compute_loss makes, for one process."""

    num_processes = 1
    sync_gradients = True

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def trl_loss(logp, old, ref, adv, mask, *, loss_type, eps, beta, delta=None, bias_kl=False, level="token",
             accum=1, steps_per_generation=1, num_items=None):
    """TRL's loss and d loss / d logp for one micro-batch. old None: on-policy (TRL then uses logp.detach())."""
    lp = torch.tensor(logp, dtype=torch.float64, requires_grad=True)
    trainer = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (lp, torch.zeros_like(lp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=delta, steps_per_generation=steps_per_generation),
        loss_type=loss_type, epsilon_low=eps[0], epsilon_high=eps[1], use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accum, max_completion_length=logp.shape[1], accelerator=_OneProcess(),
        aux_loss_enabled=False, _entropy_bonus_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)))
    N, L = logp.shape
    m = torch.tensor(mask, dtype=torch.long)
    inputs = {"prompt_ids": torch.zeros((N, 1), dtype=torch.long), "prompt_mask": torch.ones((N, 1), dtype=torch.long),
              "completion_ids": torch.zeros((N, L), dtype=torch.long), "completion_mask": m,
              "advantages": torch.tensor(adv, dtype=torch.float64),
              "old_per_token_logps": None if old is None else torch.tensor(old, dtype=torch.float64),
              "ref_per_token_logps": torch.tensor(ref, dtype=torch.float64),
              "num_items_in_batch": torch.tensor(float(mask.sum() if num_items is None else num_items))}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    loss.backward()
    return loss.item(), lp.grad.numpy()


def r1jax_loss(logp, old, ref, adv, mask, *, loss_type, eps, beta, delta=None, bias_kl=False, level="token",
               rows=None, tokens=None):
    with jax.enable_x64(True):
        def f(lp):
            o = jax.lax.stop_gradient(lp) if old is None else jnp.asarray(old)
            return grpo.policy_loss(lp, o, jnp.asarray(ref), jnp.asarray(adv), jnp.asarray(mask, bool),
                                    epsilon_low=eps[0], epsilon_high=eps[1], beta=beta,
                                    aggregation=AGGREGATION[loss_type], max_len=logp.shape[1], rows=rows,
                                    tokens=tokens, importance_sampling_level=level, delta=delta,
                                    use_bias_correction_kl=bias_kl)[0]
        value, grad = jax.value_and_grad(f)(jnp.asarray(logp, jnp.float64))
        assert grad.dtype == jnp.float64
        return float(value), np.asarray(grad)


def tensors(seed, N=8, L=7):
    """Ratios across both clip edges and past δ = 1.5 (per token and per row), two fully masked rows
    (truncated under overlong: mask) and an unscored row (advantage 0, still in the mask)."""
    rng = np.random.RandomState(seed)
    old = rng.normal(-2, 0.5, (N, L))
    logp = old + rng.normal(0, 0.3, (N, L)) + np.linspace(0.7, -0.7, N)[:, None]
    ref = old + rng.normal(0, 0.2, (N, L))
    adv = rng.normal(0, 1, N)
    mask = rng.uniform(size=(N, L)) > 0.25
    mask[2] = mask[5] = False
    adv[6] = 0.0
    return logp, old, ref, adv, mask


def seed_of(*case) -> int:
    return zlib.crc32(repr(case).encode())


def check(ours, theirs):
    assert ours[0] == pytest.approx(theirs[0], rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-10, atol=1e-15)
    assert np.abs(theirs[1]).max() > 1e-3  # a real gradient, not two zeros


CORE = list(itertools.product(AGGREGATION, [(0.2, 0.2), (0.2, 0.28), (10.0, 10.0)], [0.0, 0.001, 0.04]))


@pytest.mark.parametrize("loss_type,eps,beta", CORE)
def test_loss_and_gradient_equal_trl(loss_type, eps, beta):
    logp, old, ref, adv, mask = tensors(seed_of(loss_type, eps, beta))
    kw = dict(loss_type=loss_type, eps=eps, beta=beta)
    check(r1jax_loss(logp, old, ref, adv, mask, **kw), trl_loss(logp, old, ref, adv, mask, **kw))
    # on-policy (one optimizer step per rollout): π_old is logp itself, detached, on both sides
    check(r1jax_loss(logp, None, ref, adv, mask, **kw), trl_loss(logp, None, ref, adv, mask, **kw))


OPTIONS = list(itertools.product(AGGREGATION, [None, 1.5], [False, True], ["token", "sequence"]))


@pytest.mark.parametrize("loss_type,delta,bias_kl,level", OPTIONS)
def test_options_equal_trl(loss_type, delta, bias_kl, level):
    """δ (two-sided clip), the ratio-weighted KL (TRL's use_bias_correction_kl) and GSPO's sequence ratios."""
    logp, old, ref, adv, mask = tensors(seed_of(loss_type, delta, bias_kl, level))
    kw = dict(loss_type=loss_type, eps=(0.2, 0.28), beta=0.04, delta=delta, bias_kl=bias_kl, level=level)
    ours, theirs = r1jax_loss(logp, old, ref, adv, mask, **kw), trl_loss(logp, old, ref, adv, mask, **kw)
    check(ours, theirs)
    if delta is not None:  # δ binds somewhere, or this case tests nothing about it
        log_r = logp - old if level == "token" else ((logp - old) * mask).sum(1) / np.maximum(mask.sum(1), 1)
        r = np.exp(log_r)
        assert (r > delta).any()


def test_masked_and_unscored_rows_count_as_in_trl():
    """Under grpo/sequence_mean the 2 fully masked of 8 rows stay in the denominator (TRL): 8/6 times the
    mean over the rows with tokens; the unscored row (advantage 0) still carries the β·KL term."""
    logp, old, ref, adv, mask = tensors(7)
    kw = dict(loss_type="grpo", eps=(0.2, 0.2), beta=0.04)
    value, grad = r1jax_loss(logp, old, ref, adv, mask, **kw)
    with jax.enable_x64(True):
        skip = float(grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(ref), jnp.asarray(adv),
                                      jnp.asarray(mask), epsilon_low=0.2, epsilon_high=0.2, beta=0.04,
                                      aggregation="sequence_mean", max_len=7, rows=6)[0])
    assert value == pytest.approx(skip * 6 / 8, rel=1e-12)
    assert np.abs(grad[6][mask[6]]).min() > 0  # advantage 0: the gradient is the KL's alone


# TRL's bnpo divides each micro-batch by its own tokens; r1jax's token_mean is dapo's rollout-wide
# normaliser (the two agree with one micro-batch per rollout, tested above).
MINI = [(t, M, A) for t in AGGREGATION for M, A in [(1, 2), (2, 2), (4, 1)] if t != "bnpo"]


@pytest.mark.parametrize("how,skip,want", [("sequence_mean", "count", [8, 8]), ("sequence_mean", "skip", [7, 7]),
                                           ("fixed_length", "skip", [8, 8])])
def test_masked_rows_skip_leaves_empty_rows_out_of_sequence_mean_only(how, skip, want):
    """r1jax's former rule, kept as `masked_rows: skip`: per mini-batch, only completions with a token count
    in sequence_mean's denominator; fixed_length counts every completion either way."""
    mask = np.ones((16, 3), bool)
    mask[[0, 1]] = False  # rows 0 and 1: one in each of 2 mini-batches (rows m::2)
    split = _split({"completion_mask": jnp.asarray(mask), "sample_mask": jnp.ones(16, bool)}, 2, 1)
    rows, tokens = _normalisers(split, SimpleNamespace(masked_rows=skip, loss_aggregation=how))
    assert np.asarray(rows).tolist() == want and float(tokens) == 14 * 3 / 2


@pytest.mark.parametrize("loss_type,M,A", MINI)
def test_mini_batch_normalisers_equal_trl(loss_type, M, A):
    """One rollout of 16 rows in M mini-batches of A micro-batches (TRL: steps_per_generation = M·A,
    gradient_accumulation_steps = A): each mini-batch's summed micro-batch losses and their gradients,
    with r1jax's update normalisers (`_split`, `_normalisers`), equal TRL's. Rows in TRL's order: micro-
    batch k is the k-th contiguous slice, here laid out as r1jax's update reads them (rows k::K)."""
    logp, old, ref, adv, mask = tensors(11, N=16)
    K = M * A
    interleave = np.arange(16).reshape(K, 16 // K).T.reshape(-1)  # r1jax row i*K + k = TRL row k*n + i
    with jax.enable_x64(True):
        split = _split({"completion_mask": jnp.asarray(mask[interleave]), "sample_mask": jnp.ones(16, bool)}, M, A)
        opts = SimpleNamespace(masked_rows="count", loss_aggregation=AGGREGATION[loss_type])
        rows, tokens = _normalisers(split, opts)
    n = 16 // K
    kw = dict(loss_type=loss_type, eps=(0.2, 0.28), beta=0.04)
    for m in range(M):
        ours_v, theirs_v = 0.0, 0.0
        for a in range(A):
            sl = slice((m * A + a) * n, (m * A + a + 1) * n)
            t = (logp[sl], old[sl], ref[sl], adv[sl], mask[sl])
            ours = r1jax_loss(*t, **kw, rows=float(rows[m]), tokens=float(tokens))
            theirs = trl_loss(*t, **kw, accum=A, steps_per_generation=K, num_items=mask.sum())
            np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-10, atol=1e-15)
            ours_v, theirs_v = ours_v + ours[0], theirs_v + theirs[0]
        assert ours_v == pytest.approx(theirs_v, rel=1e-12)


# --------------------------------------------------------------------------- advantages


def _tiny_trl_trainer(tmp_path, G, scale_rewards, reward_funcs, weights):
    """A real GRPOTrainer on a random tiny Qwen2 with the built-in tokenizer, generation replaced."""
    import datasets
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig as TRLConfig

    from r1jax.data.tokenizer import builtin_tokenizer

    builtin_tokenizer().save(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_token_id))
    args = TRLConfig(output_dir=str(tmp_path / "trl"), num_generations=G, per_device_train_batch_size=G,
                     scale_rewards=scale_rewards, beta=0.0, use_cpu=True, report_to=[], reward_weights=weights,
                     max_completion_length=4, logging_steps=1, save_strategy="no")
    data = datasets.Dataset.from_dict({"prompt": ["1+1="] * G})
    trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=data, processing_class=tok)
    return trainer, tok


def _fixed_rewards(column):
    def reward(prompts, completions, **fields):
        return [None if np.isnan(v) else float(v) for v in fields[column]]
    reward.__name__ = column
    return reward


r0, r1 = _fixed_rewards("r0"), _fixed_rewards("r1")  # for r1jax by name: test_grpo_trl:r0, test_grpo_trl:r1


# [rows, functions]: None (nan) in one function, in both, a lone valid row, equal rewards. TRL stores
# rewards as float32, so the values are dyadic (exact in float32) for a float64 comparison.
REWARDS = np.array([
    [1.0, 0.5], [0.0, np.nan], [np.nan, np.nan], [0.5, 0.0],
    [np.nan, np.nan], [np.nan, np.nan], [np.nan, np.nan], [1.0, 1.0],
    [0.375, 0.375], [0.375, 0.375], [0.375, np.nan], [np.nan, 0.375],
])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(tmp_path, scale):
    """TRL's `_generate_and_score_completions` (generation replaced by fixed completions) against r1jax's
    RewardSet and `grpo.advantages`, rows where one, both or no reward function returned None."""
    G, weights = 4, [1.0, 0.5]
    trainer, tok = _tiny_trl_trainer(tmp_path, G, scale, [r0, r1], weights)
    N = len(REWARDS)
    ids = tok("1+1=", add_special_tokens=False)["input_ids"]
    trainer._generate = lambda prompts: ([ids] * N, [[5, 6, tok.eos_token_id]] * N, None, ["ab"] * N, None, {},
                                         None, None)
    inputs = [{"prompt": "1+1=", "r0": REWARDS[i, 0], "r1": REWARDS[i, 1]} for i in range(N)]
    torch.set_default_dtype(torch.float64)  # TRL's reward tensors take the default dtype: compare in float64
    try:
        out = trainer._generate_and_score_completions(inputs)
    finally:
        torch.set_default_dtype(torch.float32)
    want = out["advantages"].double().numpy()
    # r1jax: its own RewardSet (TRL's weighted nansum; None only where no function scored), then advantages
    from r1jax.config import RewardSpec
    from r1jax.rl.rewards import reward_set

    rs = reward_set([RewardSpec("test_grpo_trl:r0", weights[0]), RewardSpec("test_grpo_trl:r1", weights[1])])
    totals, _ = rs(["1+1="] * N, ["ab"] * N, r0=list(REWARDS[:, 0]), r1=list(REWARDS[:, 1]))
    total = np.array([np.nan if v is None else v for v in totals])
    assert np.isnan(total).sum() == 4 and not np.isnan(total[1])  # one None of two functions: still scored
    with jax.enable_x64(True):
        got = np.asarray(grpo.advantages(jnp.asarray(np.nan_to_num(total).reshape(-1, G)),
                                         jnp.asarray(~np.isnan(total).reshape(-1, G)), scale=scale, eps=1e-4))
    assert out["advantages"].dtype == torch.float64
    np.testing.assert_allclose(got.reshape(-1), want, rtol=1e-12, atol=1e-15)
    assert (want[np.isnan(total)] == 0).all() and np.abs(want).max() > 0.5
