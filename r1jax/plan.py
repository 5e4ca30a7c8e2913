"""`r1jax plan`: what one device holds when a config trains on a mesh, without the hardware.

Two views of the same train step:

- Analytic (always): parameters, Adam moments and gradients are exact per-device sums over the param
  table with the rules' shardings; activations are an itemized estimate from the shapes the model
  computes (per layer: residual kept for the backward pass; one layer's working set, forward and
  backward; the logits). Large meshes (256 devices, 671B params) are planned this way; the train step
  is also traced and lowered for an `AbstractMesh` of that size (shape and sharding errors show up, no
  weights are allocated, nothing is compiled).
- Compiled (when the mesh fits the local devices, e.g. 8 simulated CPU devices with
  `XLA_FLAGS=--xla_force_host_platform_device_count=8`): XLA's `memory_analysis()` of the sharded
  train step compiled from abstract inputs; its argument bytes check the analytic state bytes.
- Compiled for a TPU topology (`--topology v5p-128`, with libtpu installed): the same step compiled by
  XLA:TPU for that slice's compile-only devices (parallel/topology.py), on this CPU host; its
  `memory_analysis()` is the per-chip memory, checked against the chip's HBM. A GRPO stage's config
  compiles its policy update instead (analytic side: its state, policy + Adam + π_ref).
- The sampler, with `--topology` (plan_sampler.py): the prefill and one decode step of
  `infer.sampler` compiled by XLA:TPU on the same mesh (`lower_prefill`/`lower_decode`), beside the
  analytic params + KV cache + working set (`sampler_analytic`): a GRPO stage's rollout (with the rest
  of its state resident), or for a train config `--sample-batch` rows (default: the data batch) of
  `--sample-len` tokens (default: seq_len), the last `--sample-new` of them generated (default: half).
  The verdict (`fits:`, the last line) is the larger of the step's and the sampler's peaks; the line
  above it says which. `--no-sampler` leaves the sampler out.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from r1jax import config as config_lib
from r1jax import plan_sampler
from r1jax.config import GRPOConfig, ModelConfig, TrainConfig
from r1jax.errors import ConfigError
from r1jax.model import flash as flash_lib
from r1jax.model import kv_cache
from r1jax.model import moe as moe_lib
from r1jax.model.arch import architecture
from r1jax.model.experts import receive_rows
from r1jax.model.params import param_table
from r1jax.model.sharding import replicated_dims
from r1jax.model.specs import block_specs, is_spec
from r1jax.parallel import mesh as mesh_lib
from r1jax.parallel import rules as rules_lib
from r1jax.parallel import topology as topology_lib
from r1jax.plan_sampler import SamplerPlan, peak_bytes, with_code
from r1jax.plan_sampler import compile_into as _compile
from r1jax.plan_sampler import fmt as _fmt
from r1jax.plan_sampler import unit_of as _unit


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    memory: float  # bytes of accelerator memory per device
    platform: str  # XLA platform to lower for


HARDWARE = {
    "h100": Hardware("NVIDIA H100 (80 GB)", 80e9, "cuda"),
    "h200": Hardware("NVIDIA H200 (141 GB)", 141e9, "cuda"),
    # TPUs: the HBM per chip that `--topology` uses too (95.74 GiB for a v5p, as XLA:TPU allows).
    "v5p": Hardware("TPU v5p (95.74 GiB)", topology_lib.HBM_BYTES["TPU v5"], "tpu"),
    "v5e": Hardware("TPU v5e (15.75 of 16 GiB)", topology_lib.HBM_BYTES["TPU v5 lite"], "tpu"),
    "v6e": Hardware("TPU v6e (31.25 of 32 GiB)", topology_lib.HBM_BYTES["TPU v6 lite"], "tpu"),
}


@dataclasses.dataclass
class Plan:
    config: str
    mesh: dict[str, int]
    devices: int
    hardware: Hardware | None
    rows_per_device: int  # micro-batch rows per device
    seq_len: int
    analytic: dict[str, float]  # item -> bytes per device (the last one is the total)
    compiled: dict[str, int] | None = None  # XLA memory_analysis fields, bytes per device
    lowered_for: str | None = None  # platform the step was lowered for on an abstract mesh
    replicated: list[str] = dataclasses.field(default_factory=list)
    model: ModelConfig | None = None
    topology: topology_lib.Topology | None = None  # compiled by XLA:TPU for this slice
    compile_seconds: float | None = None
    flops: float | None = None  # XLA's cost_analysis, per device
    step: str = "train step"  # the compiled step's name in the verdict
    tokens: int = 0  # tokens per optimizer step, all devices
    refused: plan_sampler.Refused | None = None  # XLA ran out of HBM compiling the step or the sampler
    sampler: SamplerPlan | None = None  # the sampler's programs on the same mesh (with a topology)


# --------------------------------------------------------------------------- analytic


def _bytes(dtype) -> int:
    return jnp.dtype(dtype).itemsize


def _per_device(names, shape, itemsize, rules, sizes) -> float:
    """Bytes of one device's shard of an array with logical `names`."""
    axes = rules_lib.resolve(names, shape, rules, sizes)
    return math.prod(shape) * itemsize / math.prod(sizes[a] for dim in axes for a in dim)


