"""Conversion streams: converting a ~480 MB model of ~1,700 tensors both ways, and to DeepSeek's FP8
format and back, never holds more than 3x its largest tensor (16.8 MB) above the converting process's
baseline, measured as peak RSS (VmHWM) in a subprocess."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from convert_fixtures import moe_config, write_random_hf
from r1jax.convert.hf import largest_tensor_bytes
from r1jax.convert.safetensors_io import SafetensorsReader

# Runs in a fresh interpreter. The baseline is taken after the imports and after converting a tiny
# model once, so one-time allocations (tensorstore and orbax thread pools, caches) count as baseline
# and what is measured is what grows with the model. clear_refs=5 resets VmHWM (Linux >= 4.0).
SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from convert_fixtures import moe_config, write_random_hf
    from r1jax.convert.commands import hf_to_orbax, orbax_to_hf

    def vm(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def measured(fn):
        open("/proc/self/clear_refs", "w").write("5")
        base = vm("VmRSS")
        fn()
        return {"baseline": base, "peak": vm("VmHWM")}

    work, src = Path(sys.argv[2]), Path(sys.argv[3])
    imports = vm("VmRSS")
    write_random_hf(work / "tiny", moe_config())
    hf_to_orbax(work / "tiny", work / "tiny_orbax", progress=False)
    orbax_to_hf(work / "tiny_orbax", work / "tiny_hf", progress=False)
    out = {"after_imports": imports}
    out["hf_to_orbax"] = measured(lambda: hf_to_orbax(src, work / "orbax", progress=False))
    out["orbax_to_hf"] = measured(lambda: orbax_to_hf(work / "orbax", work / "hf", max_shard_size="100MB",
                                                      progress=False))
    out["orbax_to_fp8"] = measured(lambda: orbax_to_hf(work / "orbax", work / "fp8", max_shard_size="100MB",
                                                       quantize="fp8", progress=False))
    out["fp8_to_orbax"] = measured(lambda: hf_to_orbax(work / "fp8", work / "orbax2", progress=False))
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_peak_memory_is_a_small_multiple_of_the_largest_tensor(tmp_path):
    cfg = moe_config(hidden=256, vocab=16384, layers=8, experts=64, moe_ffn=256, ffn=1024)
    total = write_random_hf(tmp_path / "src", cfg, "float32", max_shard_bytes=100_000_000)
    largest = largest_tensor_bytes(cfg)
    n_tensors = len(SafetensorsReader(tmp_path / "src").names)
    assert total > 400e6 and n_tensors > 1500 and largest < total / 25

    argv = [sys.executable, "-c", SCRIPT, str(Path(__file__).parent), str(tmp_path), str(tmp_path / "src")]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for direction in ("hf_to_orbax", "orbax_to_hf", "orbax_to_fp8", "fp8_to_orbax"):
        grown = result[direction]["peak"] - result[direction]["baseline"]
        base = result[direction]["baseline"]
        print(f"{direction}: peak {grown / 1e6:.1f} MB above a baseline of {base / 1e6:.0f} MB "
              f"(bound 3 x {largest / 1e6:.1f} MB; model {total / 1e6:.0f} MB in {n_tensors} tensors)")
        assert grown < 3 * largest, (direction, grown, largest)
    for f in sorted((tmp_path / "src").glob("*.safetensors")):  # and the round trip is exact
        assert f.read_bytes() == (tmp_path / "hf" / f.name).read_bytes(), f.name
