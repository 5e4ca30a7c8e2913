"""GRPO end to end on the built-in task: the reward rises within a CPU budget; samples and metrics
are written; resume after an interruption continues from the checkpoint."""

import json
from pathlib import Path

import numpy as np
import pytest

from r1jax import config
from r1jax.rl.grpo_loop import train_grpo, training_batch, Rollout
from r1jax.train.metrics import read_metrics

BASE = ["eval_prompts=null", "samples_every=5", "progress=false", "max_new_tokens=12", "prompts.batch_size=4",
        "num_generations=8", "checkpoint.async_save=false"]


@pytest.mark.slow
def test_grpo_raises_the_reward_of_a_random_tiny_model(tmp_path):
    """tag_count rewards each of </think>, <answer>, </answer> used exactly once: a random model
    rarely does; GRPO must raise the mean reward clearly within 30 steps."""
    cfg = config.load_stage("configs/train/tiny_grpo.yaml", BASE + [
        f"out_dir={tmp_path / 'g'}", "steps=30", "rewards=[{name: tag_count}]", "optimizer.learning_rate=3e-3",
        "checkpoint.save_interval_steps=10"])
    result = train_grpo(cfg)
    assert result.status == "completed" and result.step == 30
    rows = read_metrics(tmp_path / "g")
    first = np.mean([r["reward/mean"] for r in rows[:5]])
    last = np.mean([r["reward/mean"] for r in rows[-5:]])
    assert last > first + 0.1, (first, last)
    for key in ("reward/tag_count", "kl", "clip_fraction", "entropy", "completion_length", "zero_variance_fraction",
                "loss", "grad_norm", "time_sample", "time_update"):
        assert key in rows[-1], key
    sample = json.loads((tmp_path / "g" / "samples" / "step_000030.jsonl").read_text().splitlines()[0])
    assert {"prompt", "completion", "reward", "rewards", "advantage"} <= set(sample)


def test_training_batch_layout_and_masks():
    """Left-padded prompt + completion: positions restart at the first real token, padding has
    segment 0, the EOS token's log-prob is trained, truncated samples are masked under overlong=mask,
    and an unjudgeable sample (reward None) gets no loss and advantage 0."""
    cfg = config.load_stage("configs/train/tiny_grpo.yaml", ["num_generations=2", "max_new_tokens=4",
                                                             "overlong=mask"])
    roll = Rollout(
        prompt_tokens=np.array([[2, 2, 5, 6], [2, 2, 5, 6], [2, 7, 8, 9], [2, 7, 8, 9]]),
        prompt_mask=np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]),
        completions=np.array([[11, 12, 1, 1], [13, 14, 15, 16], [17, 1, 1, 1], [18, 19, 1, 1]]),
        lengths=np.array([3, 4, 2, 3]), finished=np.array([True, False, True, True]),
        rewards=np.array([1.0, 0.0, np.nan, 0.5]), per_reward={}, texts=[""] * 4, prompts_text=[""] * 4,
        answers=["1"] * 4)
    b = training_batch(roll, cfg, eos_id=1)
    np.testing.assert_array_equal(b["tokens"][0], [2, 2, 5, 6, 11, 12, 1, 1])
    np.testing.assert_array_equal(b["positions"][0], [0, 0, 0, 1, 2, 3, 4, 4])
    np.testing.assert_array_equal(b["segment_ids"][0], [0, 0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["completion_mask"][0], [1, 1, 1, 0])  # EOS (3rd token) is trained
    assert not b["completion_mask"][1].any()  # truncated
    assert not b["completion_mask"][2].any() and b["advantages"][2] == 0  # reward None
    assert b["advantages"][0] > 0 > b["advantages"][1]
