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

from collections.abc import Sequence

import torch.distributed as dist
from torch import nn

from bigtrain.model.llama import Llama
from bigtrain.model.moe import moe_layers
from bigtrain.parallel.layout import TP_PLAN, EnterRegion, Replicate, Split, check_tensor_parallel
from bigtrain.parallel.tensor_parallel_layers import enter_region_on_input, reduce_grad_over_tp


def _planned(layer: nn.Module, kind: type) -> list[tuple[nn.Module, str, nn.Module, object]]:
    """(parent, name, module, entry) of every module in `layer` whose plan holds an entry of `kind`;
    a Mixture-of-Experts feed-forward is replicated whole (`MOE_CHILDREN`)."""
    moe = {id(m) for top in moe_layers(layer) for m in top.modules()}
    planned = [(parent, name, child, entry) for parent in layer.modules() if id(parent) not in moe
               for name, child in parent.named_children() if id(child) not in moe
               for entry in TP_PLAN.get(name, ()) if isinstance(entry, kind)]
    if kind is Replicate:
        planned += [(None, "mlp", top, Replicate()) for top in moe_layers(layer)]
    return planned


def shard_layer(layer: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool = False) -> nn.Module:
    """Shard one layer of the list (embedding, block or head) in place across `group` as `TP_PLAN`
    says; returns it. A head whose weight is tied to the embedding gets a sharded copy here:
    re-tie it to the sharded embedding afterwards (`tie_head`)."""
    return connect_layer(split_layer(layer, group, sequence_parallel), group, sequence_parallel)


def split_layer(layer: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool = False) -> nn.Module:
    """The first half of `shard_layer`: swap in the parallel layers, each keeping its rank's slice
    of the weight (on the meta device: the slice's shape, to be materialised before `connect_layer`)."""
    for parent, name, child, split in _planned(layer, Split):
        extra = {"sequence_parallel": sequence_parallel} if split.sequence_out else {}
        setattr(parent, name, split.layer(child, group, **extra))
    return layer


def connect_layer(layer: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool = False) -> nn.Module:
    """The second half of `shard_layer`, on materialised parameters: each region's entry (it sees
    the parallel layers it holds) and the gradient sums of replicated weights that each rank
    applies to its own heads, or under sequence parallelism to its own tokens."""
    for _, _, child, _ in _planned(layer, EnterRegion):
        enter_region_on_input(child, group, sequence_parallel)
    for _, _, child, entry in _planned(layer, Replicate):
        if sequence_parallel or entry.per_head:
            for p in child.parameters():
                reduce_grad_over_tp(p, group)
    return layer


def tie_head(layers: Sequence[nn.Module]) -> None:
    """Make the head's weight the embedding's (in a whole model's list: tied embeddings need pp = 1)."""
    layers[-1].lm_head.weight = layers[0].embed_tokens.weight


def apply_tensor_parallel(model: Llama, group: dist.ProcessGroup, sequence_parallel: bool = False) -> Llama:
    """Shard `model` in place across `group` by slicing its full weights; returns the model."""
    check_tensor_parallel(model.cfg, dist.get_world_size(group))
    for layer in model.layers:
        shard_layer(layer, group, sequence_parallel)
    if model.cfg.tie_embeddings:
        tie_head(model.layers)
    return model
