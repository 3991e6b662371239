"""Megatron-style tensor-parallel layers and the vocab-parallel loss.

Each layer is built from the plain layer it replaces and keeps this rank's slice of its weight
along `split_dim`: column-parallel linears split output features (so each rank owns whole heads),
row-parallel ones input features (their outputs are all-reduced), the embedding its vocabulary.
Which module becomes which layer is `bigtrain.distributed.layout.TP_PLAN`; swapping them in is
`bigtrain.distributed.tensor_parallel.apply_tensor_parallel`. The model has no dropout and the
shards are sliced from the full, already initialised weights, so no per-rank RNG tracker is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigtrain import compat


class _CopyToRegion(torch.autograd.Function):
    """Identity forward, all-reduce backward: the entry to a column-parallel region."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward, identity backward: the output of a row-parallel region."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron's `copy_to_tensor_model_parallel_region`."""
    return _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron's `reduce_from_tensor_model_parallel_region`."""
    return _ReduceFromRegion.apply(x, group)


def enter_region_on_input(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Pass `module`'s first input through `copy_to_tp_region` (as torchtitan's PrepareModuleInput)."""
    module.register_forward_pre_hook(lambda _, args: (copy_to_tp_region(args[0], group), *args[1:]))


def _shard(weight: torch.Tensor, dim: int, group: dist.ProcessGroup) -> nn.Parameter:
    """This rank's slice of `weight` along `dim`, marked as DeepSpeed and Megatron mark TP params.

    `tensor_model_parallel` makes DeepSpeed's gradient-norm code count the shard on every TP rank
    (replicated parameters only on TP rank 0); `partition_dim`/`partition_stride` describe the split.
    """
    shard = weight.detach().chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]
    param = nn.Parameter(shard.clone(memory_format=torch.contiguous_format), weight.requires_grad)
    compat.mark_tensor_parallel(param, dim)
    return param


class ColumnParallelLinear(nn.Module):
    """A bias-free linear holding a slice of the output features; the output stays sharded.

    Its input must already be in the parallel region: `enter_region_on_input` copies it in once
    per region (q/k/v share one entry, gate/up another), so backward all-reduces once per region
    rather than once per projection.
    """

    split_dim = 0

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup):
        super().__init__()
        self.weight = _shard(linear.weight, self.split_dim, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """A bias-free linear holding a slice of the input features; partial outputs are all-reduced."""

    split_dim = 1

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.weight = _shard(linear.weight, self.split_dim, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp_region(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """An embedding holding one contiguous vocabulary range; other ids give zeros, then all-reduce."""

    split_dim = 0

    def __init__(self, embedding: nn.Embedding, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.weight = _shard(embedding.weight, self.split_dim, group)
        self.vocab_start = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp_region(x.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup):
        x = logits.float()
        max_logit = x.max(dim=-1, keepdim=True).values
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        x = x - max_logit
        exp = x.exp()
        sum_exp = exp.sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_exp, group=group)

        local = targets - dist.get_rank(group) * x.shape[-1]
        outside = (local < 0) | (local >= x.shape[-1])
        local = local.masked_fill(outside, 0).unsqueeze(-1)
        target_logit = x.gather(-1, local).masked_fill(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(target_logit, group=group)

        ctx.save_for_backward(exp.div_(sum_exp), local, outside)
        ctx.logits_dtype = logits.dtype
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.scatter_add(-1, local, -(~outside).unsqueeze(-1).to(softmax.dtype))
        return (grad_logits * (grad / local.numel())).to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits [b, t, V/tp] (fp32), never gathering the vocabulary.

    Equals `lm_loss` on the gathered logits; each rank's gradient is softmax − one-hot on its shard.
    """
    return _VocabParallelCrossEntropy.apply(logits, targets, group)
