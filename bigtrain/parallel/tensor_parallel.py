"""Tensor parallelism applied to a finished model: every module `TP_PLAN` names is swapped for its
parallel layer, which keeps this rank's slice of the full, already initialised weight.

The input of each column-parallel region (attention, MLP, head) is copied in once, so the
backward all-reduces once per region rather than once per projection. The logits stay
vocab-sharded: given targets the head returns the vocab-parallel loss itself; on logits use
`vocab_parallel_cross_entropy` instead of `lm_loss`.

With `sequence_parallel` (Megatron-style, `parallel.tp_sequence_parallel`) the residual stream,
the RMSNorms and the element-wise work between regions hold t/tp tokens per rank: the embedding
and the row-parallel layers reduce-scatter along the sequence, each region's entry all-gathers
it, and the RMSNorm weights' gradients (each rank saw its own tokens) are summed over the group.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from bigtrain.model.llama import Block, Head, Llama, RMSNorm
from bigtrain.parallel.layout import TP_PLAN, check_tensor_parallel
from bigtrain.parallel.tensor_parallel_layers import (
    ColumnParallelLinear,
    enter_region_on_input,
    reduce_grad_over_tp,
)


def shard_layer(layer: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool = False) -> nn.Module:
    """Shard one layer of the list (embedding, block or head) in place across `group`; returns it.

    A head whose weight is tied to the embedding gets a sharded copy here: re-tie it to the
    sharded embedding afterwards (as `apply_tensor_parallel` does).
    """
    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if name in TP_PLAN:
                parallel = TP_PLAN[name]
                extra = {} if issubclass(parallel, ColumnParallelLinear) else {"sequence_parallel": sequence_parallel}
                setattr(parent, name, parallel(child, group, **extra))
            elif sequence_parallel and isinstance(child, RMSNorm):
                reduce_grad_over_tp(child.weight, group)
    if isinstance(layer, Block):
        enter_region_on_input(layer.self_attn, group, sequence_parallel)
        enter_region_on_input(layer.mlp, group, sequence_parallel)
    elif isinstance(layer, Head):
        enter_region_on_input(layer.lm_head, group, sequence_parallel)
    return layer


def apply_tensor_parallel(model: Llama, group: dist.ProcessGroup, sequence_parallel: bool = False) -> Llama:
    """Shard `model` in place across `group` by slicing its full weights; returns the model."""
    check_tensor_parallel(model.cfg, dist.get_world_size(group))
    embedding, head = model.layers[0], model.layers[-1]
    tied = head.lm_head.weight is embedding.embed_tokens.weight
    for layer in model.layers:
        shard_layer(layer, group, sequence_parallel)
    if tied:
        head.lm_head.weight = embedding.embed_tokens.weight
    return model
