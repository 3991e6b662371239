"""The language-model loss: mean next-token cross-entropy, computed in fp32.

`lm_loss` takes logits. `linear_cross_entropy` takes the hidden states and the head's weight and
never holds the full-vocabulary logits: it computes them a chunk of tokens at a time, and with
each chunk its gradient (softmax − one-hot), so that forward+backward keeps one fp32 chunk of
logits instead of two [tokens, vocab] fp32 tensors. Same loss and gradients, a fraction of the
memory (docs/benchmarks.md has the measurement).

Both optionally add PaLM's z-loss of the output logits (`ZLoss`: coeff · mean over tokens of
logsumexp(logits)²) to the objective: its gradient joins the cross-entropy's, while the value they
return stays the cross-entropy (so loss curves stay comparable); the z-loss value is recorded apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**25  # fp32 logits held at once: 128 MiB (1,048 tokens at a 32k vocabulary)


class ZLoss:
    """PaLM's z-loss of the output logits, `coeff` · mean over tokens of logsumexp(logits)², which
    keeps the softmax normaliser near 1. The loss functions given it add its gradient to the
    cross-entropy's and record its value (coefficient included) of every training pass here,
    summed on the device (no host sync per step) until `take`."""

    def __init__(self, coeff: float):
        self.coeff = coeff
        self.sums: torch.Tensor | None = None  # [training passes, their summed z-loss]

    def add(self, value: torch.Tensor) -> None:
        row = torch.stack([torch.ones_like(value), value]).detach().double()
        self.sums = row if self.sums is None else self.sums + row

    def record(self, loss: torch.Tensor, value: torch.Tensor) -> None:
        """Record `value` if `loss` belongs to a training pass (one that will be backpropagated)."""
        if loss.requires_grad:
            self.add(value)

    def take(self) -> torch.Tensor | None:
        """[passes, summed z-loss] since the last call (None: none)."""
        sums, self.sums = self.sums, None
        return sums


def z_coeff(z_loss: ZLoss | None) -> float:
    return z_loss.coeff if z_loss is not None else 0.0


def add_z_gradient_(softmax: torch.Tensor, lse: torch.Tensor, coeff: float) -> torch.Tensor:
    """softmax [n, V] (or a vocabulary shard of it) times 1 + 2·coeff·lse [n], in place: with the
    one-hot subtracted, the logits' gradient of the summed cross-entropy plus coeff · Σ lse²
    (d lse / d logits = softmax)."""
    return softmax.mul_((2 * coeff * lse).add_(1).unsqueeze(-1))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: ZLoss | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over all positions (computed in fp32). With `z_loss` its
    gradient is that of cross-entropy + z-loss (the value stays the cross-entropy)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(logits, targets.reshape(-1))
    if z_loss is None or not loss.requires_grad:  # (validation: the cross-entropy is all it needs)
        return loss
    z = z_loss.coeff * logits.logsumexp(dim=-1).square().mean()
    z_loss.add(z)
    return WithGradientOf.apply(loss, z)


class WithGradientOf(torch.autograd.Function):
    """`loss` itself, whose gradient also reaches `extra`: the objective is loss + extra while the
    value stays the loss."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                coeff: float) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk].unsqueeze(-1)
            logits = (h @ weight.t()).float()
            lse = logits.logsumexp(dim=-1) if coeff else None
            log_probs = logits.log_softmax(dim=-1)
            del logits
            total += F.nll_loss(log_probs, t.squeeze(-1), reduction="sum")  # as F.cross_entropy sums
            if coeff:
                z_total += lse.square().sum()
            if needs_grad:
                grad = log_probs.exp_()
                if coeff:
                    grad = add_z_gradient_(grad, lse, coeff)
                grad = grad.scatter_add_(-1, t, torch.full_like(t, -1, dtype=log_probs.dtype))
                grad_hidden[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
                grad_weight.addmm_(grad.t(), h.float())
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        z = coeff * z_total / n
        ctx.mark_non_differentiable(z)
        return total / n, z

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_z: torch.Tensor | None = None):
        return (*scaled_gradients(ctx, grad_loss), None, None, None)


def scaled_gradients(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunked loss's backward: the hidden-state and weight gradients its forward computed for
    the summed loss (`ctx.saved_tensors`), scaled to the mean over `ctx.n` tokens and `grad_loss`."""
    grad_hidden, grad_weight = ctx.saved_tensors
    scale = grad_loss / ctx.n
    return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None, z_loss: ZLoss | None = None) -> torch.Tensor:
    """`lm_loss(hidden @ weight.T, targets, z_loss)` without the full logits: `hidden` [..., d],
    `weight` [vocab, d], `targets` [...]; `chunk` tokens at a time (default: CHUNK_ELEMENTS / vocab).
    With `z_loss` each chunk's gradient carries the z-loss's too, and training passes record its value."""
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    loss, z = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk,
                                        z_coeff(z_loss))
    if z_loss is not None:
        z_loss.record(loss, z)
    return loss
