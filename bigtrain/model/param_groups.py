"""Which parameters AdamW decays: one rule, shared by the optimizer every engine builds and by the
checkpoint format, which indexes `optimizer.pt` in this order."""

from __future__ import annotations

from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, the norm weights (the model's only vectors) do not, told by
    name, as a ZeRO-3 partition's shape says nothing. Their order is the order of `optimizer.pt`
    (`bigtrain.checkpoint.format.parameter_names`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith("norm.weight") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
