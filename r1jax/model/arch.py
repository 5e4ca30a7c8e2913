"""The one place that says which architecture a config describes, and what that architecture is made
of: DeepSeek-V3/V2 (a ModelConfig: MLA attention, dense then MoE layer stacks, MTP modules) or a dense
R1-Distill student (a DenseConfig: grouped-query attention, one stack of dense layers).

Per architecture: its parameter table (specs.py), its stack layout (each stacked group's first HF
layer, size, whether its FFN is MoE, and whether it belongs to the decoder or is an MTP module), the
rotated width of a head (rope.py), and the name that picks its code elsewhere — the forward
(`model.IMPLEMENTATIONS`) and its KV-cache modes (`kv_cache.CACHES`, default first). Everything that
must know the architecture asks `architecture(cfg)`; nothing else tests the config's type.

This module sits at the bottom of the model (it reads the config and the parameter tables only): rope
asks it for the rotated width, and rope is under all attention code, so the code that runs a model
cannot be imported here; it is looked up by the architecture's name, one table per kind of code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import r1jax.model.specs as specs
from r1jax.config import DenseConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class Group:
    """One stacked group of layers: params[name] has a leading axis of `count` layers."""

    first: int  # HF index of its first layer (`model.layers.{first + i}`)
    count: int
    moe: bool  # its FFN is the routed-expert MoE
    decoder: bool = True  # part of the decoder stack (False: the MTP modules after it)


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str  # picks the forward (model.IMPLEMENTATIONS) and the cache modes (kv_cache.CACHES)
    layout: Callable  # cfg -> {group name: Group}, non-empty groups in HF layer order
    layer_specs: Callable  # cfg -> ((group name, Group) -> one layer's ParamSpecs)
    rope_dim: Callable  # cfg -> R, the rotated width of one head
    has_moe: bool  # its config has an MoE dispatch (moe_dispatch) to choose

    def param_table(self, cfg) -> dict:
        """Nested dict of ParamSpec mirroring the params pytree."""
        return specs.model_table(cfg, self.layout(cfg), self.layer_specs(cfg))

    def decoder_groups(self, cfg) -> dict[str, Group]:
        """The groups the decoder runs, in order (the MTP modules left out)."""
        return {name: g for name, g in self.layout(cfg).items() if g.decoder}


def _deepseek_layout(cfg: ModelConfig) -> dict[str, Group]:
    out = {
        "dense_layers": Group(0, cfg.num_dense_layers, moe=False),
        "moe_layers": Group(cfg.num_dense_layers, cfg.num_moe_layers, moe=True),
        "mtp": Group(cfg.num_hidden_layers, cfg.num_nextn_predict_layers, moe=cfg.mtp_is_moe, decoder=False),
    }
    return {k: g for k, g in out.items() if g.count > 0}


def _dense_layout(cfg: DenseConfig) -> dict[str, Group]:
    # Every layer is `model.layers.{i}`, one stack.
    return {"layers": Group(0, cfg.num_hidden_layers, moe=False)}


DEEPSEEK = Architecture(
    name="deepseek",
    layout=_deepseek_layout,
    layer_specs=specs.deepseek_layer_specs,
    rope_dim=lambda cfg: cfg.qk_rope_head_dim,  # MLA rotates only the decoupled rope part
    has_moe=True,
)
DENSE = Architecture(
    name="dense",
    layout=_dense_layout,
    layer_specs=specs.dense_layer_specs,
    rope_dim=lambda cfg: cfg.attn_head_dim,  # whole heads
    has_moe=False,
)


def architecture(cfg: ModelConfig | DenseConfig) -> Architecture:
    """The architecture a config describes."""
    return DENSE if isinstance(cfg, DenseConfig) else DEEPSEEK
