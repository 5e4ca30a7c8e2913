"""Reinforcement learning: the KV-cache sampler (GRPO's rollout engine)."""

from r1jax.rl.sampler import SampleOutput, generate, sample, sample_file

__all__ = ["SampleOutput", "generate", "sample", "sample_file"]
