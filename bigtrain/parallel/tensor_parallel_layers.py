"""Megatron-style tensor-parallel layers.

Each layer is built from the plain layer it replaces and keeps this rank's slice of its weight
along `split_dim`: column-parallel linears split output features (so each rank owns whole heads),
row-parallel ones input features (their outputs are all-reduced), the embedding its vocabulary.
Which module becomes which layer is `bigtrain.parallel.layout.TP_PLAN`; swapping them in is
`bigtrain.parallel.tensor_parallel.shard_layer`; the head's loss is
`bigtrain.parallel.vocab_parallel_loss`. Under sequence parallelism (Korthikanti et al. 2022) the
row-parallel outputs are reduce-scattered to sequence shards [b, t/tp, d] instead of all-reduced,
and each column-parallel region gathers its input. The model has no dropout and the shards are
sliced from the full, already initialised weights, so no per-rank RNG tracker is needed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigtrain import compat
from bigtrain.model.loss import ZLoss
from bigtrain.parallel.vocab_parallel_loss import vocab_parallel_linear_cross_entropy


class _CopyToRegion(torch.autograd.Function):
    """Identity forward, all-reduce backward: the entry to a column-parallel region.

    The gradient reaching it is the sum of the input gradients of the region's column-parallel
    matmuls, a fresh tensor nothing else holds, so it is all-reduced in place.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward (in place), identity backward: the output of a row-parallel region.

    Its input is the fresh output of the region's last op (a matmul, the embedding's masked
    lookup), which no op saved for backward; `mark_dirty` lets autograd's version check refuse
    any later use that did.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _all_gather_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, t/tp, ...] shards of every rank → [b, t, ...] in rank order."""
    tp = dist.get_world_size(group)
    out = x.new_empty((tp * x.shape[0], *x.shape[1:]))
    compat.all_gather_single(out, x.contiguous(), group=group)
    return out.unflatten(0, (tp, -1)).movedim(0, 1).flatten(1, 2)  # a copy unless b = 1


def _reduce_scatter_sequence(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, t, ...] partial sums → this rank's [b, t/tp, ...] slice of their sum over ranks."""
    tp = dist.get_world_size(group)
    parts = x.unflatten(1, (tp, -1)).movedim(1, 0).flatten(0, 1).contiguous()  # a copy unless b = 1
    out = x.new_empty((x.shape[0], x.shape[1] // tp, *x.shape[2:]))
    compat.reduce_scatter_single(out, parts, group=group)
    return out


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence forward, reduce-scatter backward: the entry to a
    column-parallel region under sequence parallelism."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _reduce_scatter_sequence(grad, ctx.group), None


class _ScatterSequence(torch.autograd.Function):
    """Reduce-scatter along the sequence forward, all-gather backward: the output of a
    row-parallel region under sequence parallelism."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_sequence(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron's `copy_to_tensor_model_parallel_region`."""
    return _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron's `reduce_from_tensor_model_parallel_region` (all-reduces `x` in place)."""
    return _ReduceFromRegion.apply(x, group)


def gather_from_sequence_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron's `gather_from_sequence_parallel_region`, along dim 1 of [b, t, ...]."""
    return _GatherSequence.apply(x, group)


def reduce_scatter_to_sequence_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron's `reduce_scatter_to_sequence_parallel_region`, along dim 1 of [b, t, ...]."""
    return _ScatterSequence.apply(x, group)


def reduce_region_output(x: torch.Tensor, group: dist.ProcessGroup, sequence_parallel: bool) -> torch.Tensor:
    """Sum a row-parallel region's partial outputs: whole (all-reduce) or this rank's sequence
    shard (reduce-scatter)."""
    return (reduce_scatter_to_sequence_region if sequence_parallel else reduce_from_tp_region)(x, group)


class _Regather:
    """A sequence-parallel region's gathered input as its column-parallel matmuls keep it for the
    backward: this rank's shard, gathered again by the first of them and dropped after the last."""

    def __init__(self, group: dist.ProcessGroup):
        self.group, self.users, self.full = group, 0, None

    def gather(self, shard: torch.Tensor) -> torch.Tensor:
        if self.full is None:
            self.full = _all_gather_sequence(shard, self.group)
        return self.full

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.full = None


class _LinearKeepingShard(torch.autograd.Function):
    """`F.linear` of a region's gathered input that saves the input's sequence shard, not the
    gathered tensor: Megatron's sequence-parallel linear (t/tp tokens of the input kept, not t)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, shard: torch.Tensor, regather: _Regather):
        regather.users += 1
        ctx.regather = regather
        ctx.save_for_backward(weight, shard)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, shard = ctx.saved_tensors
        full = ctx.regather.gather(shard)
        grad_weight = grad.flatten(0, -2).t() @ full.flatten(0, -2)
        ctx.regather.release()
        return grad @ weight, grad_weight, None, None


def enter_region_on_input(module: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool = False) -> None:
    """Pass `module`'s first input through `copy_to_tp_region` (as torchtitan's PrepareModuleInput),
    or under sequence parallelism `gather_from_sequence_region`, with the region's column-parallel
    linears told to keep only the shard for their backward."""
    if not sequence_parallel:
        module.register_forward_pre_hook(lambda _, args: (copy_to_tp_region(args[0], group), *args[1:]))
        return
    linears = [m for m in module.modules() if isinstance(m, ColumnParallelLinear)]

    def enter(_, args):
        # a compiled block keeps the gathered input instead: dynamo cannot trace the shared re-gather
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            kept = args[0].detach(), _Regather(group)
            for linear in linears:
                linear.kept_input = kept
        return gather_from_sequence_region(args[0], group), *args[1:]

    def leave(*_):
        if not torch.compiler.is_compiling():
            for linear in linears:
                linear.kept_input = None

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def reduce_grad_over_tp(param: nn.Parameter, group: dist.ProcessGroup) -> None:
    """Sum `param`'s gradient over the tensor-parallel group before it accumulates: a replicated
    weight applied to one sequence shard per rank (the RMSNorms under sequence parallelism)."""
    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # a hook must not modify its argument
        dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(all_reduce)


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
        self.kept_input: tuple[torch.Tensor, _Regather] | None = None  # set by a sequence-parallel entry

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept_input is None:
            return F.linear(x, self.weight)
        return _LinearKeepingShard.apply(x, self.weight, *self.kept_input)


class VocabParallelLMHead(ColumnParallelLinear):
    """The column-parallel head: vocab-sharded logits, or given targets their mean cross-entropy
    without ever holding the logits shard (`vocab_parallel_linear_cross_entropy`), as `LMHead`."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup):
        super().__init__(linear, group)
        self.group = group

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None,
                z_loss: ZLoss | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return vocab_parallel_linear_cross_entropy(x, self.weight, targets, self.group, z_loss=z_loss)


class RowParallelLinear(nn.Module):
    """A bias-free linear holding a slice of the input features; partial outputs are all-reduced
    (under sequence parallelism: reduce-scattered to sequence shards)."""

    split_dim = 1

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _shard(linear.weight, self.split_dim, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_region_output(F.linear(x, self.weight), self.group, self.sequence_parallel)


class VocabParallelEmbedding(nn.Module):
    """An embedding holding one contiguous vocabulary range; other ids give zeros, then all-reduce
    (under sequence parallelism: reduce-scatter to sequence shards)."""

    split_dim = 0

    def __init__(self, embedding: nn.Embedding, group: dist.ProcessGroup, sequence_parallel: bool = False):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        self.weight = _shard(embedding.weight, self.split_dim, group)
        self.vocab_start = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_region_output(x.masked_fill_(outside.unsqueeze(-1), 0.0), self.group, self.sequence_parallel)
