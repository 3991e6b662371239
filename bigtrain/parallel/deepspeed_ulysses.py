"""DeepSpeed-Ulysses sequence parallelism applied to a finished model.

Each of the sp ranks of a group holds 1/sp of every window's tokens (`sequence_slice`). Around the
attention core, DeepSpeed's `DistributedAttention` all-to-all trades the sequence split for a head
split (every rank attends over the whole sequence with 1/sp of the heads) and back; everything
else in a block works token by token and needs no communication. RoPE rotates by global position
(`Attention.seq_shard`). The loss of a window is the mean over all its tokens (`sequence_mean`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.sequence.layer import DistributedAttention
from torch import nn

from bigtrain.distributed.timing import PhaseTimer
from bigtrain.model.llama import Block

COMM_PHASE = "sp_comm"  # the all-to-all time, part of the forward and backward phases


class _CommBoundary(torch.autograd.Function):
    """Identity that starts (`opens`) or stops the all-to-all clock in forward, the reverse in
    backward, where the tensors cross the same boundary the other way."""

    @staticmethod
    def forward(ctx, timer: PhaseTimer, opens: bool, *tensors: torch.Tensor):
        ctx.timer, ctx.opens = timer, opens
        (timer.start if opens else timer.stop)(COMM_PHASE)
        return tensors

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        (ctx.timer.stop if ctx.opens else ctx.timer.start)(COMM_PHASE)
        return (None, None, *grads)


class _TimedCore(nn.Module):
    """The local attention core between the two all-to-alls, marked as outside the clock."""

    def __init__(self, core: nn.Module, timer: PhaseTimer):
        super().__init__()
        self.core, self.timer = core, timer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *documents: torch.Tensor) -> torch.Tensor:
        q, k, v = _CommBoundary.apply(self.timer, False, q, k, v)
        (y,) = _CommBoundary.apply(self.timer, True, self.core(q, k, v, *documents))
        return y


class UlyssesAttention(nn.Module):
    """The attention core over the whole sequence with 1/sp of the heads: q, k, v
    [batch, seq/sp, heads, head_dim] in, the same layout out; `documents` (document masking)
    covers the whole sequence, as the core sees it."""

    def __init__(self, core: nn.Module, group: dist.ProcessGroup, timer: PhaseTimer):
        super().__init__()
        self.timer = timer
        self.attention = DistributedAttention(_TimedCore(core, timer), group, scatter_idx=2, gather_idx=1)

    @torch.compiler.disable  # a compiled block runs this part eagerly: the all-to-alls and their clock
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *documents: torch.Tensor) -> torch.Tensor:
        q, k, v = _CommBoundary.apply(self.timer, True, q, k, v)
        (y,) = _CommBoundary.apply(self.timer, False, self.attention(q, k, v, 0, None, *documents))
        return y


def apply_sequence_parallel(layers: list[nn.Module], group: dist.ProcessGroup, timer: PhaseTimer) -> None:
    """Make every block among `layers` attend across `group`, holding its rank's slice of the sequence."""
    rank = dist.get_rank(group)
    for layer in layers:
        if isinstance(layer, Block):
            attention = layer.self_attn
            attention.core = UlyssesAttention(attention.core, group, timer)
            attention.seq_shard = rank


def sequence_slice(windows: torch.Tensor, rank: int, sp: int) -> torch.Tensor:
    """Rank `rank`'s tokens of each window [batch, seq_len + 1]: inputs [k·t, (k+1)·t) with t =
    seq_len / sp, plus the next token, the last input's target."""
    t = (windows.shape[1] - 1) // sp
    return windows[:, rank * t:(rank + 1) * t + 1]


def sequence_mean(local_mean: torch.Tensor, group: dist.ProcessGroup, grads_summed: bool) -> torch.Tensor:
    """The windows' mean loss from this rank's mean over its equal share of their tokens.

    The value is the mean over the group (one all-reduce). The gradient is this rank's share:
    local_mean / sp where the engine sums gradients over the sequence-parallel ranks (DeepSpeed
    does, except its pipeline engine without ZeRO, which averages them: `grads_summed=False`).
    """
    sp = dist.get_world_size(group)
    total = local_mean.detach().clone()
    dist.all_reduce(total, group=group)
    share = local_mean / sp if grads_summed else local_mean
    return share + (total / sp - share.detach())
