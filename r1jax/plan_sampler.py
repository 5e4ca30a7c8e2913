"""`r1jax plan`'s sampler: the prefill and one decode step that `sample` runs, compiled by XLA:TPU for
the plan's topology and mesh beside the analytic estimate (`plan.sampler_analytic`); and the primitives
the plan's tables share (compiling a lowered program, its peak, byte units).

The programs are `infer.sampler.lower_prefill` / `lower_decode`: the sampler's own `_start` and `_step`
(the two halves of its jitted `_generate`) on abstract inputs placed as `sample_rows` places them
(params as `_place_params` shards them, rows and the cache split over the batch axes), with the
dropless MoE dispatch the sampler switches to (`capacity_ep` becomes `ragged_ep` on TPU). Nothing is
allocated. `_generate` runs the two in one program with a `lax.while_loop`; the plan takes the larger
of their peaks as the sampler's.

What is sampled:
- a GRPO stage: its rollout, prompts.batch_size × num_generations rows of prompts.seq_len prompt
  tokens (padded to the sampler's power-of-two bucket P) and max_new_tokens new ones, while the rest
  of the GRPO state (Adam μ, ν; π_ref when β > 0) stays resident in HBM beside it;
- a train config: the trained model sampling `--sample-batch` rows (default data.batch_size, the
  global batch) of `--sample-len` tokens (default data.seq_len: the length it was trained on), the
  last `--sample-new` of them generated (default half), as `r1jax sample` or an evaluation would on
  the same mesh, params only.
The cache holds S = P + max_new_tokens - 1 slots per row (infer/sampler.py's layout).
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax

from r1jax.config import ModelConfig
from r1jax.errors import ConfigError
from r1jax.infer import sampler
from r1jax.model.kv_cache import resolve_cache
from r1jax.parallel import rules as rules_lib

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")


@dataclasses.dataclass
class Program:
    """One compiled program: XLA's memory_analysis fields (bytes per device), compile time, flops."""

    compiled: dict[str, int] | None = None
    compile_seconds: float | None = None
    flops: float | None = None  # XLA's cost_analysis, per device


class Refused(Exception):
    """XLA refused to compile a program: it needs more memory than the chip has."""

    def __init__(self, message: str, seconds: float):
        super().__init__(message)
        self.message, self.seconds = message, seconds

    @property
    def needed(self) -> str:
        """What XLA says the program needs, e.g. 'HLO temporaries 17.25G > 15.75G HBM' (binary units)."""
        m = re.search(r"required for (.+?) \(([\d.]+\w?)\) exceeds available HBM \(([\d.]+\w?)\)", self.message)
        return f"{m[1]} {m[2]} > {m[3]} HBM" if m else self.message


def compile_into(lower, result) -> None:
    """Compile `lower()` and record its memory, compile time and flops on `result` (a Program or Plan).
    Raises Refused when XLA runs out of device memory compiling it (its verdict: does not fit)."""
    t = time.perf_counter()
    lowered = lower()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        first = str(e).split("RESOURCE_EXHAUSTED:", 1)[-1].strip().splitlines()[0]
        raise Refused(first, time.perf_counter() - t) from None
    result.compile_seconds = time.perf_counter() - t
    stats = compiled.memory_analysis()
    result.compiled = {f: int(getattr(stats, f)) for f in MEMORY_FIELDS}
    cost = compiled.cost_analysis()
    result.flops = (cost[0] if isinstance(cost, list) else cost or {}).get("flops")


def peak_bytes(c: dict[str, int]) -> int:
    """XLA's live buffers at the step's peak: inputs and outputs (donated ones once) and temporaries."""
    return c["argument_size_in_bytes"] + c["output_size_in_bytes"] - c["alias_size_in_bytes"] + c["temp_size_in_bytes"]


def with_code(c: dict[str, int]) -> int:
    """The peak with the program's code, which sits in HBM too."""
    return peak_bytes(c) + c["generated_code_size_in_bytes"]


def unit_of(total: float) -> tuple[str, float]:
    return ("GB", 1e9) if total >= 1e9 else ("MB", 1e6)


def fmt(x: float, unit: tuple[str, float]) -> str:
    return f"{x / unit[1]:,.2f}"


@dataclasses.dataclass
class SamplerPlan:
    what: str  # where the rows and lengths come from
    rows: int  # global rows as compiled: padded to a multiple of the batch split, as sample_rows pads
    rows_per_device: int
    prompt_len: int  # the prompt bucket P
    max_new_tokens: int
    model: ModelConfig  # as the sampler runs it (dropless MoE dispatch)
    cache: str  # the cache mode (the architecture's default)
    resident: float = 0.0  # training state resident beside the sampler, not its argument (GRPO)
    analytic: dict[str, float] = dataclasses.field(default_factory=dict)  # plan.sampler_analytic
    prefill: Program = dataclasses.field(default_factory=Program)
    decode: Program = dataclasses.field(default_factory=Program)

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.max_new_tokens - 1


