"""Reinforcement learning and the data it makes (R1 recipe): GRPO's loss (`grpo`) and training loop
(`grpo_loop`), rule-based rewards (`rewards`) with sandboxed code execution (`sandbox`), and rejection
sampling for SFT data (`rejection`). Rollouts are sampled by `r1jax.infer`."""
