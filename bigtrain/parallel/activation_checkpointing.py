"""Activation checkpointing applied to a finished model's blocks, the same way for every engine.

`full` keeps only a checkpointed block's input and recomputes the block in the backward (one more
forward: 8N instead of 6N FLOPs per token); `selective` also keeps the outputs of the matmuls and
of attention (torch's selective checkpoint API, as torchtitan's `op` policy), so the backward
recomputes only the cheap element-wise work (norms, RoPE, SwiGLU's activation);
`parallel.activation_checkpointing_every=k` checkpoints every k-th block.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from bigtrain.model.llama import Block

aten = torch.ops.aten
KEEP = {  # what `selective` saves instead of recomputing
    aten.mm.default, aten.addmm.default, aten.bmm.default,
    aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def checkpointing_mode(setting: bool | str) -> str:
    """`parallel.activation_checkpointing` as none, full or selective (true means full)."""
    return {False: "none", True: "full"}.get(setting, setting) if isinstance(setting, bool) else setting


def _keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(layers: list, setting: bool | str, every: int = 1, first: int = 0) -> None:
    """Wrap in place the forward of every `every`-th block (the first, then every k-th after it)
    of the model's layer list, or of the part of it from layer `first` on (a pipeline stage's)."""
    mode = checkpointing_mode(setting)
    if mode == "none":
        return
    context = {} if mode == "full" else {"context_fn": partial(create_selective_checkpoint_contexts, _keep_matmuls)}
    for i, layer in enumerate(layers, first):  # block k is layer k + 1
        if isinstance(layer, Block) and (i - 1) % every == 0:
            layer.forward = partial(checkpoint, layer.forward, use_reentrant=False, **context)
