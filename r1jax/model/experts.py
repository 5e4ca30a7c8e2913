"""Expert parallelism: each device routes its own tokens, sends every token copy to the device that owns
its expert, runs its local experts there, and sends the results back to be combined (GShard §3.2,
DeepSeek-V3 §3.2.2's all-to-all dispatch and combine).

Legend: N local tokens · D model · E routed experts · El experts per device (E/P) · P devices in
the exchange group · C slots per (device, expert) · F expert ffn hidden (or its tensor shard) · M
token copies sorted by expert (N·k) · R rows of the ragged receive buffer.

Two exchanges, each wrapping the local strategy of `model/moe.py` with a different expert FFN:

- `slots` (strategy `capacity_ep`): the local capacity dispatch builds its [E,C,D] slot buffer; a
  tiled `all_to_all` turns it into [P,El,C,D] slots for this device's experts, one grouped einsum runs
  them, a second `all_to_all` sends them home. Static shapes, works on every backend; tokens over
  capacity are dropped and counted, exactly as in the local strategy with C computed per device.
- `ragged` (strategy `ragged_ep`): the local ragged dispatch sorts token copies by expert;
  `ragged_all_to_all` moves each device's contiguous run of rows to their owner, which regroups what
  it received by local expert and runs `ragged_dot`. The receive buffer has R rows (`receive_rows`):
  by default the worst case, P·N·min(k, El) (a token's k copies go to k distinct experts, at most El
  of them here), so nothing drops; `ragged_buffer_factor` f bounds it to ceil(f·M). Copies that do not
  fit are not sent: each receiver shares its R rows fairly among the senders (`fair_share`), a sender
  keeps the first rows of its block (lowest local expert, then earliest token), and the same counts
  drive the way back, so an unsent copy comes home as a zero row and is counted in `dropped`. XLA:CPU
  has no ragged all-to-all: there it is a ConfigError.

The exchange group is the set of devices the `expert` param dim is split over (its rule's mesh
axes). Tokens must be split over those axes too (they are, under the default `batch` rule), so each
device of a group holds different tokens. An expert FFN dim split over other axes (`tensor`) gives
partial sums, added with `psum`. Without an active mesh (`sharding_context`), every expert is local
and the strategies are their local counterparts.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from r1jax.config import ModelConfig
from r1jax.errors import ConfigError
from r1jax.model.specs import moe_specs
from r1jax.parallel import rules as rules_lib

# Backends whose XLA has no ragged-all-to-all (checked at trace time, from the context mesh's devices).
NO_RAGGED_ALL_TO_ALL = frozenset({"cpu"})


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where tokens and expert weights live inside the shard_map."""

    tokens: P  # spec of x [N,D], weights/ids [N,k]
    weights: dict  # spec of each expert matrix (gate, up, down), D gathered
    exchange: tuple[str, ...]  # mesh axes of the expert dim: the all-to-all group
    ffn_axes: tuple[str, ...]  # mesh axes of the F dim: partial sums to psum
    group: int  # devices in the exchange group

    @property
    def token_axes(self) -> tuple[str, ...]:
        return tuple(a for a in jax.tree.leaves(tuple(self.tokens)) if a is not None)


def layout(cfg: ModelConfig, num_tokens: int, sizes: dict[str, int], rules) -> Layout:
    """Specs from the rules: tokens like activations (`batch`), expert weights like parameters."""
    tokens = rules_lib.resolve(("batch", "act_embed"), (num_tokens, cfg.hidden_size), rules, sizes)[0]
    weights, exchange, ffn_axes = {}, None, ()
    for name, spec in moe_specs(cfg)["experts"].items():
        axes = rules_lib.resolve(spec.axes, spec.shape, rules, sizes)
        exchange = axes[0]
        f_dim = spec.axes.index("expert_mlp")
        ffn_axes = tuple(a for a in axes[f_dim] if a not in tokens)
        dims = [exchange] + [ffn_axes if i == f_dim else () for i in range(1, len(axes))]
        weights[name] = rules_lib.to_spec(dims)
    if not exchange:
        raise ConfigError("mesh.rules.expert: the expert-parallel dispatch exchanges tokens over the mesh axes "
                          "of the 'expert' rule, which resolves to none for this model and mesh")
    if not set(exchange) <= set(tokens):
        raise ConfigError(f"mesh.rules.batch: expert-parallel dispatch needs the tokens split over the expert "
                          f"axes {list(exchange)}, but {num_tokens} tokens are split over {list(tokens)}")
    return Layout(rules_lib.to_spec([tokens, ()]), weights, tuple(exchange), ffn_axes,
                  math.prod(sizes[a] for a in exchange))


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


