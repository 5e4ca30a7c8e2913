"""r1jax vs transformers on the same ~50M-parameter V3-shaped model and batch (CPU by default):
the forward pass, and the training step's forward+backward (r1jax's own training loss,
`train/losses.lm_loss`, against transformers' `model(ids, labels=ids).loss.backward()`), timed
interleaved (harness.py), with the fraction of this machine's measured matmul FLOP/s r1jax reaches.

    python benchmarks/forward.py [--batch 8] [--seq 256] [--pairs 7] [--threads N] [key=value ...]

The overrides change the model config (`moe_dispatch=capacity`, `attention_impl=chunked`, ...);
without them the model runs what a user gets: the per-backend defaults.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402


def model_flops(cfg, tokens: int, seq: int, backward: bool) -> float:
    """2·active matmul params per token (+ causal attention), ×3 with the backward pass."""
    from r1jax.model.params import count_params

    active = count_params(cfg, active=True) - cfg.vocab_size * cfg.hidden_size  # the lookup is no matmul
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2
    per_token = 2 * active + 2 * attn
    return per_token * tokens * (3 if backward else 1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs/model/bench_50m_v3.yaml"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="CPUs for each side (default: all)")
    ap.add_argument("--loss-chunk", type=int, default=0, help="r1jax loss_chunk (0: whole logits)")
    ap.add_argument("overrides", nargs="*", help="model config overrides, e.g. moe_dispatch=capacity")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = harness.pin_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from transformers import DeepseekV3ForCausalLM

    import r1jax
    from r1jax import config
    from r1jax.model import moe, transformer
    from r1jax.model.params import count_params, init_params
    from r1jax.train.flops import measured_matmul_flops
    from r1jax.train.losses import lm_loss

    cfg = config.load(r1jax.ModelConfig, args.config, args.overrides)
    params = init_params(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as d:
        r1jax.save_pretrained(Path(d) / "hf", cfg, params)
        model = DeepseekV3ForCausalLM.from_pretrained(Path(d) / "hf", dtype=torch.float32).eval()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tok = tokens.size
    print(harness.header("benchmarks/forward.py: r1jax vs transformers, same weights, fp32", threads))
    print(f"model: {count_params(cfg) / 1e6:.1f}M params ({count_params(cfg, active=True) / 1e6:.1f}M active), "
          f"batch {args.batch}x{args.seq}; r1jax moe_dispatch={cfg.moe_dispatch} (runs "
          f"{moe.dispatch_name(cfg, jax.default_backend())}), attention_impl={cfg.attention_impl}, "
          f"loss_chunk={args.loss_chunk}; jax {jax.__version__} on {jax.default_backend()}, torch {torch.__version__}")

    fwd = jax.jit(lambda p, t: transformer.apply(p, t, cfg)["logits"])
    jt = jnp.asarray(tokens)
    # The training step's batch: targets are the next tokens, the last position has none.
    batch = {"inputs": jt, "targets": jnp.roll(jt, -1, axis=1),
             "loss_mask": jnp.ones_like(jt).at[:, -1].set(0), "segment_ids": jnp.ones_like(jt),
             "positions": jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), jt.shape)}

    def loss(p):
        return lm_loss(p, batch, cfg, mtp_weight=0.0, balance_alpha=0.0, loss_chunk=args.loss_chunk)[0]

    grad = jax.jit(jax.grad(loss))
    tt = torch.as_tensor(tokens, dtype=torch.long)

    def torch_fwd():
        with torch.no_grad():
            model(tt)

    def torch_fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(tt, labels=tt).loss.backward()

    results = {
        "forward": harness.interleaved(lambda: fwd(params, jt).block_until_ready(), torch_fwd, args.pairs),
        "forward+backward": harness.interleaved(lambda: jax.block_until_ready(grad(params)), torch_fwd_bwd,
                                                args.pairs),
    }
    matmul = measured_matmul_flops(2048)
    print(f"measured matmul rate (2048^3 fp32, jax, best of 5): {matmul / 1e9:.1f} GFLOP/s")
    print("| pass | r1jax tok/s | transformers tok/s | ratio (median of pairs) | r1jax % of matmul | "
          "transformers % of matmul |")
    print("|---|---|---|---|---|---|")
    for name, c in results.items():
        flops = model_flops(cfg, n_tok, args.seq, name != "forward")
        print(f"| {name} | {n_tok / c.a:,.0f} | {n_tok / c.b:,.0f} | {c.verdict()} | "
              f"{100 * flops / c.a / matmul:.1f}% | {100 * flops / c.b / matmul:.1f}% |")
    print(f"load average after: {harness.load():.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