def state_bytes(model: ModelConfig, rules, sizes: dict[str, int],
                moment_dtype: str = "float32") -> dict[str, float]:
    """Exact per-device bytes of params, Adam μ and ν (trainable leaves; in the param dtype, or bf16
    with optimizer.moment_dtype=bfloat16, train/optimizer.py), gradients."""
    params = trainable = moments = 0.0
    for path, s in jax.tree_util.tree_flatten_with_path(param_table(model), is_leaf=is_spec)[0]:
        itemsize = _bytes(s.dtype or model.param_dtype)
        b = _per_device(s.axes, s.shape, itemsize, rules, sizes)
        params += b
        if getattr(path[-1], "key", None) != "router_bias":  # moved by the balancing rule, not by Adam
            trainable += b
            moments += b if moment_dtype == "float32" else b / itemsize * _bytes(moment_dtype)
    return {"params": params, "optimizer": 2 * moments, "gradients": trainable}


def _gathered_layer(model: ModelConfig, rules, sizes) -> float:
    """One MoE layer's weights as the layer computes with them: FSDP dims gathered, expert and tensor
    splits kept, in the compute dtype."""
    fsdp_names = {"embed", "q_lora", "kv_lora", "mtp_concat"}
    total = 0.0
    layer = block_specs(model, moe=model.n_routed_experts > 0)
    for s in jax.tree.leaves(layer, is_leaf=is_spec):
        axes = rules_lib.resolve(s.axes, s.shape, rules, sizes)
        kept = math.prod(sizes[a] for name, dim in zip(s.axes, axes) if name not in fsdp_names for a in dim)
        total += math.prod(s.shape) * _bytes(model.dtype) / kept
    return total


def _attention_set(m: ModelConfig, B: int, T: int, a: int, rules, sizes) -> float:
    H, K, L, R, V = m.num_attention_heads, m.qk_head_dim, m.kv_lora_rank, m.qk_rope_head_dim, m.v_head_dim
    act = lambda names, shape, size=a: _per_device(names, shape, size, rules, sizes)  # noqa: E731
    per_head = ("batch", "length", "act_heads", None)
    return (act(("batch", "length", "act_embed"), (B, T, m.hidden_size)) * 2  # normed input, output
            + act(("batch", "length", None), (B, T, m.q_lora_rank or 0))
            + act(per_head, (B, T, H, K)) + act(per_head, (B, T, H, m.qk_nope_head_dim + V))
            + act(("batch", "length", None), (B, T, L + R)) + act(per_head, (B, T, H, V))
            + _scores_set(m, B, T, a, act))


def _scores_set(m: ModelConfig, B: int, T: int, a: int, act) -> float:
    """The attention weights' working set: `dot` materializes all [B,H,T,T] (fp32 scores and softmax,
    probs in the compute dtype); the blockwise forms one block of queries x keys at a time (fp32 s, p,
    dp, ds: model/flash.py's backward) plus fp32 accumulators for the context and dq."""
    H = m.num_attention_heads
    scores, per_head = ("batch", "act_heads", "length", None), ("batch", "length", "act_heads", None)
    if m.attention_impl == "dot":
        return act(scores, (B, H, T, T), 4) * 2 + act(scores, (B, H, T, T))
    c = min(flash_lib.BLOCK, T)
    return (4 * act(scores, (B, H, c, c), 4)
            + act(per_head, (B, T, H, m.qk_head_dim), 4) + act(per_head, (B, T, H, m.v_head_dim), 4))


