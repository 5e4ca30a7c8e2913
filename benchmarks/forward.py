"""r1jax vs transformers on the same ~50M-parameter V3-shaped model and batch (CPU by default):
forward and forward+backward tokens/s, their ratio, and the fraction of this machine's measured
matmul FLOP/s that r1jax reaches.

    python benchmarks/forward.py [--batch 8] [--seq 256] [--dispatch capacity] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import r1jax  # noqa: E402
from r1jax import config  # noqa: E402
from r1jax.model import transformer  # noqa: E402
from r1jax.model.params import count_params, init_params  # noqa: E402
from r1jax.train.flops import measured_matmul_flops  # noqa: E402


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def model_flops(cfg, tokens: int, seq: int, backward: bool) -> float:
    """2·active matmul params per token (+ causal attention), ×3 with the backward pass."""
    active = count_params(cfg, active=True) - cfg.vocab_size * cfg.hidden_size  # the lookup is no matmul
    attn = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq / 2
    per_token = 2 * active + 2 * attn
    return per_token * tokens * (3 if backward else 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs/model/bench_50m_v3.yaml"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dispatch", default="capacity", help="r1jax moe_dispatch (dense|ragged|capacity)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.set_num_threads(os.cpu_count())
    cfg = config.load(r1jax.ModelConfig, args.config, [f"moe_dispatch={args.dispatch}",
                                                        "capacity_factor=2.0"])
    params = init_params(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as d:
        r1jax.save_pretrained(Path(d) / "hf", cfg, params)
        model = DeepseekV3ForCausalLM.from_pretrained(Path(d) / "hf", dtype=torch.float32).eval()
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
    n_tok = tokens.size
    print(f"model: {count_params(cfg) / 1e6:.1f}M params ({count_params(cfg, active=True) / 1e6:.1f}M active), "
          f"batch {args.batch}x{args.seq}, r1jax dispatch={args.dispatch}, devices={jax.devices()[0].platform}, "
          f"torch threads={torch.get_num_threads()}")

    fwd = jax.jit(lambda p, t: transformer.apply(p, t, cfg)["logits"])
    jt = jnp.asarray(tokens)

    def loss(p, t):
        logits = transformer.apply(p, t, cfg)["logits"]
        lp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(lp, t[:, 1:, None], -1))

    grad = jax.jit(jax.grad(loss))
    tt = torch.as_tensor(tokens, dtype=torch.long)

    def torch_fwd():
        with torch.no_grad():
            model(tt)

    def torch_fwd_bwd():
        model.zero_grad(set_to_none=True)
        out = model(tt, labels=tt)
        out.loss.backward()

    results = {}
    results["forward"] = (best_time(lambda: fwd(params, jt).block_until_ready(), args.repeats),
                          best_time(torch_fwd, args.repeats))
    results["forward+backward"] = (
        best_time(lambda: jax.block_until_ready(grad(params, jt)), args.repeats),
        best_time(torch_fwd_bwd, args.repeats))
    matmul = measured_matmul_flops(2048)
    print(f"measured matmul rate (2048^3 fp32, jax): {matmul / 1e9:.1f} GFLOP/s")
    print(f"{'pass':<18}{'r1jax tok/s':>14}{'transformers tok/s':>20}{'ratio':>8}{'r1jax % of matmul':>20}")
    for name, (tj, tt_) in results.items():
        frac = model_flops(cfg, n_tok, args.seq, name != "forward") / tj / matmul
        print(f"{name:<18}{n_tok / tj:>14.0f}{n_tok / tt_:>20.0f}{tt_ / tj:>8.2f}{100 * frac:>19.1f}%")


if __name__ == "__main__":
    main()
