"""The cross-entropy of vocab-sharded logits (tensor parallelism), never gathering the vocabulary.

Each rank holds logits for its contiguous vocabulary range; per token, the max and then the sum of
exponentials with the target logit (from the rank that owns it) are all-reduced, and each rank's
gradient is softmax − one-hot on its shard. `vocab_parallel_linear_cross_entropy` fuses it with the
head's matmul chunk by chunk (as `linear_cross_entropy` does on one rank), so no logits shard is
held; `vocab_parallel_cross_entropy` takes logits (the pipeline's last stage) and turns its one
fp32 buffer from softmax into gradient in place (Megatron's backward). Given a `ZLoss`, both add
its gradient with the global log-sum-exp (max and sum of exponentials are already all-reduced), so
tp ranks compute exactly the single-process z-loss.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bigtrain.model.loss import (
    ZLoss,
    add_weight_gradient_,
    add_z_gradient_,
    default_chunk,
    scaled_gradients,
    z_coeff,
)


def _softmax_shard_(x: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup):
    """Turn fp32 logits shards `x` [n, V/tp] in place into their softmax over the whole vocabulary.

    Returns each token's cross-entropy and log-sum-exp [n] (the same on every rank), and the
    target's index in this shard [n, 1] with whether this rank owns it [n, 1]. Two small
    all-reduces: the max, then the sum of exponentials together with the target logit (from its
    owning rank).
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
    log_sum_exp = sum_exp.log()
    return log_sum_exp - target_logit, log_sum_exp + max_logit.squeeze(-1), local, inside


def _minus_one_hot_(softmax: torch.Tensor, local: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """softmax − one-hot(target) on this shard, in place: the logits' gradient of the summed loss."""
    return softmax.scatter_add_(-1, local, -inside.to(softmax.dtype))


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup, coeff: float):
        softmax = logits.detach().to(torch.float32, copy=True)  # then the gradient, in place
        losses, lse, local, inside = _softmax_shard_(softmax, targets, group)
        ctx.save_for_backward(softmax, lse, local, inside)
        ctx.logits_dtype, ctx.coeff = logits.dtype, coeff
        z = coeff * lse.square().mean()
        ctx.mark_non_differentiable(z)
        return losses.mean(), z

    @staticmethod
    def backward(ctx, grad: torch.Tensor, grad_z: torch.Tensor | None = None):
        softmax, lse, local, inside = ctx.saved_tensors  # reused in place: backward runs once
        if ctx.coeff:
            softmax = add_z_gradient_(softmax, lse, ctx.coeff)
        grad_logits = _minus_one_hot_(softmax, local, inside).mul_(grad / local.numel())
        return grad_logits.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup, z_loss: ZLoss | None = None
) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits [b, t, V/tp] (fp32), never gathering the vocabulary.

    Equals `lm_loss` on the gathered logits (with `z_loss` too); each rank's gradient is softmax −
    one-hot on its shard, computed in the one fp32 buffer that held the softmax (Megatron's
    in-place backward).
    """
    loss, z = _VocabParallelCrossEntropy.apply(logits, targets, group, z_coeff(z_loss))
    if z_loss is not None:
        z_loss.record(loss, z)
    return loss


def _chunk(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup,
           grad_h: torch.Tensor | None, grad_weight: torch.Tensor | None,
           coeff: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's summed loss and summed squared log-sum-exp (None without z-loss); with gradient
    buffers, its gradients written into `grad_h` and added to `grad_weight`. Its one fp32 logits
    buffer is freed on return, before the next's."""
    logits = h @ weight.t()
    dtype = logits.dtype  # the gradient's matmuls run in it (bf16 under bf16 autocast)
    logits = logits.float()  # fresh: becomes the softmax, then the gradient, in place
    losses, lse, local, inside = _softmax_shard_(logits, targets, group)
    if grad_h is not None:
        if coeff:
            logits = add_z_gradient_(logits, lse, coeff)
        grad = _minus_one_hot_(logits, local, inside).to(dtype)  # cast once, used by both matmuls
        del logits
        grad_h.copy_(grad @ weight)
        add_weight_gradient_(grad_weight, grad, h)
    return losses.sum(), lse.square().sum() if coeff else None


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                group: dist.ProcessGroup, chunk: int, coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, n, chunk):
            grad_h = None if grad_hidden is None else grad_hidden[start:start + chunk]
            loss, squares = _chunk(hidden[start:start + chunk], weight, targets[start:start + chunk], group,
                                   grad_h, grad_weight, coeff)
            total += loss
            if squares is not None:
                z_total += squares
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        z = coeff * z_total / n
        ctx.mark_non_differentiable(z)
        return total / n, z

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_z: torch.Tensor | None = None):
        return (*scaled_gradients(ctx, grad_loss), None, None, None, None)


def vocab_parallel_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                        group: dist.ProcessGroup, chunk: int | None = None,
                                        z_loss: ZLoss | None = None) -> torch.Tensor:
    """`vocab_parallel_cross_entropy(hidden @ weight.T, targets)` for a vocab shard `weight`
    [V/tp, d], `chunk` tokens at a time (default: `default_chunk(V/tp)`), each chunk's
    gradient computed with its loss (as `linear_cross_entropy`): never more than one fp32 chunk
    of logits. The gradient of `hidden` is this shard's part; the head's region entry sums it.
    With `z_loss`, as `linear_cross_entropy`'s (from the global log-sum-exp)."""
    chunk = chunk or default_chunk(weight.shape[0])
    loss, z = _VocabParallelLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                     targets.reshape(-1), group, chunk, z_coeff(z_loss))
    if z_loss is not None:
        z_loss.record(loss, z)
    return loss