def _moe_set(m: ModelConfig, n: float, a: int, rules, sizes) -> float:
    """Per-device working set of the MoE FFN for n local tokens."""
    E, k, D = m.n_routed_experts, m.num_experts_per_tok, m.hidden_size
    tp = sizes["tensor"] if m.moe_intermediate_size % sizes["tensor"] == 0 else 1
    F = m.moe_intermediate_size / tp
    group = rules_lib.split_of("expert", rules, sizes)
    router = 3 * n * E * 4
    shared = 3 * n * m.shared_intermediate_size / tp * a
    if m.moe_dispatch in ("capacity", "capacity_ep"):
        slots = E * math.ceil(m.capacity_factor * n * k / E)
        routed = slots * (4 * D + 3 * F) * a  # send, receive, result, returned slots; gate, up, h
    elif m.moe_dispatch == "ragged_ep":
        rows = receive_rows(m, group, math.ceil(n))  # the receive buffer: worst case or ragged_buffer_factor's
        routed = rows * (3 * D + 3 * F) * a + n * k * D * a
    elif m.moe_dispatch == "ragged":
        routed = n * k * (2 * D + 3 * F) * a
    elif m.moe_dispatch == "blocked":  # copies padded to whole blocks, each block's weights gathered
        R = moe_lib.block_rows(math.ceil(n * k), E)
        blocks = (n * k + E * (R - 1)) / R
        routed = blocks * (R * (2 * D + 3 * F) + 3 * D * F) * a
    else:  # dense reference: every expert on every token
        routed = n * E * (D + 3 * F) * a
    return router + shared + routed + n * D * 4


def activation_bytes(cfg: TrainConfig, m: ModelConfig, sizes: dict[str, int]) -> dict[str, float]:
    """Itemized per-device activation estimate for one micro-batch."""
    rules = cfg.mesh
    B = cfg.data.batch_size // cfg.optimizer.grad_accum_steps
    T, a = cfg.data.seq_len, _bytes(m.dtype)
    act = lambda names, shape, size=a: _per_device(names, shape, size, rules, sizes)  # noqa: E731
    hidden = act(("batch", "length", "act_embed"), (B, T, m.hidden_size))
    tokens = B * T / rules_lib.split_of("batch", rules, sizes)
    attn = _attention_set(m, B, T, a, rules, sizes)
    dense = 3 * act(("batch", "length", "act_mlp"), (B, T, m.intermediate_size))
    moe = _moe_set(m, tokens, a, rules, sizes) if m.n_routed_experts else 0.0
    layer = attn + max(dense if m.num_dense_layers else 0.0, moe)
    layers = m.num_hidden_layers + m.num_nextn_predict_layers
    # jax.checkpoint keeps only each layer's input; without it every intermediate is kept.
    kept = hidden if m.remat_policy != "none" else hidden + layer
    heads = 1 + (m.num_nextn_predict_layers if cfg.mtp_loss_weight > 0 else 0)
    # fp32 logits, softmax and their gradient: for every head's T positions, or one loss_chunk at a time.
    logits = heads * 3 * act(("batch", "length", "act_vocab"), (B, cfg.loss_chunk or T, m.vocab_size), 4)
    return {f"activations: kept per layer (x{layers})": layers * kept,
            "activations: one layer forward + backward": 2 * layer,
            "activations: logits (main + MTP heads)": logits}


def analytic(cfg: TrainConfig, m: ModelConfig, sizes: dict[str, int]) -> dict[str, float]:
    state = state_bytes(m, cfg.mesh, sizes, cfg.optimizer.moment_dtype)
    items = {"params": state["params"], "optimizer state (Adam mu, nu)": state["optimizer"],
             "gradients": state["gradients"] * (2 if cfg.optimizer.grad_accum_steps > 1 else 1),
             "gathered weights (one layer, x2 for prefetch)": 2 * _gathered_layer(m, cfg.mesh, sizes)}
    items.update(activation_bytes(cfg, m, sizes))
    items["total"] = sum(items.values())
    return items


