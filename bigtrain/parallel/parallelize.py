"""The one step that makes this rank's layers ready for an engine, applied before any engine sees
them and in this order (torchtitan's): tensor parallelism (with Megatron sequence parallelism),
Ulysses sequence parallelism, float8 linears, activation checkpointing, `torch.compile`.

Engines only wrap the layers it returns. It takes the layers as an iterable and shards each one
as it arrives, so a builder that yields them one at a time (a pipeline stage's) never holds more
than its share plus one full layer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch.distributed as dist
from torch import nn

from bigtrain.config import Config
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.model import compile_blocks
from bigtrain.parallel.activation_checkpointing import apply_activation_checkpointing
from bigtrain.parallel.float8 import apply_float8
from bigtrain.parallel.layout import tp_sequence_parallel
from bigtrain.parallel.tensor_parallel import shard_layer, tie_head


def parallelize(layers: Iterable[nn.Module], cfg: Config, *, fp8: bool, compile: bool,
                tp_group: dist.ProcessGroup | None = None, sp_group: dist.ProcessGroup | None = None,
                timer: PhaseTimer | None = None, first: int = 0) -> list[nn.Module]:
    """This rank's layers of the model's list, from layer `first` on, transformed in place:
    sharded across `tp_group` (None: tp = 1), attending across `sp_group` (None: sp = 1; `timer`
    clocks its all-to-alls), with float8 block linears (`fp8`), checkpointed as
    `parallel.activation_checkpointing` says and compiled (`compile`)."""
    sequence_parallel = tp_sequence_parallel(cfg)
    owned = [layer if tp_group is None else shard_layer(layer, tp_group, sequence_parallel) for layer in layers]
    if cfg.model.tie_embeddings:
        tie_head(owned)  # a sharded head holds its own copy of the embedding's shard until re-tied
    if sp_group is not None:
        from bigtrain.parallel.deepspeed_ulysses import apply_sequence_parallel  # imports DeepSpeed

        apply_sequence_parallel(owned, sp_group, timer)
    if fp8:
        apply_float8(owned)
    p = cfg.parallel
    apply_activation_checkpointing(owned, p.activation_checkpointing, p.activation_checkpointing_every, first)
    if compile:
        compile_blocks(owned)
    return owned
