"""Weight conversion throughput (HF ⇄ orbax) beside the raw read speed of the same files.

Writes a random V3-architecture model of about --size-mb as a sharded Hugging Face directory, then,
in the same process: reads every safetensors file start to end (raw read, the ceiling for anything
that has to read them), converts it to an r1jax orbax checkpoint and back. Best of --repeats each;
throughput = HF weight bytes / wall time. Conversion times include the single flush to disk that
publishing a directory does (reported separately), the raw read does not. Expect the page cache to
hold the files (they were just written), as it would after a download.

    python benchmarks/convert.py [--size-mb 1024] [--dtype bfloat16] [--repeats 3] [--tmp DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="approximate model size (default 1024)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: a new temporary one)")
    return ap.parse_args(argv)


def model_config(size_mb: int, dtype: str):
    """V3-shaped layers (MLA, 8 routed experts of 4 MB tensors in bf16), as many as make size_mb."""
    import r1jax
    from r1jax.model.params import count_params

    base = dict(model_type="deepseek_v3", vocab_size=16000, hidden_size=2048, intermediate_size=4096,
                moe_intermediate_size=1024, num_attention_heads=16, n_shared_experts=1, n_routed_experts=8,
                num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=512,
                q_lora_rank=768, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
                num_nextn_predict_layers=0)
    itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    layers = 2
    while True:
        cfg = r1jax.ModelConfig.from_hf_config({**base, "num_hidden_layers": layers})
        if count_params(cfg) * itemsize >= size_mb * 1e6 or layers > 200:
            return cfg
        layers += 1


def write_model(directory: Path, cfg, dtype: str) -> int:
    from r1jax.convert.hf import tensor_plan
    from r1jax.convert.hf_io import write_config_files
    from r1jax.convert.safetensors_io import DTYPES, ShardedWriter

    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    plan = tensor_plan(cfg, dtype)
    with ShardedWriter(directory, plan, 500 * 10**6) as writer:
        for p in plan:
            writer.write(p.name, (rng.random(p.shape, np.float32) - 0.5).astype(DTYPES[p.dtype]))
    write_config_files(directory, cfg, dtype)
    return sum(p.nbytes for p in plan)


def raw_read(directory: Path) -> float:
    """Seconds to read every safetensors file once, 16 MB at a time into one reused buffer."""
    buf = bytearray(16 << 20)
    start = time.perf_counter()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def relayout(directory: Path) -> float:
    """Seconds to read every tensor into the r1jax layout (transposes included), writing nothing: the
    part of hf-to-orbax that is r1jax's own, slab by slab as the converter does it."""
    from r1jax.convert import hf, hf_io
    from r1jax.convert.commands import _budget
    from r1jax.model.params import param_dtype

    with hf_io.open_hf(directory) as ckpt:
        start = time.perf_counter()
        for e in hf.entries(ckpt.cfg):
            dtype = np.dtype(param_dtype(e.spec, ckpt.cfg))
            for slab in hf.slabs(e, _budget(ckpt.cfg), dtype.itemsize):
                hf.fill_slab(e, ckpt.source, slab, dtype)
        return time.perf_counter() - start


def best(fn, repeats: int, reset):
    times, flushes = [], []
    for _ in range(repeats):
        reset()
        flush = _FlushTimer.install()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        flushes.append(flush.seconds)
    i = int(np.argmin(times))
    return times[i], flushes[i]


class _FlushTimer:
    """Times the os.sync() with which convert.atomic publishes a directory."""
    seconds = 0.0

    @classmethod
    def install(cls):
        import r1jax.convert.atomic as atomic

        timer = cls()
        real = getattr(os.sync, "__wrapped__", os.sync)

        def sync():
            start = time.perf_counter()
            real()
            timer.seconds += time.perf_counter() - start

        sync.__wrapped__ = real
        atomic.os.sync = sync
        return timer


def main(argv=None) -> None:
    args = parse_args(argv)
    from r1jax.convert.commands import hf_to_orbax, orbax_to_hf

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="r1jax-bench-convert-"))
    try:
        cfg = model_config(args.size_mb, args.dtype)
        nbytes = write_model(tmp / "hf", cfg, args.dtype)
        n_files = len(list((tmp / "hf").glob("*.safetensors")))
        print(f"model: {cfg.num_hidden_layers} layers, {nbytes / 1e6:.0f} MB of {args.dtype} weights in "
              f"{n_files} safetensors files; {os.cpu_count()} CPUs")
        t_raw = min(raw_read(tmp / "hf") for _ in range(args.repeats))
        t_relayout = min(relayout(tmp / "hf") for _ in range(args.repeats))

        def rm(*names):
            return lambda: [shutil.rmtree(tmp / n, ignore_errors=True) for n in names]

        t_h2o, f_h2o = best(lambda: hf_to_orbax(tmp / "hf", tmp / "orbax", progress=False), args.repeats, rm("orbax"))
        t_o2h, f_o2h = best(lambda: orbax_to_hf(tmp / "orbax", tmp / "hf2", progress=False, max_shard_size="500MB"),
                            args.repeats, rm("hf2"))
        gbs = lambda t: nbytes / t / 1e9  # noqa: E731
        print(f"raw read of the HF files     {gbs(t_raw):6.2f} GB/s  ({t_raw:.2f} s)")
        print(f"read + r1jax layout, no write {gbs(t_relayout):5.2f} GB/s  ({t_relayout:.2f} s)")
        for name, t, f in (("hf-to-orbax", t_h2o, f_h2o), ("orbax-to-hf", t_o2h, f_o2h)):
            print(f"{name:28s} {gbs(t):6.2f} GB/s  ({t:.2f} s, of which final flush {f:.2f} s)  "
                  f"= {t_raw / t:.0%} of raw read; without the flush {gbs(t - f):.2f} GB/s = {t_raw / (t - f):.0%}")
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