def sampler_analytic(m: ModelConfig, rules, sizes: dict[str, int], rows: int, P: int, S: int,
                     cache: str) -> dict[str, float]:
    """Per-device bytes of the sampler (infer/sampler.py) for `rows` global rows, a prompt bucket of P
    slots and a cache of S; `m` as the sampler runs it (dropless dispatch). Exact: params and the cache
    (only its rows are split). Estimates: each program's working set ("prefill: ...", "decode: ...")."""
    a, H, local = _bytes(m.dtype), m.num_attention_heads, rows / rules_lib.split_of("batch", rules, sizes)
    per_token = kv_cache.cache_bytes_per_token(m, cache)
    gathered = 2 * _gathered_layer(m, rules, sizes)

    def ffn(T):  # one layer's FFN over rows x T tokens: SwiGLU or the MoE, the larger
        dense = 3 * _per_device(("batch", "length", "act_mlp"), (rows, T, m.intermediate_size), a, rules, sizes)
        moe = _moe_set(m, local * T, a, rules, sizes) if m.n_routed_experts else 0.0
        return max(dense if m.num_dense_layers else 0.0, moe)

    # A decode step's attention: one query per row over the S slots, fp32 scores, masked and softmaxed.
    scores = 3 * _per_device(("batch", "length", "act_heads", None), (rows, 1, H, S), 4, rules, sizes)
    logits = local * m.vocab_size * 4  # f32, at one position per row
    return {"params": state_bytes(m, rules, sizes)["params"],
            f"KV cache ({cache}, {S} slots per row)": per_token * local * S,
            "prefill: gathered weights (one layer, x2 for prefetch)": gathered,
            f"prefill: one layer forward ({P} tokens per row)": _attention_set(m, rows, P, a, rules, sizes) + ffn(P),
            "prefill: the prompt's cache entries before padding": per_token * local * P,
            "prefill: logits": logits,
            "decode: gathered weights (one layer, x2 for prefetch)": gathered,
            "decode: one layer forward (scores over the cache)": _attention_set(m, rows, 1, a, rules, sizes)
            + scores + ffn(1),
            "decode: logits": logits}


# --------------------------------------------------------------------------- compile / lower


