"""Validation loss and perplexity: exp(mean next-token NLL) over fixed held-out windows."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.data.loader import PackedTokens, eval_batches


@dataclass
class EvalResult:
    loss: float  # mean NLL per predicted token (nats)
    perplexity: float
    tokens: int


@torch.no_grad()
def evaluate(
    model: nn.Module, data: PackedTokens, micro_batch: int, max_batches: int | None,
    device: torch.device, autocast: contextlib.AbstractContextManager | None = None,
) -> EvalResult:
    """Sum the NLL of every predicted token in the first `max_batches` windows, then average."""
    was_training = model.training
    model.eval()
    nll, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for batch in eval_batches(data, micro_batch, max_batches):
        tokens = batch.to(device)
        with autocast or contextlib.nullcontext():
            logits = model(tokens[:, :-1])
        targets = tokens[:, 1:]
        nll += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").double()
        count += targets.numel()
    model.train(was_training)
    loss = (nll / count).item()
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=count)
