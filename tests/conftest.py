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