def _with_shardings(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def lower_step(cfg: TrainConfig, m: ModelConfig, mesh, platform: str | None = None):
    """The sharded train step traced and lowered from abstract inputs (nothing allocated)."""
    from r1jax.train import optimizer
    from r1jax.train.loop import batch_shapes
    from r1jax.train.step import StepOptions, make_train_step, step_shardings

    tx = optimizer.build(cfg.optimizer, cfg.steps)
    opts = dataclasses.replace(StepOptions.of(cfg), distill=None)  # the student's step, no teacher
    shapes = batch_shapes(cfg.data)
    abstract, sh = step_shardings(m, tx, cfg.seed, mesh, cfg.mesh, shapes)
    step = make_train_step(m, tx, opts, sh)
    with rules_lib.sharding_context(mesh, cfg.mesh):
        traced = step.trace(_with_shardings(abstract, sh.state), _with_shardings(shapes, sh.batch))
        return traced.lower(lowering_platforms=(platform,)) if platform else traced.lower()


def lower_grpo_update(cfg: GRPOConfig, mesh):
    """GRPO's policy update (every optimizer step of one rollout: μ passes over its mini-batches of
    micro-batches; policy, Adam and, with β > 0, π_ref in its state) traced and lowered from abstract
    inputs, sharded as `r1jax train` shards it."""
    from r1jax.model.params import param_shapes
    from r1jax.model.sharding import param_shardings
    from r1jax.rl import grpo_update
    from r1jax.train import optimizer

    m, tx = cfg.model, optimizer.build(cfg.optimizer, cfg.steps * grpo_update.optimizer_steps(cfg))
    abstract = jax.eval_shape(lambda p: grpo_update.init_state(p, tx, cfg), param_shapes(m))
    state_sh = rules_lib.state_shardings(abstract, param_shardings(m, mesh, cfg.mesh), mesh)
    shapes = grpo_update.batch_shapes(cfg)
    batch_sh = grpo_update.batch_shardings(shapes, mesh, cfg.mesh)
    update = grpo_update.make_steps(m, cfg, tx, state_sh, batch_sh, mesh).update
    with rules_lib.sharding_context(mesh, cfg.mesh):
        return update.trace(_with_shardings(abstract, state_sh), _with_shardings(shapes, batch_sh)).lower()


def _tpu_hardware(topology: topology_lib.Topology, chips) -> Hardware:
    slices = f" x {topology.slices} slices" if topology.slices > 1 else ""
    return Hardware(f"{chips[0].device_kind} ({topology.layout}{slices})", topology_lib.hbm_bytes(chips[0]), "tpu")


def _sampler(m: ModelConfig, mesh, rules, sample: tuple[int, int, int], what: str, keys: str,
             resident: float = 0.0) -> SamplerPlan:
    """The sampler's shapes (rows, prompt tokens, new tokens) on `mesh` and its analytic estimate,
    checked before anything is compiled (errors name `keys`)."""
    sp = plan_sampler.layout(m, mesh, rules, *sample, what, keys, resident)
    sp.analytic = sampler_analytic(sp.model, rules, rules_lib.mesh_sizes(mesh), sp.rows, sp.prompt_len,
                                   sp.cache_len, sp.cache)
    return sp


def _compile_on_topology(lower, result: Plan, mesh, rules) -> None:
    """The step, then the sampler's programs; XLA refusing one for lack of HBM is the verdict, not a
    crash (the analytic side is still printed)."""
    try:
        _compile(lower, result)
        if result.sampler:
            plan_sampler.compile_programs(result.sampler, mesh, rules)
    except plan_sampler.Refused as refused:
        result.refused = refused


def resolved_model(m, platform: str):
    """m with its per-backend choices (`moe_dispatch: auto`) made for `platform`, so the analytic
    estimate, the compiled program and the report name the same strategy."""
    if not architecture(m).has_moe:
        return m
    return m.replace(moe_dispatch=moe_lib.dispatch_name(m, platform))


def plan_grpo(cfg: GRPOConfig, topology: topology_lib.Topology, *, name: str = "", sampler: bool = True) -> Plan:
    """GRPO's update compiled by XLA:TPU for `topology`, and (`sampler`) its rollout's prefill and decode
    step. The analytic side is its state (exact); the activation estimate is the train step's and is
    not repeated for the update. The rest of the state stays resident beside the rollout."""
    from r1jax.rl.grpo_update import check_mesh, micro_batches

    m = resolved_model(cfg.model, "tpu")
    cfg = dataclasses.replace(cfg, model=m)
    chips = topology_lib.topology_devices(topology)
    sizes = mesh_lib.mesh_shape(cfg.mesh, len(chips), topology.slices)
    check_mesh(cfg, m, sizes)
    # The update's forward and backward see one micro-batch at a time.
    rows = (cfg.prompts.batch_size * cfg.num_generations // micro_batches(cfg)
            // rules_lib.split_of("batch", cfg.mesh, sizes))
    state = state_bytes(m, cfg.mesh, sizes, cfg.optimizer.moment_dtype)
    items = {"params": state["params"], "optimizer state (Adam mu, nu)": state["optimizer"],
             "reference params (beta > 0)": state["params"] if cfg.beta > 0 else 0.0}
    items["total"] = sum(items.values())
    result = Plan(name, sizes, len(chips), _tpu_hardware(topology, chips), rows,
                  cfg.prompts.seq_len + cfg.max_new_tokens, items, model=m, topology=topology, step="GRPO update")
    mesh = mesh_lib.build_mesh(cfg.mesh, chips)
    if sampler:
        result.sampler = _sampler(m, mesh, cfg.mesh, (cfg.prompts.batch_size * cfg.num_generations,
                                  cfg.prompts.seq_len, cfg.max_new_tokens),
                                  "GRPO rollout, prompts.batch_size x num_generations", "prompts.seq_len/max_new_tokens",
                                  resident=items["total"] - items["params"])
    _compile_on_topology(lambda: lower_grpo_update(cfg, mesh), result, mesh, cfg.mesh)
    result.replicated = replicated_dims(m, mesh, cfg.mesh)
    return result


def plan(cfg: TrainConfig, devices: int, hardware: Hardware | None = None, *, name: str = "",
         compile: bool = True, topology: topology_lib.Topology | None = None,
         sample: tuple[int, int, int] | None = None) -> Plan:
    """Plan `cfg` on `devices` devices: analytic always; compiled on the local devices when there are
    enough of them (and `compile`), else lowered for `hardware`'s platform on an abstract mesh. With a
    `topology`, compiled by XLA:TPU for that slice's devices (`devices` must be their number), and with
    `sample` (rows, prompt tokens, new tokens) the sampler too."""
    m = resolved_model(cfg.model, "tpu" if topology is not None else
                       hardware.platform if hardware is not None else jax.default_backend())
    sizes = mesh_lib.mesh_shape(cfg.mesh, devices, topology.slices if topology else 1)
    mesh_lib.check_train(cfg, m, sizes)
    B = cfg.data.batch_size // cfg.optimizer.grad_accum_steps
    rows = B // rules_lib.split_of("batch", cfg.mesh, sizes)
    result = Plan(name, sizes, devices, hardware, rows, cfg.data.seq_len, analytic(cfg, m, sizes), model=m,
                  topology=topology, tokens=cfg.data.batch_size * cfg.data.seq_len)
    local = jax.devices()
    if topology is not None:
        chips = topology_lib.topology_devices(topology)
        if len(chips) != devices:
            raise ConfigError(f"--devices: {topology.name} x {topology.slices} slice(s) has {len(chips)} "
                              f"devices, not {devices}")
        result.hardware = _tpu_hardware(topology, chips)
        mesh = mesh_lib.build_mesh(cfg.mesh, chips)
        if sample:
            result.sampler = _sampler(m, mesh, cfg.mesh, sample, "sampling the trained model",
                                      "--sample-len/--sample-new")
        _compile_on_topology(lambda: lower_step(cfg, m, mesh), result, mesh, cfg.mesh)
    elif compile and devices <= len(local) and (hardware is None or hardware.platform == local[0].platform):
        mesh = mesh_lib.build_mesh(cfg.mesh, local[:devices])
        _compile(lambda: lower_step(cfg, m, mesh), result)
    else:
        mesh = mesh_lib.abstract_mesh(cfg.mesh, devices)
        platform = hardware.platform if hardware else local[0].platform
        lower_step(cfg, m, mesh, platform)
        result.lowered_for = platform
    result.replicated = replicated_dims(m, mesh, cfg.mesh)
    return result


# --------------------------------------------------------------------------- report


# The analytic items that are the step's inputs (the state it donates and gets back).
STATE_ITEMS = ("params", "optimizer state (Adam mu, nu)", "reference params (beta > 0)")


def _topology_lines(p: Plan) -> list[str]:
    """XLA:TPU beside the analytic estimate, the sampler's programs, then the verdict: the larger peak
    (a program's code sits in HBM too)."""
    c, a, hbm = p.compiled, p.analytic, p.hardware.memory
    if c is None:
        return _refused_lines(p, p.step)
    state = sum(a.get(k, 0.0) for k in STATE_ITEMS)
    rest = None if set(a) <= {*STATE_ITEMS, "total"} else a["total"] - state  # None: state only (GRPO)
    peak = with_code(c)
    unit = _unit(max(peak, a["total"]))
    rows = [("arguments (XLA: state + batch in TPU tiles; analytic: the state)", c["argument_size_in_bytes"], state),
            ("temporaries", c["temp_size_in_bytes"], rest),
            ("peak + code", peak, None if rest is None else a["total"])]
    lines = ["", f"compiled in {p.compile_seconds:.1f} s; {_flops_line(p)}",
             "", f"| per chip | XLA:TPU ({unit[0]}) | analytic ({unit[0]}) |", "|---|---:|---:|"]
    lines += [f"| {k} | {_fmt(x, unit)} | {'-' if e is None else _fmt(e, unit)} |" for k, x, e in rows]
    lines += [""]
    if p.refused:
        program = "sampler prefill" if p.sampler.prefill.compiled is None else "sampler decode step"
        return lines + _refused_lines(p, program)
    if p.sampler:
        lines += plan_sampler.lines(p.sampler) + [""]
        sampled, program = plan_sampler.peak(p.sampler)
        beside = " + the resident state" if p.sampler.resident else ""
        lines.append(f"peak per chip: {p.step} {peak / 1e9:.2f} GB, sampler {sampled / 1e9:.2f} GB ({program}{beside}): "
                     f"{'the ' + p.step if peak >= sampled else 'the sampler'} dominates")
        peak = max(peak, sampled)
    lines.append(f"fits: {'yes' if peak <= hbm else 'no'}  peak {peak / 1e9:.2f} GB of {hbm / 1e9:.2f} GB per chip "
                 f"({100 * peak / hbm:.1f}%)")
    return lines


def _flops_line(p: Plan) -> str:
    """Model FLOPs per chip per step beside XLA's count, which takes each scanned layer stack's body
    once (so it is far below the model's for a deep model)."""
    from r1jax.train.flops import train_flops_per_token

    xla = f"XLA's cost_analysis: {p.flops or 0:.3g} (a scanned loop's body counted once)"
    if not p.tokens:
        return xla
    tokens = p.tokens / p.devices
    model = train_flops_per_token(p.model, p.seq_len) * tokens
    return f"{tokens:,.0f} tokens per chip per step, {model:.3g} model FLOPs per chip per step; {xla}"


def _refused_lines(p: Plan, program: str) -> list[str]:
    r, hbm = p.refused, p.hardware.memory
    return ["", f"XLA:TPU refused to compile the {program} ({r.seconds:.1f} s): {r.message}",
            f"fits: no  the {program} needs more than {hbm / 1e9:.2f} GB per chip ({r.needed})"]


def format_plan(p: Plan) -> str:
    m = p.model
    mesh = " ".join(f"{k}={v}" for k, v in p.mesh.items())
    where = p.hardware.name if p.hardware else "local devices"
    lines = [f"r1jax plan {p.config}: {p.devices} devices ({where}), mesh {mesh}",
             f"per device: {p.rows_per_device} row(s) x {p.seq_len} tokens per micro-batch; moe_dispatch="
             f"{m.moe_dispatch}, remat={m.remat_policy}, dtype={m.dtype}, param_dtype={m.param_dtype}", ""]
    unit = _unit(p.analytic["total"])
    lines += [f"| per device (analytic) | {unit[0]} |", "|---|---:|"]
    lines += [f"| {k} | {_fmt(v, unit)} |" for k, v in p.analytic.items()]
    if p.hardware:
        total = p.analytic["total"]
        verdict = "fits" if total <= p.hardware.memory else "does NOT fit"
        lines.append(f"| {p.hardware.name} memory | {_fmt(p.hardware.memory, unit)} ({verdict}, "
                     f"{100 * total / p.hardware.memory:.0f}%) |")
    if p.compiled:
        c = p.compiled
        peak = peak_bytes(c)
        unit = _unit(peak)
        where = f"compiled by XLA:TPU for {p.topology.layout}" if p.topology else "compiled here"
        lines += ["", f"| per device (XLA memory_analysis, {where}) | {unit[0]} |", "|---|---:|"]
        lines += [f"| {k.replace('_size_in_bytes', '')} | {_fmt(v, unit)} |" for k, v in c.items()]
        lines.append(f"| peak (arguments + outputs - aliased + temp) | {_fmt(peak, unit)} |")
    if p.topology:
        lines += _topology_lines(p)
    if p.lowered_for:
        lines += ["", f"lowered for {p.lowered_for} on an abstract {p.devices}-device mesh: ok (too many devices "
                  f"to compile here; the activation rows are estimates)"]
    if p.replicated:
        lines += ["", "replicated over an axis their rule names (dim not divisible):"]
        lines += [f"  {r}" for r in p.replicated]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def load_plan_config(config_path, overrides=(), mesh_spec: str | None = None, *, batch_size: int | None = None,
                     seq_len: int | None = None, devices: int | None = None,
                     slices: int = 1) -> tuple[TrainConfig, int]:
    """A TrainConfig from a stage YAML (`stage:` key) or a model YAML (trained with default settings,
    `--seq-len` tokens, `--batch` rows: default one row per batch shard), and the device count."""
    overrides = list(overrides) + (mesh_lib.parse_mesh_spec(mesh_spec) if mesh_spec else [])
    raw = config_lib.read_yaml(config_path)
    if "stage" in raw:
        d = config_lib.load_dict(TrainConfig, config_path)
    else:
        d = {"stage": "pretrain", "model": raw, "data": {"seq_len": 4096}}
    d = config_lib.apply_overrides(d, overrides)
    if seq_len is not None:
        d.setdefault("data", {})["seq_len"] = seq_len
    if batch_size is not None:
        d.setdefault("data", {})["batch_size"] = batch_size
    cfg = config_lib.from_dict(TrainConfig, d)
    if cfg.model is None:
        raise ConfigError("model: r1jax plan needs the architecture in the config (init_from is not read)")
    n = devices
    if n is None:
        sizes = [getattr(cfg.mesh, a) for a in config_lib.MESH_AXES]
        dcn = [getattr(cfg.mesh, a) for a in config_lib.DCN_AXES]
        named = [o.partition("=")[2] for o in (mesh_lib.parse_mesh_spec(mesh_spec) if mesh_spec else [])]
        if -1 not in sizes + dcn:
            n = math.prod(sizes + dcn)
        elif named and "-1" not in named:  # --mesh named every axis it wants: the rest are 1, not "fill"
            n = math.prod(s for s in sizes + dcn if s != -1)
        else:
            n = jax.device_count()
    if batch_size is None and "stage" not in raw:
        shape = mesh_lib.mesh_shape(cfg.mesh, n, slices)
        split = rules_lib.split_of("batch", cfg.mesh, shape)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=split * cfg.optimizer.grad_accum_steps))
    return cfg, n


