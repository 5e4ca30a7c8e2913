"""Inference: batched autoregressive sampling with a KV cache (`sampler`: jitted prefill and a
`lax.while_loop` decode, `sample`, `generate`) and token choice (`tokens`). The engine under
`r1jax.generate`, evaluation, rejection sampling and GRPO's rollouts; it runs the model's decoder layer
with attention over the cache (`model/kv_cache.py`)."""
