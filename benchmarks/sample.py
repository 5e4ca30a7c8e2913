"""Greedy decode throughput: r1jax's jitted KV-cache sampler vs transformers `generate` (CPU).

Both run the same random weights (built by transformers, converted with r1jax.load_pretrained),
greedy, EOS disabled, a fixed number M of new tokens, at several batch sizes, each side timed
interleaved with the other (harness.py: median of pairs, spread, load average) after warm-up
(r1jax's compile, torch's first slow calls). Decode tokens/s = B·(M−1) / (t(M) − t(1)) from the
median times, so the prompt's prefill cancels out; end-to-end tokens/s = B·M / t(M). Also prints the KV-cache
bytes per token of the latent (MLA absorbed) and the expanded (per-head k, v) cache and the
theoretical ratio (L+R) / (H·(N+R) + H·V).

    python benchmarks/sample.py [--quick] [--config configs/model/tiny_v3.yaml] [--batches 1,16,64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer new tokens and repeats")
    ap.add_argument("--config", default=str(ROOT / "configs/model/tiny_v3.yaml"), help="r1jax model YAML")
    ap.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (--quick: 32)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved pairs (default 5; --quick: 3)")
    ap.add_argument("--dispatch", default="auto", help="r1jax MoE dispatch (default: the per-backend choice)")
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


def bench_batch(hf, params, cfg, prompts, new_tokens, repeats, cache) -> dict:
    """Decode tokens/s = B·(M−1) / (t(M) − t(1)): the prefill and first token cancel out."""
    import torch

    from r1jax.infer import sampler

    B = len(prompts)
    ids = torch.tensor(prompts, dtype=torch.long)

    def ours(m):
        return lambda: sampler.sample(params, cfg, prompts, max_new_tokens=m, temperature=0.0, cache=cache)

    def theirs(m):
        def run():
            with torch.no_grad():
                return hf.generate(ids, max_new_tokens=m, do_sample=False, pad_token_id=0)
        return run

    compile_s = harness.seconds(ours(new_tokens))
    same = np.mean(np.all(ours(new_tokens)().tokens == warm_up(theirs(new_tokens))[:, ids.shape[1]:].numpy(), axis=1))
    warm_up(theirs(1))
    full = harness.interleaved(ours(new_tokens), theirs(new_tokens), repeats)
    one = harness.interleaved(ours(1), theirs(1), repeats)
    decode = lambda t, t1: B * (new_tokens - 1) / max(t - t1, 1e-9)  # noqa: E731
    return {"batch": B, "r1jax_decode": decode(full.a, one.a), "hf_decode": decode(full.b, one.b),
            "r1jax_e2e": B * new_tokens / full.a, "hf_e2e": B * new_tokens / full.b, "compile_s": compile_s,
            "same": float(same), "e2e": full}


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
    threads = harness.pin_threads()
    with tempfile.TemporaryDirectory() as tmp:
        hf, (cfg, params) = build_models(args.config, Path(tmp))
    cfg = cfg.replace(moe_dispatch=args.dispatch)
    print(harness.header("benchmarks/sample.py: r1jax sampler vs transformers generate", threads))
    print(f"model {Path(args.config).name}: D={cfg.hidden_size} layers={cfg.num_hidden_layers} "
          f"experts={cfg.n_routed_experts} vocab={cfg.vocab_size}; prompt {args.prompt_len} tokens, "
          f"{new_tokens} new tokens, greedy, {repeats} interleaved pairs; r1jax cache={args.cache} "
          f"dispatch={args.dispatch}")
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
              f"{r['compile_s']:>9.1f}  {r['same']:.0%} of rows; end-to-end {r['e2e'].verdict()}", flush=True)
    print(cache_report(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
