"""What every benchmark here shares, so a loaded machine cannot pass for a fast r1jax.

- `pin_threads(n)` before jax or torch start computing: the process is bound to n CPUs
  (`sched_setaffinity`; XLA sizes its CPU thread pool from the CPUs it may run on) and torch gets
  n intra-op threads, so both sides use the same cores.
- `interleaved(a, b, pairs)` times A, B, A, B, … (after one warm-up call of each), so a burst of
  other work lands on both sides, and reports each pair's ratio B/A (how many times faster A is).
- `Comparison` carries the median ratio and its spread, (max - min) / median of the pair ratios;
  a spread over `NOISY` (15%) marks the row "noisy": rerun it on a quiet machine before quoting it.
- `load()` is the 1-minute load average, printed before and after each run: on a 2-core machine
  torch's threads lose far more to other load than XLA's, which flatters r1jax.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable

NOISY = 0.15


def pin_threads(n: int | None = None) -> int:
    """Bind this process to its first n CPUs (default: all it may use) and give torch n threads.
    Call before the first jax computation. -> n."""
    cpus = sorted(os.sched_getaffinity(0))
    n = len(cpus) if n is None else n
    if not 1 <= n <= len(cpus):
        raise SystemExit(f"--threads: {n} is not between 1 and the {len(cpus)} CPUs this process may use")
    os.sched_setaffinity(0, cpus[:n])
    try:
        import torch
    except ImportError:
        return n
    torch.set_num_threads(n)
    return n


def load() -> float:
    return os.getloadavg()[0]


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Comparison:
    a_seconds: tuple[float, ...]  # r1jax, one per pair
    b_seconds: tuple[float, ...]  # the reference
    load_before: float
    load_after: float

    @property
    def ratios(self) -> list[float]:
        return [b / a for a, b in zip(self.a_seconds, self.b_seconds)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        r = self.ratios
        return (max(r) - min(r)) / statistics.median(r)

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY

    @property
    def a(self) -> float:
        return statistics.median(self.a_seconds)

    @property
    def b(self) -> float:
        return statistics.median(self.b_seconds)

    def verdict(self) -> str:
        return (f"{self.ratio:.2f}x (pairs {min(self.ratios):.2f}-{max(self.ratios):.2f}, spread "
                f"{100 * self.spread:.0f}%{', NOISY' if self.noisy else ''}; load {self.load_before:.2f} -> "
                f"{self.load_after:.2f})")


def interleaved(a: Callable[[], object], b: Callable[[], object], pairs: int = 5) -> Comparison:
    """Time a and b alternately, `pairs` times each, after one untimed call of each (compile, caches)."""
    if pairs < 1:
        raise SystemExit(f"--pairs: must be >= 1, got {pairs}")
    before = load()
    a(), b()
    ta, tb = [], []
    for _ in range(pairs):
        ta.append(seconds(a))
        tb.append(seconds(b))
    return Comparison(tuple(ta), tuple(tb), before, load())


def header(what: str, threads: int) -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    return (f"{what}\nmachine: {os.cpu_count()} CPUs ({cpu}), {threads} thread(s) each side; "
            f"load average now {load():.2f} (1 min)")


def round_robin(fns: dict[str, Callable[[], object]], rounds: int = 5) -> dict[str, tuple[float, ...]]:
    """Several variants timed in turn (a, b, c, a, b, c, …) after one untimed call each: name -> seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: tuple(t) for name, t in times.items()}


def versus(times: dict[str, tuple[float, ...]], reference: str, name: str) -> Comparison:
    """`name` against `reference` from one round_robin: the per-round ratios reference / name."""
    return Comparison(times[name], times[reference], float("nan"), float("nan"))
