"""How the per-backend defaults were chosen: the dropless MoE dispatches and the two layer loops,
timed in turn on this machine's default backend for the workloads the defaults serve.

    python benchmarks/defaults.py [--rounds 5] [--quick]

Workloads: the SFT train step of bench_50m_v3 (8×256 tokens) and of demo_v3 (16×40, the demo's
cold start; 256×48, a GRPO update's shape), and the sampler (demo_v3, 256 rows, 16-token prompts,
32 new tokens: a GRPO rollout). Each row: median seconds and the median per-round ratio against
`auto` with its spread (harness.py); a ratio above 1 means `auto` is that much faster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402

TRAIN_VARIANTS = {"auto": {}, "ragged, scan": {"moe_dispatch": "ragged", "layer_loop": "scan"},
                  "blocked, scan": {"moe_dispatch": "blocked", "layer_loop": "scan"},
                  "ragged, unroll": {"moe_dispatch": "ragged", "layer_loop": "unroll"},
                  "dense, unroll": {"moe_dispatch": "dense", "layer_loop": "unroll"}}
# The sampler always scans its layers (unrolled measured slower in decode, 2026-12-02).
SAMPLER_VARIANTS = {"auto": {}, "ragged": {"moe_dispatch": "ragged"}, "dense": {"moe_dispatch": "dense"}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the demo_v3 workloads only")
    args = ap.parse_args(argv)
    threads = harness.pin_threads()
    import jax
    import numpy as np

    import r1jax
    from r1jax import config
    from r1jax.infer import sampler
    from r1jax.model import decoder, moe
    from r1jax.model.params import init_params
    from grpo import sft_step

    print(harness.header("benchmarks/defaults.py", threads))
    platform = jax.default_backend()
    load = lambda name: config.load(r1jax.ModelConfig, str(ROOT / f"configs/model/{name}.yaml"))  # noqa: E731
    auto = load("demo_v3")
    print(f"auto on {platform}: moe_dispatch -> {moe.dispatch_name(auto, platform)}, layer_loop -> "
          f"{'unroll' if platform in decoder.UNROLL_ON else 'scan'}")
    workloads = [("demo_v3", 16, 40), ("demo_v3", 256, 48)] + ([] if args.quick else [("bench_50m_v3", 8, 256)])
    print("| workload | variant | median s | auto faster by (median of rounds) |\n|---|---|---|---|")
    for name, rows, seq in workloads:
        cfg = load(name)
        fns = {v: sft_step(cfg.replace(**kw), rows, seq)[0] for v, kw in TRAIN_VARIANTS.items()}
        times = harness.round_robin(fns, args.rounds)
        for v in TRAIN_VARIANTS:
            c = harness.versus(times, v, "auto")
            print(f"| {name} SFT step {rows}x{seq} | {v} | {c.b:.4f} | "
                  f"{'—' if v == 'auto' else c.verdict().split('; load')[0] + ')'} |", flush=True)
    params = init_params(auto, jax.random.key(0))
    prompts = np.random.RandomState(0).randint(2, auto.vocab_size - 1, (256, 16)).astype(np.int32)
    fns = {v: (lambda c: lambda: sampler.sample(params, c, prompts, max_new_tokens=32, temperature=0.7, seed=1))(
        auto.replace(**kw)) for v, kw in SAMPLER_VARIANTS.items()}
    times = harness.round_robin(fns, args.rounds)
    for v in SAMPLER_VARIANTS:
        c = harness.versus(times, v, "auto")
        print(f"| demo_v3 sampler 256x(16+32) | {v} | {c.b:.4f} | "
              f"{'—' if v == 'auto' else c.verdict().split('; load')[0] + ')'} |", flush=True)
    print(f"load average after: {harness.load():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