def layout(m: ModelConfig, mesh, rules, rows: int, prompt_len: int, max_new_tokens: int, what: str,
           keys: str = "--sample-len/--sample-new", resident: float = 0.0) -> SamplerPlan:
    """The sampler's shapes on `mesh` (before anything is compiled); errors name `keys`."""
    if rows < 1 or prompt_len < 1 or max_new_tokens < 1:
        raise ConfigError(f"{keys}: the sampler needs >= 1 row, prompt token and new token; got {rows} rows, "
                          f"{prompt_len} + {max_new_tokens} tokens")
    if prompt_len + max_new_tokens > m.max_position_embeddings:
        raise ConfigError(f"{keys}: {prompt_len} prompt + {max_new_tokens} new tokens exceed "
                          f"model.max_position_embeddings={m.max_position_embeddings}")
    split = rules_lib.split_of("batch", rules, rules_lib.mesh_sizes(mesh))
    padded = -(-rows // split) * split
    m = sampler.dropless(m, mesh)
    return SamplerPlan(what, padded, padded // split, sampler.prompt_bucket(prompt_len), max_new_tokens, m,
                       resolve_cache(m, None), resident)


def compile_programs(sp: SamplerPlan, mesh, rules) -> None:
    """The prefill and one decode step compiled for `mesh`'s devices (the prompt bucket's length, so
    `prompt_len=sp.prompt_len` lowers exactly the bucket)."""
    args = (sp.model, mesh, sp.rows, sp.prompt_len, sp.max_new_tokens)
    compile_into(lambda: sampler.lower_prefill(*args, cache=sp.cache, rules=rules), sp.prefill)
    compile_into(lambda: sampler.lower_decode(*args, cache=sp.cache, rules=rules), sp.decode)


def _working(sp: SamplerPlan, program: str) -> float:
    """The analytic items named after `program` (its working set)."""
    return sum(v for k, v in sp.analytic.items() if k.startswith(f"{program}:"))


def _totals(sp: SamplerPlan) -> dict[str, float]:
    """Analytic bytes per program: the items both hold (params, the cache) and its working set."""
    common = sum(v for k, v in sp.analytic.items() if ":" not in k)
    return {p: common + _working(sp, p) for p in ("prefill", "decode")}


def peak(sp: SamplerPlan) -> tuple[float, str]:
    """(the sampler's peak per chip with its code and the resident state, the program it comes from)."""
    name = max(("prefill", "decode"), key=lambda p: with_code(getattr(sp, p).compiled))
    return with_code(getattr(sp, name).compiled) + sp.resident, name


def lines(sp: SamplerPlan) -> list[str]:
    """The sampler's section of the plan: its shapes, the analytic items, XLA:TPU beside them."""
    m, (pre, dec) = sp.model, (sp.prefill.compiled, sp.decode.compiled)
    totals = _totals(sp)
    unit = unit_of(max(with_code(pre), with_code(dec), *totals.values()) + sp.resident)
    out = [f"sampler: {sp.what}: {sp.rows} rows ({sp.rows_per_device} per chip), prompt bucket {sp.prompt_len} + "
               f"{sp.max_new_tokens} new tokens, a {sp.cache} cache of {sp.cache_len} slots per row; moe_dispatch="
               f"{m.moe_dispatch} (dropless)",
           f"compiled prefill in {sp.prefill.compile_seconds:.1f} s, decode step in {sp.decode.compile_seconds:.1f} s; "
           f"{sp.prefill.flops or 0:,.0f} + {sp.decode.flops or 0:,.0f} flops per chip (XLA)",
           "", f"| sampler, per chip (analytic) | {unit[0]} |", "|---|---:|"]
    out += [f"| {k} | {fmt(v, unit)} |" for k, v in sp.analytic.items()]
    if sp.resident:
        out.append(f"| resident beside it: the rest of the training state | {fmt(sp.resident, unit)} |")
    params, cache = sp.analytic["params"], totals["prefill"] - sp.analytic["params"] - _working(sp, "prefill")
    rows = [("arguments (params; decode: + the cache, donated)", "argument_size_in_bytes", params, params + cache),
            ("outputs (logits + the cache)", "output_size_in_bytes", cache, cache),
            ("temporaries", "temp_size_in_bytes", _working(sp, "prefill"), _working(sp, "decode"))]
    out += ["", f"| sampler, per chip ({unit[0]}) | prefill XLA:TPU | decode XLA:TPU | prefill analytic | "
                f"decode analytic |", "|---|---:|---:|---:|---:|"]
    out += [f"| {label} | {fmt(pre[f], unit)} | {fmt(dec[f], unit)} | {fmt(a, unit)} | {fmt(b, unit)} |"
            for label, f, a, b in rows]
    out.append(f"| peak + code | {fmt(with_code(pre), unit)} | {fmt(with_code(dec), unit)} | "
               f"{fmt(totals['prefill'], unit)} | {fmt(totals['decode'], unit)} |")
    return out
