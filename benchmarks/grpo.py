"""One GRPO step's wall time by phase: sampling, reward, log-probs (π_old, π_ref), update.

Runs `train_grpo` on configs/train/tiny_grpo.yaml (configs/model/tiny_v3.yaml, the built-in arithmetic
task, 8 prompts × 8 completions, 48 new tokens, prompts padded to 32) from random weights on the
default devices, and reads the per-step phase times the loop logs (`time_sample`, `time_reward`,
`time_logprob`, `time_update` in metrics.jsonl). The first step compiles; the table shows the median
of the steps after it, each phase's share of the step, and tokens/s:

- sampling: generated tokens (rows × mean completion length) / time_sample;
- log-prob and update: positions of the training batch (rows × (prompt + max_new_tokens)) / time;
  the update is μ = num_iterations forward+backward passes.

Reference in the same process: an SFT train step (`train/step.py`, no MTP/balance loss, no bias
update) of the same model on a batch of the same shape, so the GRPO update's overhead over plain
causal-LM training (chunked, rematerialized log-probs, the entropy, the clipped objective, the KL
term) reads off as a ratio; and that SFT step timed interleaved (harness.py) against the same step
under `--baseline` model settings (default: the CPU defaults before `auto`, ragged dispatch and a
scanned layer loop), so the gain of the per-backend defaults reads off too. To time a whole GRPO
run under the baseline, pass it as overrides (`model.moe_dispatch=ragged model.layer_loop=scan`).
benchmarks/grpo_vs_trl.py compares against TRL's GRPOTrainer.

    python benchmarks/grpo.py [--steps 6] [--baseline k=v,k=v] [key=value overrides of the GRPO config ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402

PHASES = ("sample", "reward", "logprob", "update")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps; the first (compile) is not counted")
    ap.add_argument("--config", default=str(ROOT / "configs/train/tiny_grpo.yaml"))
    ap.add_argument("--reference-repeats", type=int, default=5, help="interleaved pairs of the SFT steps")
    ap.add_argument("--baseline", default="moe_dispatch=ragged,layer_loop=scan",
                    help="model settings the SFT step is compared with ('' skips the comparison)")
    ap.add_argument("overrides", nargs="*", help="GRPO config overrides, e.g. model.moe_dispatch=capacity")
    return ap.parse_args(argv)


def grpo_phase_times(cfg_path: str, steps: int, overrides: list[str], out: Path):
    """-> (GRPOConfig, metrics rows of every step)."""
    from r1jax import config
    from r1jax.rl.grpo_loop import train_grpo
    from r1jax.train.metrics import read_metrics

    cfg = config.load_stage(cfg_path, ["eval_prompts=null", "progress=false", "samples_every=0", f"steps={steps}",
                                       f"out_dir={out}", "checkpoint.save_interval_steps=100000",
                                       "checkpoint.async_save=false"] + overrides)
    train_grpo(cfg)
    return cfg, read_metrics(out)


def sft_step(model_cfg, rows: int, seq: int):
    """-> (a function running one SFT train step on [rows, seq] tokens, its compile seconds)."""
    import jax
    import numpy as np

    from r1jax.config import OptimizerConfig
    from r1jax.model.params import init_params
    from r1jax.train import optimizer
    from r1jax.train.step import StepOptions, init_state, make_train_step

    tx = optimizer.build(OptimizerConfig(learning_rate=1e-4), 100)
    step = make_train_step(model_cfg, tx, StepOptions(mtp_weight=0.0, balance_alpha=0.0, bias_rate=0.0))
    state = init_state(init_params(model_cfg, jax.random.key(0)), tx, 0)
    tok = np.random.RandomState(0).randint(0, model_cfg.vocab_size, (rows, seq + 1)).astype(np.int32)
    batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "loss_mask": np.ones((rows, seq), np.int32),
             "segment_ids": np.ones((rows, seq), np.int32), "positions": np.tile(np.arange(seq, dtype=np.int32), (rows, 1))}
    holder = [state]

    def run():
        holder[0], m = step(holder[0], batch)
        jax.block_until_ready(m)

    return run, harness.seconds(run)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = harness.pin_threads()
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cfg, rows = grpo_phase_times(args.config, args.steps, args.overrides, Path(tmp) / "run")
        total_s = time.perf_counter() - t0
    if len(rows) < 2:
        raise SystemExit("need --steps >= 2 (the first step compiles)")
    timed = rows[1:]
    med = {p: statistics.median(r[f"time_{p}"] for r in timed) for p in PHASES}
    step_s = sum(med.values())
    first = {p: rows[0][f"time_{p}"] for p in PHASES}
    n = cfg.prompts.batch_size * cfg.num_generations
    positions = n * (cfg.prompts.seq_len + cfg.max_new_tokens)
    generated = statistics.median(n * r["completion_length"] for r in timed)
    passes = 1 + (cfg.beta > 0)
    tokens = {"sample": generated, "reward": generated, "logprob": positions * passes,
              "update": positions * cfg.num_iterations}
    what = {"sample": "generated tokens", "reward": "generated tokens (detokenize + score)",
            "logprob": f"positions × {passes} forward", "update": f"positions × {cfg.num_iterations} fwd+bwd"}

    model_cfg = cfg.model
    print(harness.header("benchmarks/grpo.py", threads))
    print(f"GRPO step on {jax.device_count()} {jax.default_backend()} device(s): {model_cfg.model_type} "
          f"({Path(args.config).name}), {cfg.prompts.batch_size} prompts × {cfg.num_generations} = {n} rows, "
          f"prompt {cfg.prompts.seq_len} + {cfg.max_new_tokens} new tokens, dispatch {model_cfg.moe_dispatch}, layer_loop {model_cfg.layer_loop}, "
          f"median of {len(timed)} steps after the first ({total_s:.0f} s in all)")
    print("| phase | median s | share | tokens/s | counted | first step s (compile) |")
    print("|---|---|---|---|---|---|")
    for p in PHASES:
        print(f"| {p} | {med[p]:.3f} | {100 * med[p] / step_s:.0f}% | {tokens[p] / med[p]:,.0f} | {what[p]} | "
              f"{first[p]:.1f} |")
    print(f"| step | {step_s:.3f} | 100% | {n * cfg.max_new_tokens / step_s:,.0f} | rows × max_new_tokens | "
          f"{sum(first.values()):.1f} |")

    seq = cfg.prompts.seq_len + cfg.max_new_tokens
    sft, sft_compile = sft_step(model_cfg, n, seq)
    if args.baseline:
        base_cfg = model_cfg.replace(**dict(kv.split("=", 1) for kv in args.baseline.split(",")))
        base, _ = sft_step(base_cfg, n, seq)
        c = harness.interleaved(sft, base, args.reference_repeats)
        sft_s = c.a
        print(f"\nSFT step with these defaults vs with {args.baseline}: {sft_s:.3f} s vs {c.b:.3f} s, "
              f"{c.verdict()}")
    else:
        sft_s = statistics.median(harness.seconds(sft) for _ in range(args.reference_repeats))
    per_pass = med["update"] / cfg.num_iterations
    print(f"reference: SFT train step on the same [{n}, {seq}] tokens: {sft_s:.3f} s ({positions / sft_s:,.0f} "
          f"tokens/s, compile {sft_compile:.1f} s); GRPO update per pass / SFT step = {per_pass / sft_s:.2f}x; "
          f"load average after {harness.load():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