# --------------------------------------------------------------------------- fixed-slot exchange


def exchange_slots(ffn):
    """FFN over the [E,C,D] slot buffer that runs each expert on the device owning it.
    `ffn(p, buf [El,C',D]) -> [El,C',D]` is the local grouped einsum."""
    def make(lay: Layout, cfg: ModelConfig):
        def run(p, buf):
            E, C, D = buf.shape
            G = lay.group
            # [G,El,C,D]: block g goes to device g of the group; it comes back as the sources' slots.
            got = jax.lax.all_to_all(buf.reshape(G, E // G, C, D), lay.exchange, 0, 0, tiled=True)
            local = got.transpose(1, 0, 2, 3).reshape(E // G, G * C, D)
            out = _psum(ffn(p, local), lay.ffn_axes)
            back = out.reshape(E // G, G, C, D).transpose(1, 0, 2, 3)
            return jax.lax.all_to_all(back, lay.exchange, 0, 0, tiled=True).reshape(E, C, D)

        return run

    return make


# --------------------------------------------------------------------------- dropless exchange


def ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all`, refused up front where XLA does not implement it."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    if device is not None and device.platform in NO_RAGGED_ALL_TO_ALL:
        raise ConfigError(f"model.moe_dispatch: 'ragged_ep' needs jax.lax.ragged_all_to_all, which XLA:"
                          f"{device.platform.upper()} does not implement; use 'capacity_ep' (capacity_factor "
                          f"sets the slots) on this backend")
    return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes,
                                     axis_name=axis_name)


def _exclusive_cumsum(x, axis=-1):
    return jnp.cumsum(x, axis=axis) - x


# A TPU sublane tile of bf16 rows: a bounded buffer is rounded up to it.
ROW_TILE = 16


def receive_rows(cfg: ModelConfig, group: int, num_tokens: int) -> int:
    """Rows of a device's ragged receive buffer for `num_tokens` local tokens in a `group` of devices:
    the most any routing can send it (every peer's N tokens, each with min(k, El) copies here), or
    ceil(f·N·k) rounded up to ROW_TILE under `ragged_buffer_factor` f, whichever is fewer."""
    k = cfg.num_experts_per_tok
    worst = group * num_tokens * min(k, cfg.n_routed_experts // group)
    f = cfg.ragged_buffer_factor
    if f is None:
        return worst
    return min(worst, -(-math.ceil(f * num_tokens * k) // ROW_TILE) * ROW_TILE)


def fair_share(demand, room: int):
    """Rows each sender may put in each receiver's buffer. demand [src, dst] -> kept [src, dst] with
    every column summing to at most `room`. A column that fits is kept whole; otherwise every sender
    gets min(demand, t) for the largest level t that fits, and the rows left over go one each to the
    lowest-numbered senders that wanted more (water filling: one sender's flood costs the others only
    what is over the fair level)."""
    G = demand.shape[0]
    s = jnp.sort(demand, axis=0)
    before = _exclusive_cumsum(s, axis=0)
    # Sorted sender i and all above it capped at one level: the level that fills the room.
    level = (room - before) // (G - jnp.arange(G))[:, None]
    short = s > level
    cut = jnp.take_along_axis(level, jnp.argmax(short, axis=0)[None], axis=0)[0]
    t = jnp.where(short.any(axis=0), cut, jnp.max(demand, axis=0))
    capped = jnp.minimum(demand, t)
    want = demand > t
    extra = want & (jnp.cumsum(want, axis=0) <= room - capped.sum(0))
    return capped + extra.astype(demand.dtype)


def exchange_ragged(ffn):
    """FFN over token copies sorted by expert (`xs [M,D]`, `sizes [E]`) that runs each expert on the
    device owning it. `ffn(p, rows [R,D], group_sizes [El]) -> [R,D]` is the local ragged matmul.
    The exchange returns (rows [M,D], copies this device could not send)."""
    def make(lay: Layout, cfg: ModelConfig):
        def run(p, xs, sizes):
            M, D = xs.shape
            G = lay.group
            El = sizes.shape[0] // G
            R = receive_rows(cfg, G, M // cfg.num_experts_per_tok)
            me = jax.lax.axis_index(lay.exchange)
            counts = jax.lax.all_gather(sizes, lay.exchange)  # [G,E]: row s = copies device s has per expert
            flow = counts.reshape(G, G, El).sum(-1)  # [src, dst] rows wanted
            kept = fair_share(flow, R)  # [src, dst] rows sent: a prefix of each block
            send, recv = kept[me], kept[:, me]
            # My block lands on device d after the kept blocks of lower-numbered senders.
            placed = ragged_all_to_all(xs, jnp.zeros((R, D), xs.dtype), _exclusive_cumsum(flow[me]), send,
                                       _exclusive_cumsum(kept, axis=0)[me], recv, axis_name=lay.exchange)
            # Arrived: blocks by sender, each sorted by my local experts, cut to what was kept.
            mine = jax.lax.dynamic_slice_in_dim(counts, me * El, El, axis=1)  # [G,El]
            mine = jnp.diff(jnp.minimum(jnp.cumsum(mine, axis=1), recv[:, None]), axis=1, prepend=0)
            segment = jnp.searchsorted(jnp.cumsum(mine.reshape(-1)), jnp.arange(R), side="right")
            expert = jnp.where(segment < G * El, segment % El, El)  # El: unused rows, sorted last
            order = jnp.argsort(expert, stable=True)
            out = ffn(p, placed[order], mine.sum(0).astype(jnp.int32))
            out = _psum(jnp.zeros_like(out).at[order].set(out), lay.ffn_axes)
            # Send each sender its rows back, to where it sent them from; unsent rows stay zero.
            back = ragged_all_to_all(out, jnp.zeros((M, D), out.dtype), _exclusive_cumsum(recv), recv,
                                     _exclusive_cumsum(flow, axis=1)[:, me], send, axis_name=lay.exchange)
            return back, (flow[me].sum() - send.sum()).astype(jnp.int32)

        return run

    return make


# --------------------------------------------------------------------------- the strategy


def expert_parallel(local_dispatch, exchange):
    """A DISPATCH strategy: `local_dispatch(p, x, weights, ids, cfg, ffn=...)` on each device's tokens
    inside `shard_map`, its expert FFN replaced by `exchange(layout)`."""
    def dispatch(p, x, weights, ids, cfg: ModelConfig):
        sizes = rules_lib.active_sizes()
        if not sizes:  # no mesh: all experts are here
            return local_dispatch(p, x, weights, ids, cfg)
        lay = layout(cfg, x.shape[0], sizes, rules_lib.active_rules())

        def per_device(p, x, weights, ids):
            y, dropped = local_dispatch(p, x, weights, ids, cfg, ffn=exchange(lay, cfg))
            return y, jax.lax.psum(dropped, lay.token_axes)

        return jax.shard_map(per_device, in_specs=(lay.weights, lay.tokens, lay.tokens, lay.tokens),
                             out_specs=(lay.tokens, P()))(p, x, weights, ids)

    return dispatch
