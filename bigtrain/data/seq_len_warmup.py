"""Sequence-length warmup (`data.seq_len_warmup`): early steps train on shorter windows, at the same
tokens per step, because short contexts are cheaper and the first steps learn little from long ones
(OLMo-core's sequence-length schedule).

A step's windows are the loader's `seq_len + 1` windows cut into `seq_len / length` windows of
`length + 1` tokens over the same (input, target) pairs: the data order, the position a resumed run
continues from and the tokens per step do not change, whatever the data-parallel size. Lengths
double from `start`, each used once the linear ramp from `start` to `seq_len` over `steps` reaches
it, so a compiled model sees at most log2(seq_len / start) + 1 shapes.
"""

from __future__ import annotations

import torch

from bigtrain.config import DataConfig


def window_length(step: int, data: DataConfig) -> int:
    """The window length at optimizer step `step` (counted from 0)."""
    warmup = data.seq_len_warmup
    if warmup is None or step >= warmup.steps:
        return data.seq_len
    ramp = warmup.start + (data.seq_len - warmup.start) * step / warmup.steps
    length = warmup.start
    while length * 2 <= ramp:
        length *= 2
    return length


def cut_windows(windows: torch.Tensor, length: int) -> torch.Tensor:
    """[b, seq_len + 1] windows as [b · seq_len / length, length + 1] over the same (input, target) pairs."""
    b, width = windows.shape
    parts = (width - 1) // length
    if parts == 1:
        return windows
    inputs = windows[:, :-1].reshape(b, parts, length)
    last_targets = windows[:, 1:].reshape(b, parts, length)[..., -1:]
    return torch.cat([inputs, last_targets], dim=-1).reshape(b * parts, length + 1)
