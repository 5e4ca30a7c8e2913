"""Weight conversion throughput (HF ⇄ orbax) beside raw read and raw copy speed of the same files.

Writes a random V3-architecture model of about --size-mb as a sharded Hugging Face directory, then,
in the same process and all from a warm page cache (the files were just written, as after a
download; `fincore` confirms it on Linux):
- raw read: every safetensors file start to end into one reused 16 MB buffer (the ceiling for
  anything that reads them);
- raw copy: the same bytes read and written to new files (a converter's floor: it must write as
  much as it reads), then fsync'd to disk;
- hf-to-orbax, orbax-to-hf and orbax-to-hf --quantize fp8, each timed twice: as the command runs
  (the result written back to disk before it is published, the flush overlapping the conversion),
  and with the flush left out (the page-cache-only work, comparable to the raw read and copy).
Best of --repeats each; throughput = HF weight bytes (bf16) / wall time.

With --cold the source files are evicted from the page cache (fsync, then posix_fadvise DONTNEED)
before every timed run, so the raw read, the raw copy and each conversion read them from the disk:
the situation of a 671B conversion, whose 0.7-1.3 TB of inputs no page cache holds. Only the
"written back to disk" column is timed then.

    python benchmarks/convert.py [--size-mb 1024] [--dtype bfloat16] [--repeats 3] [--tmp DIR] [--cold]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

READ_BLOCK = 16 << 20


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024, help="approximate model size (default 1024)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats, best kept")
    ap.add_argument("--tmp", default=None, help="scratch directory (default: a new temporary one)")
    ap.add_argument("--cold", action="store_true", help="read every source from the disk, not the page cache")
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


def evict(directory: Path) -> None:
    """Drop `directory`'s files from the page cache (clean pages only, hence the fsync first)."""
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(directory: Path) -> float:
    """Seconds to read every safetensors file once, 16 MB at a time into one reused buffer."""
    buf = bytearray(READ_BLOCK)
    start = time.perf_counter()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - start


def raw_copy(directory: Path, dst: Path) -> tuple[float, float]:
    """(seconds to read every safetensors file and write it to dst, seconds to fsync the copies)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    buf = bytearray(READ_BLOCK)
    start = time.perf_counter()
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as src, open(dst / f.name, "wb", buffering=0) as out:
            while n := src.readinto(buf):
                out.write(memoryview(buf)[:n])
    copied = time.perf_counter() - start
    for f in sorted(dst.iterdir()):
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return copied, time.perf_counter() - start - copied


@contextlib.contextmanager
def page_cache_only():
    """Leave out the write-back to disk that publishing a directory does (r1jax.convert.atomic)."""
    import r1jax.convert.atomic as atomic

    saved = atomic.AtomicDir.flush_soon, atomic.fsync_tree, atomic._fsync_path
    atomic.AtomicDir.flush_soon = lambda *a, **k: None
    atomic.fsync_tree = atomic._fsync_path = lambda path: None
    try:
        yield
    finally:
        atomic.AtomicDir.flush_soon, atomic.fsync_tree, atomic._fsync_path = saved


def best(fn, repeats: int, reset, flush: bool = True, cold: Path | None = None) -> float:
    """Best wall time of `fn` over `repeats`, after `reset()` (and evicting `cold`) each time."""
    times = []
    for _ in range(repeats):
        reset()
        if cold is not None:
            evict(cold)
        with contextlib.nullcontext() if flush else page_cache_only():
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    from r1jax.convert.commands import hf_to_orbax, orbax_to_hf

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="r1jax-bench-convert-"))
    try:
        cfg = model_config(args.size_mb, args.dtype)
        nbytes = write_model(tmp / "hf", cfg, args.dtype)
        n_files = len(list((tmp / "hf").glob("*.safetensors")))
        print(f"model: {cfg.num_hidden_layers} layers, {nbytes / 1e6:.0f} MB of {args.dtype} weights in "
              f"{n_files} safetensors files; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        cold = (lambda d: (evict(d), d)[1]) if args.cold else (lambda d: d)  # noqa: E731
        t_raw = min(raw_read(cold(tmp / "hf")) for _ in range(args.repeats))
        copies = [raw_copy(cold(tmp / "hf"), tmp / "copy") for _ in range(args.repeats)]
        t_copy, t_copy_sync = min(c[0] for c in copies), min(sum(c) for c in copies)
        shutil.rmtree(tmp / "copy")

        def rm(*names):
            return lambda: [shutil.rmtree(tmp / n, ignore_errors=True) for n in names]

        h2o = lambda: hf_to_orbax(tmp / "hf", tmp / "orbax", progress=False)  # noqa: E731
        o2h = lambda: orbax_to_hf(tmp / "orbax", tmp / "hf2", progress=False, max_shard_size="500MB")  # noqa: E731
        o2f = lambda: orbax_to_hf(tmp / "orbax", tmp / "fp8", progress=False, max_shard_size="500MB",  # noqa: E731
                                  quantize="fp8")
        f2o = lambda: hf_to_orbax(tmp / "fp8", tmp / "orbax2", progress=False)  # noqa: E731
        rows = ([("raw read", None, t_raw), ("raw copy", None, t_copy_sync)] if args.cold
                else [("raw read", t_raw, None), ("raw copy", t_copy, t_copy_sync)])
        for name, fn, src, out in (("hf-to-orbax", h2o, "hf", "orbax"), ("orbax-to-hf", o2h, "orbax", "hf2"),
                                   ("orbax-to-hf --quantize fp8", o2f, "orbax", "fp8"),
                                   ("hf-to-orbax from that fp8", f2o, "fp8", "orbax2")):
            if args.cold:  # the page-cache-only column means nothing when the reads go to the disk
                rows.append((name, None, best(fn, args.repeats, rm(out), cold=tmp / src)))
                continue
            cached = best(fn, args.repeats, rm(out), flush=False)
            durable = best(fn, args.repeats, rm(out))
            rows.append((name, cached, durable))
        gbs = lambda t: nbytes / t / 1e9  # noqa: E731
        print(f"{'(cold: sources on disk)' if args.cold else '(warm page cache)':28s} "
              f"{'page cache only':>26s}  {'written back to disk':>26s}")
        for name, cached, durable in rows:
            line = f"{name:28s} " + (f"{gbs(cached):6.2f} GB/s {cached:5.2f} s {t_raw / cached:5.0%}" if cached
                                     else f"{'—':>26s}")
            if durable is not None:
                line += f"  {gbs(durable):6.2f} GB/s {durable:5.2f} s {t_raw / durable:5.0%}"
            print(line)
        print("percentages: of the raw read speed")
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
