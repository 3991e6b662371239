"""The cross-entropy of vocab-sharded logits (tensor parallelism), never gathering the vocabulary.

Each rank holds logits for its contiguous vocabulary range; per token, the max and then the sum of
exponentials with the target logit (from the rank that owns it) are all-reduced, and each rank's
gradient is softmax − one-hot on its shard. `vocab_parallel_linear_cross_entropy` fuses it with the
head's matmul chunk by chunk (as `linear_cross_entropy` does on one rank), so no logits shard is
held; `vocab_parallel_cross_entropy` takes logits (the pipeline's last stage) and turns its one
fp32 buffer from softmax into gradient in place (Megatron's backward).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bigtrain.model.loss import CHUNK_ELEMENTS, scaled_gradients


def _softmax_shard_(x: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup):
    """Turn fp32 logits shards `x` [n, V/tp] in place into their softmax over the whole vocabulary.

    Returns each token's cross-entropy [n] (the same on every rank), and the target's index in
    this shard [n, 1] with whether this rank owns it [n, 1]. Two small all-reduces: the max, then
    the sum of exponentials together with the target logit (from its owning rank).
    """
    max_logit = x.max(dim=-1, keepdim=True).values
    dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
    local = targets.unsqueeze(-1) - dist.get_rank(group) * x.shape[-1]
    inside = (local >= 0) & (local < x.shape[-1])
    local = local.masked_fill(~inside, 0)
    target_logit = x.sub_(max_logit).gather(-1, local).masked_fill_(~inside, 0.0)
    stats = torch.cat([target_logit, x.exp_().sum(dim=-1, keepdim=True)], dim=-1)
    dist.all_reduce(stats, group=group)
    target_logit, sum_exp = stats.unbind(-1)
    x.div_(sum_exp.unsqueeze(-1))
    return sum_exp.log() - target_logit, local, inside


def _minus_one_hot_(softmax: torch.Tensor, local: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """softmax − one-hot(target) on this shard, in place: the logits' gradient of the summed loss."""
    return softmax.scatter_add_(-1, local, -inside.to(softmax.dtype))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup):
        softmax = logits.detach().to(torch.float32, copy=True)  # then the gradient, in place
        losses, local, inside = _softmax_shard_(softmax, targets, group)
        ctx.save_for_backward(softmax, local, inside)
        ctx.logits_dtype = logits.dtype
        return losses.mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, inside = ctx.saved_tensors  # reused in place: backward runs once
        grad_logits = _minus_one_hot_(softmax, local, inside).mul_(grad / local.numel())
        return grad_logits.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits [b, t, V/tp] (fp32), never gathering the vocabulary.

    Equals `lm_loss` on the gathered logits; each rank's gradient is softmax − one-hot on its shard,
    computed in the one fp32 buffer that held the softmax (Megatron's in-place backward).
    """
    return _VocabParallelCrossEntropy.apply(logits, targets, group)


def _chunk(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup,
           grad_h: torch.Tensor | None, grad_weight: torch.Tensor | None) -> torch.Tensor:
    """One chunk's summed loss; with gradient buffers, its gradients written into `grad_h` and
    added to `grad_weight`. Its one fp32 logits buffer is freed on return, before the next's."""
    logits = (h @ weight.t()).float()  # fresh: becomes the softmax, then the gradient, in place
    losses, local, inside = _softmax_shard_(logits, targets, group)
    if grad_h is not None:
        grad = _minus_one_hot_(logits, local, inside)
        grad_h.copy_(grad.to(weight.dtype) @ weight)
        grad_weight.addmm_(grad.t(), h.float())
    return losses.sum()


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                group: dist.ProcessGroup, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, n, chunk):
            grad_h = None if grad_hidden is None else grad_hidden[start:start + chunk]
            total += _chunk(hidden[start:start + chunk], weight, targets[start:start + chunk], group,
                            grad_h, grad_weight)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        return (*scaled_gradients(ctx, grad_loss), None, None, None)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                        group: dist.ProcessGroup, chunk: int | None = None) -> torch.Tensor:
    """`vocab_parallel_cross_entropy(hidden @ weight.T, targets)` for a vocab shard `weight`
    [V/tp, d], `chunk` tokens at a time (default: CHUNK_ELEMENTS / (V/tp)), each chunk's
    gradient computed with its loss (as `linear_cross_entropy`): never more than one fp32 chunk
    of logits. The gradient of `hidden` is this shard's part; the head's region entry sums it."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _VocabParallelLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                  targets.reshape(-1), group, chunk)
