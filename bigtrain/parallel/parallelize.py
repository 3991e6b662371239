"""The one step that makes this rank's layers ready for an engine, applied before any engine sees
them and in this order (torchtitan's): tensor parallelism (with Megatron sequence parallelism),
Ulysses sequence parallelism, float8 linears, activation checkpointing, `torch.compile`.

Engines only wrap the layers it returns. It takes the layers as an iterable and finishes each one
before it takes the next, so a builder that yields them one at a time never holds more than its
share plus one full layer. Layers may come on the meta device: `materialize` then gives each
parameter its value once its tensor-parallel shape is known (only this rank's slice is ever
allocated), and `finish` (ZeRO-3's partitioning) takes each layer when it is ready.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch.distributed as dist
from torch import nn

from bigtrain.config import Config
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.model import compile_blocks
from bigtrain.model.llama import Head
from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from bigtrain.parallel.expert_parallel import (
    connect_experts,
    share_routing_statistics,
    split_experts,
)
from bigtrain.parallel.float8 import apply_float8
from bigtrain.parallel.layout import tp_sequence_parallel
from bigtrain.parallel.tensor_parallel import connect_layer, split_layer


def parallelize(layers: Iterable[nn.Module], cfg: Config, *, fp8: bool, compile: bool,
                tp_group: dist.ProcessGroup | None = None, sp_group: dist.ProcessGroup | None = None,
                ep_group: dist.ProcessGroup | None = None, timer: PhaseTimer | None = None, first: int = 0,
                materialize: Callable[[nn.Module, int], None] | None = None,
                finish: Callable[[nn.Module], None] | None = None) -> list[nn.Module]:
    """This rank's layers of the model's list, from layer `first` on, transformed in place one by
    one: sharded across `tp_group` (None: tp = 1), experts split across `ep_group` (None: ep = 1), materialised (`materialize(layer, index)`; a
    tied head takes the embedding's weight first), attending across `sp_group` (None: sp = 1;
    `timer` clocks its all-to-alls), with float8 block linears (`fp8`), checkpointed as
    `parallel.activation_checkpointing` says, compiled (`compile`), then handed to `finish`."""
    sequence_parallel = tp_sequence_parallel(cfg)
    p = cfg.parallel
    owned: list[nn.Module] = []
    for index, layer in enumerate(layers, first):
        if tp_group is not None:
            split_layer(layer, tp_group, sequence_parallel)
        if ep_group is not None:
            split_experts(layer, dist.get_world_size(ep_group))
        if cfg.model.tie_embeddings and isinstance(layer, Head):  # tied embeddings need pp = 1: owned[0] is it
            layer.lm_head.weight = owned[0].embed_tokens.weight
        if materialize is not None:
            materialize(layer, index)
        if tp_group is not None:
            connect_layer(layer, tp_group, sequence_parallel)
        if ep_group is not None:
            connect_experts(layer, ep_group)
        token_groups = [g for g, split in ((tp_group, sequence_parallel), (sp_group, True)) if g is not None and split]
        if token_groups:
            share_routing_statistics(layer, token_groups)
        if sp_group is not None:  # (a lazy import: it imports DeepSpeed)
            from bigtrain.parallel.deepspeed_ulysses import apply_sequence_parallel

            apply_sequence_parallel([layer], sp_group, timer)
        if fp8:
            apply_float8([layer])
        apply_activation_checkpointing([layer], p.activation_checkpointing, p.activation_checkpointing_every, index)
        if compile:
            compile_blocks([layer])
        if finish is not None:
            finish(layer)
        owned.append(layer)
    return owned
