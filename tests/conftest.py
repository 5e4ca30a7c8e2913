import atexit
import os
import shutil
import tempfile

# 8 simulated CPU devices for mesh tests; set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One persistent XLA compilation cache for the whole session, shared with the subprocesses the tests
# start (CLI runs, kill -9 and multi-host tests): many tests compile the same train/sample step for
# the same tiny shapes, and on 2 cores compilation is most of the suite's time. Fresh per session,
# so no run depends on another's leftovers; set JAX_COMPILATION_CACHE_DIR to keep one across runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="r1jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
