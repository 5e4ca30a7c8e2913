"""Greedy decode throughput: r1jax's jitted KV-cache sampler vs transformers `generate` (CPU).

Both run the same random weights (built by transformers, converted with r1jax.load_pretrained),
greedy, EOS disabled, a fixed number M of new tokens, at several batch sizes, best of several calls
after warm-up (r1jax's compile, torch's first slow calls). Decode tokens/s = B·(M−1) / (t(M) − t(1)),
so the prompt's prefill cancels out; end-to-end tokens/s = B·M / t(M). Also prints the KV-cache
bytes per token of the latent (MLA absorbed) and the expanded (per-head k, v) cache and the
theoretical ratio (L+R) / (H·(N+R) + H·V).

    python benchmarks/sample.py [--quick] [--config configs/model/tiny_v3.yaml] [--batches 1,16,64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer new tokens and repeats")
    ap.add_argument("--config", default=str(ROOT / "configs/model/tiny_v3.yaml"), help="r1jax model YAML")
    ap.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (--quick: 32)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, best kept (default 5; --quick: 3)")
    ap.add_argument("--dispatch", default="dense", help="r1jax MoE dispatch (dense is fastest for few experts on CPU)")
    ap.add_argument("--cache", default="latent", choices=["latent", "expanded"])
    return ap.parse_args(argv)


def build_models(config_path: str, tmp: Path):
    """A random transformers DeepseekV3 model from an r1jax YAML, and the same weights in r1jax."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import r1jax
    from r1jax import config as config_lib

    cfg = config_lib.load(r1jax.ModelConfig, config_path).replace(num_nextn_predict_layers=0)
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf_config())).eval()
    hf.generation_config.eos_token_id = None  # EOS disabled: every row decodes all new tokens
    hf.save_pretrained(tmp / "hf")
    return hf, r1jax.load_pretrained(tmp / "hf")


def warm_up(fn, max_calls: int = 8):
    """Call until two calls in a row take about as long (torch's first calls at a shape are slow)."""
    previous = float("inf")
    for _ in range(max_calls):
        start = time.perf_counter()
        out = fn()
        elapsed = time.perf_counter() - start
        if elapsed > 0.75 * previous:
            break
        previous = elapsed
    return out


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_r1jax(params, cfg, prompts, new_tokens, repeats, cache):
    """-> (tokens, best seconds, compile seconds) for one sampler call."""
    from r1jax.infer import sampler

    run = lambda: sampler.sample(params, cfg, prompts, max_new_tokens=new_tokens, temperature=0.0, cache=cache)
    start = time.perf_counter()
    out = run()  # compiles
    compile_s = time.perf_counter() - start
    return out.tokens, best_time(run, repeats), compile_s


def time_hf(model, prompts, new_tokens, repeats):
    """-> (tokens, best seconds) for one transformers generate call."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = warm_up(lambda: model.generate(ids, **kw))
        t = best_time(lambda: model.generate(ids, **kw), repeats)
    return out[:, ids.shape[1]:].numpy(), t


def bench_batch(hf, params, cfg, prompts, new_tokens, repeats, cache) -> dict:
    """Decode tokens/s = B·(M−1) / (t(M) − t(1)): the prefill and first token cancel out."""
    B = len(prompts)
    ours, t_ours, compile_s = time_r1jax(params, cfg, prompts, new_tokens, repeats, cache)
    _, t_ours1, _ = time_r1jax(params, cfg, prompts, 1, repeats, cache)
    theirs, t_hf = time_hf(hf, prompts, new_tokens, repeats)
    _, t_hf1 = time_hf(hf, prompts, 1, repeats)
    decode = lambda t, t1: B * (new_tokens - 1) / max(t - t1, 1e-9)
    return {"batch": B, "r1jax_decode": decode(t_ours, t_ours1), "hf_decode": decode(t_hf, t_hf1),
            "r1jax_e2e": B * new_tokens / t_ours, "hf_e2e": B * new_tokens / t_hf, "compile_s": compile_s,
            "same": float(np.mean(np.all(ours == theirs, axis=1)))}


def cache_report(cfg) -> str:
    from r1jax.model.kv_cache import cache_bytes_per_token

    L, R, H = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.num_attention_heads
    N, V = cfg.qk_nope_head_dim, cfg.v_head_dim
    latent, expanded = cache_bytes_per_token(cfg, "latent"), cache_bytes_per_token(cfg, "expanded")
    theory = (L + R) / (H * (N + R) + H * V)
    return (f"KV cache per token ({cfg.num_hidden_layers} layers, {cfg.dtype}): latent {latent} B, "
            f"expanded {expanded} B, measured ratio {latent / expanded:.4f}, "
            f"theory (L+R)/(H(N+R)+HV) = ({L}+{R})/({H}·{N + R}+{H}·{V}) = {theory:.4f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    new_tokens = args.new_tokens or (32 if args.quick else 64)
    repeats = args.repeats or (3 if args.quick else 5)
    batches = [int(b) for b in args.batches.split(",")]
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        hf, (cfg, params) = build_models(args.config, Path(tmp))
    cfg = cfg.replace(moe_dispatch=args.dispatch)
    print(f"model {Path(args.config).name}: D={cfg.hidden_size} layers={cfg.num_hidden_layers} "
          f"experts={cfg.n_routed_experts} vocab={cfg.vocab_size}; prompt {args.prompt_len} tokens, "
          f"{new_tokens} new tokens, greedy, best of {repeats}; r1jax cache={args.cache} dispatch={args.dispatch}; "
          f"{os.cpu_count()} CPU threads")
    print(f"{'':>5}  {'decode tokens/s':^32}  {'end-to-end tokens/s':^32}")
    print(f"{'batch':>5}  {'r1jax':>10}  {'HF':>10}  {'ratio':>7}  {'r1jax':>10}  {'HF':>10}  {'ratio':>7}  "
          f"{'compile s':>9}  same tokens")
    rng = np.random.RandomState(0)
    for batch in batches:
        prompts = rng.randint(2, cfg.vocab_size, (batch, args.prompt_len)).astype(np.int32)
        r = bench_batch(hf, params, cfg, prompts, new_tokens, repeats, args.cache)
        print(f"{batch:>5}  {r['r1jax_decode']:>10.0f}  {r['hf_decode']:>10.0f}  "
              f"{r['r1jax_decode'] / r['hf_decode']:>6.1f}x  {r['r1jax_e2e']:>10.0f}  {r['hf_e2e']:>10.0f}  "
              f"{r['r1jax_e2e'] / r['hf_e2e']:>6.1f}x  "
              f"{r['compile_s']:>9.1f}  {r['same']:.0%} of rows", flush=True)
    print(cache_report(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
