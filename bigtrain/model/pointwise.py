"""RMSNorm and SwiGLU as autograd functions that save little for backward: SwiGLU its two inputs,
RMSNorm its input and the fp32 reciprocal RMS.

Written with plain tensor ops, autograd would keep the fp32 copy of a bf16 input that the norm
computes in, the fp32 normalised activations and the SiLU output, on top of the inputs. Here
backward recomputes those from the inputs (a few element-wise ops), as the fused kernels of
Megatron-LM do: Apex / Transformer Engine RMSNorm save the input and the fp32 reciprocal RMS,
Megatron's `SwiGLUFunction` saves the input and recomputes SiLU. Under `torch.compile` inductor
fuses both directions into one kernel each.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast runs matrix multiplies in (when on for x's device), else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        ctx.dtype = dtype
        return weight.to(dtype) * (x32 * rstd).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float() * rstd
        grad_weight = (grad * normed.to(ctx.dtype)).reshape(-1, grad.shape[-1]).sum(0)
        g = (grad * weight.to(ctx.dtype)).float()  # gradient of the normalised activations
        grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight · x / rms(x): normalised in fp32, cast once to the compute dtype and scaled there
    (torchtitan's and Hugging Face's order); saves x as given and the fp32 reciprocal RMS."""
    return _RMSNorm.apply(x, weight, eps, compute_dtype(x))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors  # the ops autograd would run, so gradients match bit for bit
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, in the inputs' dtype; saves only gate and up (SiLU is recomputed)."""
    return _SwiGLU.apply(gate, up)
