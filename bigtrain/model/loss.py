"""The language-model loss: mean next-token cross-entropy, computed in fp32.

`lm_loss` takes logits. `linear_cross_entropy` takes the hidden states and the head's weight and
never holds the full-vocabulary logits: it computes them a chunk of tokens at a time, and with
each chunk its gradient (softmax − one-hot), so that forward+backward keeps one fp32 chunk of
logits instead of two [tokens, vocab] fp32 tensors. Same loss and gradients, a fraction of the
memory (docs/benchmarks.md has the measurement).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**25  # fp32 logits held at once: 128 MiB (1,048 tokens at a 32k vocabulary)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all positions (computed in fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk].unsqueeze(-1)
            log_probs = (h @ weight.t()).float().log_softmax(dim=-1)
            total += F.nll_loss(log_probs, t.squeeze(-1), reduction="sum")  # as F.cross_entropy sums
            if needs_grad:
                grad = log_probs.exp_().scatter_add_(-1, t, torch.full_like(t, -1, dtype=log_probs.dtype))
                grad_hidden[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_weight.addmm_(grad.t(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        return (*scaled_gradients(ctx, grad_loss), None, None)


def scaled_gradients(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunked loss's backward: the hidden-state and weight gradients its forward computed for
    the summed loss (`ctx.saved_tensors`), scaled to the mean over `ctx.n` tokens and `grad_loss`."""
    grad_hidden, grad_weight = ctx.saved_tensors
    scale = grad_loss / ctx.n
    return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """`lm_loss(hidden @ weight.T, targets)` without the full logits: `hidden` [..., d], `weight`
    [vocab, d], `targets` [...]; `chunk` tokens at a time (default: CHUNK_ELEMENTS / vocab)."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk)
