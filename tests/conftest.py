import os

# 8 simulated CPU devices for mesh tests; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Most of the suite's time is XLA compiling tiny programs; without its expensive backend passes two
# compile-bound model tests took 59 s instead of 99 s (2026-11-23). It changes how fast the code is,
# not what it computes. Subprocesses inherit it; tests/test_demo.py turns it off (its run is
# compute-bound, like the demo it checks).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# No persistent compilation cache by default: on CI (2026-11-23) jaxlib 0.10.2 aborted the whole
# process while serializing a CPU executable for it (`put_executable_and_time`), which no test can
# catch. Set JAX_COMPILATION_CACHE_DIR yourself to use one.

import gc  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# Every XLA:CPU executable holds about 15 memory mappings of JIT code (more for big programs), and
# jax keeps each one alive in its caches for the life of the process. An xdist worker runs many
# files one after another, so it reached Linux's per-process limit (vm.max_map_count, 65,530): the
# core of the worker that died on 2026-12-02 held 63,833 mappings, its last compile failed with
# "Failed to materialize symbols" (the JIT could not map memory) and throwing that error crashed
# the C++ unwinder (SIGSEGV, then xdist waited forever for the dead worker). test_model.py alone
# reaches 42,000. So the caches are dropped after each file, and within a file once the process
# holds CLEAR_ABOVE mappings; a file's tests otherwise share their compiled programs.
CLEAR_ABOVE = 20_000


def memory_mappings() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: nothing to count, and the caches are still dropped per file
        return 0


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if "jax" not in sys.modules:
        return
    if nextitem is None or nextitem.module is not item.module or memory_mappings() > CLEAR_ABOVE:
        sys.modules["jax"].clear_caches()
        gc.collect()
