"""bf16 parameters with fp32 master weights (`train.master_weights`): Megatron's `main_grad` pattern.

The model holds its parameters in bf16, so forward and backward read them as they are (no cast per
micro-batch, also inside compiled blocks) and the residual stream is bf16. The optimizer holds an
fp32 master of each one. Every micro-batch's bf16 gradient is added straight into the master's fp32
`.grad` as autograd finishes it (a post-accumulate hook), and the bf16 one is dropped; after the
update the masters are copied back into the bf16 parameters. Checkpoints hold the masters, so the
format (fp32 `model.safetensors`) does not change and runs resume across the switch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class MasterWeights:
    """The fp32 masters of `model`'s floating-point parameters, which it casts to `dtype`."""

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.params = [p for p in model.parameters() if p.is_floating_point()]
        self.masters = [nn.Parameter(p.detach().float().clone()) for p in self.params]
        self.master_of = {id(p): m for p, m in zip(self.params, self.masters, strict=True)}
        for p, master in zip(self.params, self.masters, strict=True):
            p.data = p.data.to(dtype)
            p.register_post_accumulate_grad_hook(self._accumulate_into(master))

    @staticmethod
    def _accumulate_into(master: nn.Parameter):
        def accumulate(param: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)  # fp32 += bf16 in one pass
            param.grad = None
        return accumulate

    def regroup(self, groups: list[dict]) -> list[dict]:
        """Optimizer parameter groups over the model's parameters, over their masters instead."""
        return [{**group, "params": [self.master_of[id(p)] for p in group["params"]]} for group in groups]

    def names(self, model: nn.Module) -> dict[int, str]:
        """`id(master)` → the name of its parameter in `model` (Muon tells matrices by name)."""
        return {id(self.master_of[id(p)]): name for name, p in model.named_parameters() if id(p) in self.master_of}

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The bf16 parameters rounded from the masters (after an update or a load)."""
        torch._foreach_copy_(self.params, self.masters)

    @contextlib.contextmanager
    def exposed(self) -> Iterator[None]:
        """The model's parameters are the fp32 masters inside (to save or load weights); on leaving,
        the bf16 parameters again, rounded from the masters."""
        low = [p.data for p in self.params]
        for p, master in zip(self.params, self.masters, strict=True):
            p.data = master.data
        try:
            yield
        finally:
            for p, data in zip(self.params, low, strict=True):
                p.data = data
            self.copy_to_model()
