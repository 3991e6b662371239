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

import functools

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**25  # fp32 logits held at most at once: 128 MiB (1,024 tokens at a 32k vocabulary)
CHUNK_ALIGN = 128  # tokens per chunk are a multiple of this: the head's matmuls run on whole GEMM tiles


def default_chunk(vocab: int) -> int:
    """Tokens per chunk of a [tokens, `vocab`] logits computation: CHUNK_ELEMENTS / vocab, rounded
    down to a multiple of CHUNK_ALIGN (at least CHUNK_ALIGN)."""
    return max(CHUNK_ALIGN, CHUNK_ELEMENTS // vocab // CHUNK_ALIGN * CHUNK_ALIGN)


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


def chunk_loss(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, coeff: float, needs_grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk of `linear_cross_entropy`: its summed cross-entropy, its summed squared
    log-sum-exp (None without z-loss) and, with `needs_grad`, the logits' gradient of the summed
    objective (softmax − one-hot, the z-loss's included). The logits are upcast to fp32 for the
    softmax; the gradient is returned in the logits' own dtype (bf16 under bf16 autocast), the
    dtype both of the head's gradient matmuls run in. `t` is [n, 1]. A pure function of its
    inputs: `torch.compile` fuses everything between the matmul and the returned gradient."""
    logits = h @ weight.t()
    dtype = logits.dtype
    logits = logits.float()
    lse = logits.logsumexp(dim=-1) if coeff else None
    log_probs = logits.log_softmax(dim=-1)
    del logits
    loss = F.nll_loss(log_probs, t.squeeze(-1), reduction="sum")  # as F.cross_entropy sums
    squares = lse.square().sum() if coeff else None
    if not needs_grad:
        return loss, squares, None
    grad = log_probs.exp_()
    if coeff:
        grad = add_z_gradient_(grad, lse, coeff)
    grad = grad.scatter_add_(-1, t, torch.full_like(t, -1, dtype=log_probs.dtype))
    return loss, squares, grad.to(dtype)


@functools.cache
def compiled_chunk_loss():
    """`chunk_loss` under `torch.compile` (one graph: the token dimension is marked dynamic by
    `run_chunk`, the vocabulary and width stay static)."""
    return torch.compile(chunk_loss, dynamic=False)


def run_chunk(h: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, coeff: float, needs_grad: bool,
              compiled: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """`chunk_loss`, compiled when asked. Chunks of any length share one graph (the last chunk of
    a batch is usually shorter); a one-token chunk, which the dynamic dimension cannot cover,
    runs eagerly."""
    if not compiled or h.shape[0] < 2:
        return chunk_loss(h, weight, t, coeff, needs_grad)
    torch._dynamo.mark_dynamic(h, 0)
    torch._dynamo.mark_dynamic(t, 0)
    return compiled_chunk_loss()(h, weight, t, coeff, needs_grad)


@functools.cache
def _gemm_has_fp32_output(device_type: str) -> bool:
    """Whether `torch.addmm(..., out_dtype=torch.float32)` runs on this device type (a bf16 GEMM
    accumulating into an fp32 output; CUDA in recent torch, not the CPU)."""
    if device_type != "cuda":
        return False
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
        out = torch.ones(2, 2, dtype=torch.float32, device=device_type)
        torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
        return bool((out == 3).all())
    except (RuntimeError, TypeError):
        return False


def add_weight_gradient_(grad_weight: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """grad_weight (fp32) += grad.T @ h in the gradient's dtype: an fp32 matmul in fp32 training; a
    bf16 matmul with fp32 accumulation under bf16 (its output fp32 where the device's GEMM can
    write fp32, CUDA; else rounded to bf16 once per chunk before the fp32 sum, as autocast rounds
    every other weight gradient of the model)."""
    with torch.autocast(grad.device.type, enabled=False):
        if grad.dtype == torch.float32:
            grad_weight.addmm_(grad.t(), h.float())
        elif _gemm_has_fp32_output(grad.device.type):
            torch.addmm(grad_weight, grad.t(), h.to(grad.dtype), out_dtype=torch.float32, out=grad_weight)
        else:
            grad_weight.add_(grad.t() @ h.to(grad.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                coeff: float, compiled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        z_total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk].unsqueeze(-1)
            loss, squares, grad = run_chunk(h, weight, t, coeff, needs_grad, compiled)
            total += loss
            if coeff:
                z_total += squares
            if needs_grad:  # both matmuls in the logits' dtype, the chunk's gradient cast once
                grad_hidden[start:start + chunk] = (grad @ weight).to(hidden.dtype)
                add_weight_gradient_(grad_weight, grad, h)
                del grad
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        z = coeff * z_total / n
        ctx.mark_non_differentiable(z)
        return total / n, z

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_z: torch.Tensor | None = None):
        return (*scaled_gradients(ctx, grad_loss), None, None, None, None)


def scaled_gradients(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunked loss's backward: the hidden-state and weight gradients its forward computed for
    the summed loss (`ctx.saved_tensors`), scaled to the mean over `ctx.n` tokens and `grad_loss`."""
    grad_hidden, grad_weight = ctx.saved_tensors
    scale = grad_loss / ctx.n
    return grad_hidden * scale.to(grad_hidden.dtype), (grad_weight * scale).to(ctx.weight_dtype)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None, z_loss: ZLoss | None = None,
                         compiled: bool = False) -> torch.Tensor:
    """`lm_loss(hidden @ weight.T, targets, z_loss)` without the full logits: `hidden` [..., d],
    `weight` [vocab, d], `targets` [...]; `chunk` tokens at a time (default: `default_chunk(vocab)`).
    With `z_loss` each chunk's gradient carries the z-loss's too, and training passes record its
    value. `compiled` runs each chunk's element-wise work as one `torch.compile` graph."""
    chunk = chunk or default_chunk(weight.shape[0])
    loss, z = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1), chunk,
                                        z_coeff(z_loss), compiled)
    if z_loss is not None:
        z_loss.record(loss, z)
    return loss
