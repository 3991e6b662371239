"""Validation loss and perplexity: exp(mean next-token NLL) over fixed held-out windows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from bigtrain.data.loader import Windows

BatchLoss = Callable[[torch.Tensor], torch.Tensor]  # [b, seq+1] tokens → mean NLL of its b·seq targets
SumAcrossRanks = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class EvalResult:
    loss: float  # mean NLL per predicted token (nats)
    perplexity: float
    tokens: int


def evaluate(
    batch_loss: BatchLoss, data: Windows, micro_batch: int, max_windows: int | None,
    dp_rank: int = 0, dp_size: int = 1, sum_across_ranks: SumAcrossRanks | None = None,
) -> EvalResult:
    """Mean NLL over the first `max_windows` windows; data-parallel ranks share them out."""
    n = len(data) if max_windows is None else min(max_windows, len(data))
    mine = range(dp_rank, n, dp_size)
    totals = torch.zeros(2, dtype=torch.float64)  # NLL sum, target count
    for start in range(0, len(mine), micro_batch):
        ids = mine[start : start + micro_batch]
        batch = torch.from_numpy(np.stack([data.window(i) for i in ids]))
        targets = batch.shape[0] * (batch.shape[1] - 1)
        totals += torch.tensor([float(batch_loss(batch)) * targets, targets], dtype=torch.float64)
    if sum_across_ranks is not None:
        totals = sum_across_ranks(totals)
    loss = (totals[0] / totals[1]).item()
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=int(totals[1]))