def _grpo_config(config_path, overrides, mesh_spec, topo, batch_size, seq_len) -> GRPOConfig:
    """A GRPO stage to plan: only its update is compiled, so only for a --topology."""
    if topo is None:
        raise ConfigError("--topology: planning a GRPO stage compiles its update for a TPU slice; give one")
    if batch_size is not None or seq_len is not None:
        raise ConfigError("--batch: a GRPO stage's rows are prompts.batch_size x num_generations and its length "
                          "prompts.seq_len + max_new_tokens; set those keys instead of --batch/--seq-len")
    extra = mesh_lib.parse_mesh_spec(mesh_spec) if mesh_spec else []
    cfg = config_lib.load(GRPOConfig, config_path, list(overrides) + extra)
    if cfg.model is None:
        raise ConfigError("model: r1jax plan needs the architecture in the config (init_from is not read)")
    return cfg


def _sample_shape(cfg: TrainConfig, sample_batch, sample_len, sample_new) -> tuple[int, int, int]:
    """(rows, prompt tokens, new tokens) a train config's sampler is planned for: by default the data
    batch's rows, each sampling the second half of data.seq_len tokens from a prompt of the first."""
    total = sample_len if sample_len is not None else cfg.data.seq_len
    new = sample_new if sample_new is not None else total // 2
    return (sample_batch if sample_batch is not None else cfg.data.batch_size), total - new, new


