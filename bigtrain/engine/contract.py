"""What the training loop and checkpoints ask of an engine (the local one or DeepSpeed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from bigtrain.checkpoint.io import Checkpointable
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.engine.update_gate import UpdateGate


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean loss over the step's micro-batches (a device tensor: no host sync); this
    # rank's until the engine's `mean_over_dp` averages it over the data-parallel group
    grad_norm: torch.Tensor  # total gradient norm before clipping
    skipped: torch.Tensor  # True when the update was not applied (see `UpdateGate`)


class Engine(Checkpointable, Protocol):
    """Steps, evaluates, reports step times and reduces over data parallelism; saving, loading and
    the rank collectives are `Checkpointable`'s."""

    dp_rank: int
    dp_size: int
    device: torch.device
    model: torch.nn.Module  # this rank's module (DeepSpeed's: the wrapped one)
    timer: PhaseTimer
    gate: UpdateGate
    overflow_steps: int
    loss_scale: float | None

    def train_step(self, micro_batches: list[torch.Tensor], lr: float) -> StepOutput: ...
    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def step_times(self) -> dict[str, float]: ...
    def mean_over_dp(self, losses: torch.Tensor) -> torch.Tensor: ...
    def sum_across_dp(self, tensor: torch.Tensor) -> torch.Tensor: ...
