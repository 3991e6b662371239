"""Validation loss and perplexity: exp(mean next-token NLL) over fixed held-out windows."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bigtrain.data.loader import PackedTokens, eval_batches

BatchLoss = Callable[[torch.Tensor], torch.Tensor]  # [b, seq+1] tokens → mean NLL of its b·seq targets


@dataclass
class EvalResult:
    loss: float  # mean NLL per predicted token (nats)
    perplexity: float
    tokens: int


def evaluate(batch_loss: BatchLoss, data: PackedTokens, micro_batch: int, max_batches: int | None) -> EvalResult:
    """Average `batch_loss` over the first `max_batches` windows, weighted by predicted tokens."""
    nll, count = 0.0, 0
    for batch in eval_batches(data, micro_batch, max_batches):
        targets = batch.shape[0] * (batch.shape[1] - 1)
        nll += float(batch_loss(batch)) * targets
        count += targets
    loss = nll / count
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=count)
