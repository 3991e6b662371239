"""Expert parallelism: the experts of every Mixture-of-Experts block are split over the ep ranks
of an expert-parallel group (carved from the data-parallel group), and each block's sorted token
copies travel to the rank that holds their expert and back by two all-to-alls (differentiable, so
backward sends the gradients the same way in reverse).

`split_experts` cuts the stacked expert weights of a meta layer to this rank's experts (before
they get values); `connect_experts` installs the exchange; `share_routing_statistics` lets the
balance loss see every token of a micro-batch split by sequence parallelism. Which ranks form the groups, and how
expert gradients are reduced, is the engine's business.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.model.moe import moe_layers


def split_experts(layer: nn.Module, ep: int) -> None:
    """Keep 1/ep of every MoE block's experts in `layer` (on the meta device: shapes only)."""
    for moe in moe_layers(layer):
        for name, p in list(moe.experts.named_parameters(recurse=False)):
            if not p.is_meta:
                raise ValueError("split_experts cuts layers on the meta device, before they get values")
            setattr(moe.experts, name, nn.Parameter(torch.empty(p.shape[0] // ep, *p.shape[1:], device="meta")))


def connect_experts(layer: nn.Module, group: dist.ProcessGroup) -> None:
    """Route every MoE block of `layer` through the expert-parallel `group`."""
    for moe in moe_layers(layer):
        moe.exchange = ExpertExchange(group, moe.experts_total)


def share_routing_statistics(layer: nn.Module, groups: list[dist.ProcessGroup]) -> None:
    """Let every MoE block of `layer` count its balance loss over all the tokens of a micro-batch
    when they are split over `groups` (tensor sequence parallelism, Ulysses: each rank holds a shard)."""
    share = 1.0 / math.prod(dist.get_world_size(g) for g in groups)

    def token_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        for group in groups:
            dist.all_reduce(t, group=group)
        return t

    for moe in moe_layers(layer):
        moe.token_sum, moe.token_share = token_sum, share


class _AllToAll(torch.autograd.Function):
    """Rows split `send` per rank out, `recv` per rank in; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: list[int], recv: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = rows.new_empty(sum(recv), *rows.shape[1:])
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class ExpertExchange:
    """Rows sorted by global expert, and their counts, → the rows of this rank's experts (from
    every rank of the group, sorted by local expert), their counts, and the way back."""

    def __init__(self, group: dist.ProcessGroup, experts: int):
        self.group, self.ep = group, dist.get_world_size(group)
        self.local = experts // self.ep

    def __call__(self, rows: torch.Tensor, counts: torch.Tensor):
        ep, local = self.ep, self.local
        received = torch.empty_like(counts)  # [source rank, local expert]: what each rank sends here
        dist.all_to_all_single(received, counts, group=self.group)
        received = received.view(ep, local)
        send = counts.view(ep, local).sum(1).tolist()
        recv = received.sum(1).tolist()
        arrived = _AllToAll.apply(rows, send, recv, self.group)
        # rows arrive grouped by (source, expert); the experts want them grouped by (expert, source)
        segment = torch.repeat_interleave(torch.arange(ep * local, device=rows.device), received.flatten())
        order = ((segment % local) * ep + segment // local).argsort(stable=True)

        def back(y: torch.Tensor) -> torch.Tensor:
            by_source = torch.empty_like(y).index_copy(0, order, y)
            return _AllToAll.apply(by_source, recv, send, self.group)

        return arrived[order], received.sum(0), back