def _check_sample_flags(given: list[str], topology, sampler: bool) -> None:
    if given and topology is None:
        raise ConfigError(f"{given[0]}: the sampler is compiled for a TPU slice; only with --topology")
    if given and not sampler:
        raise ConfigError(f"{given[0]}: --no-sampler leaves the sampler out; drop one of them")


def plan_command(config_path, overrides=(), mesh_spec: str | None = None, *, devices: int | None = None,
                 hardware: str | None = None, batch_size: int | None = None, seq_len: int | None = None,
                 compile: bool = True, topology: str | None = None, slices: int = 1, sampler: bool = True,
                 sample_batch: int | None = None, sample_len: int | None = None, sample_new: int | None = None,
                 out=None) -> Plan:
    """`r1jax plan CONFIG [key=value ...] --mesh data=2,expert=4 [--devices N] [--hardware h100]
    [--topology v5p-128 [--slices 2] [--sample-batch R --sample-len T --sample-new M | --no-sampler]]`:
    print the per-device memory table and return the Plan. A GRPO stage's update (and rollout) is
    planned with a --topology only. With a topology the sampler is planned too (`sampler`)."""
    if hardware is not None and hardware not in HARDWARE:
        raise ConfigError(f"--hardware: unknown {hardware!r}; valid: {', '.join(HARDWARE)}")
    flags = {"--sample-batch": sample_batch, "--sample-len": sample_len, "--sample-new": sample_new}
    given = [k for k, v in flags.items() if v is not None]
    _check_sample_flags(given, topology, sampler)
    topo = None
    if topology is not None:  # every check that needs no compiler, before the config is even read
        if hardware is not None:
            raise ConfigError("--hardware: the --topology names the hardware; give one of them")
        topo = topology_lib.parse_topology(topology, slices)
        topology_lib.require_libtpu()
        if not compile:
            raise ConfigError("--no-compile: --topology compiles for the TPU; drop one of them")
        n = len(topology_lib.topology_devices(topo))
        if devices is not None and devices != n:
            raise ConfigError(f"--devices: {topology} x {slices} slice(s) has {n} devices, not {devices}")
        devices = n
    elif slices != 1:
        raise ConfigError("--slices: only with --topology")
    if config_lib.read_yaml(config_path).get("stage") == "grpo":
        if given:
            raise ConfigError(f"{given[0]}: a GRPO stage samples its rollout, prompts.batch_size x num_generations "
                              f"rows of prompts.seq_len + max_new_tokens tokens; set those keys instead")
        result = plan_grpo(_grpo_config(config_path, overrides, mesh_spec, topo, batch_size, seq_len), topo,
                           name=str(Path(config_path)), sampler=sampler)
        print(format_plan(result), file=out or sys.stdout)
        return result
    cfg, n = load_plan_config(config_path, overrides, mesh_spec, batch_size=batch_size, seq_len=seq_len,
                              devices=devices, slices=slices)
    sample = _sample_shape(cfg, sample_batch, sample_len, sample_new) if topo and sampler else None
    result = plan(cfg, n, HARDWARE.get(hardware), name=str(Path(config_path)), compile=compile, topology=topo,
                  sample=sample)
    print(format_plan(result), file=out or sys.stdout)
    return result
