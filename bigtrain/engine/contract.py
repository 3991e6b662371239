"""What the training loop and checkpoints ask of an engine (the local one or DeepSpeed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from bigtrain.checkpoint.io import Checkpointable
from bigtrain.distributed.communicator import Communicator
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.model.llama import DocumentMasking


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean loss over the step's micro-batches (a device tensor: no host sync); this
    # rank's, to be averaged over the data-parallel group, unless the engine's `loss_is_global`
    grad_norm: torch.Tensor  # total gradient norm before clipping
    skipped: torch.Tensor  # True when the update was not applied (see `UpdateGate`)
    overflow_steps: int = 0  # fp16: updates the loss scaler skipped so far
    loss_scale: float | None = None  # fp16: the current dynamic loss scale


class Engine(Checkpointable, Protocol):
    """Steps, evaluates, saves and loads (`Checkpointable`) this rank's share of the model; who the
    rank is and the collectives over ranks are its `comm`'s."""

    device: torch.device
    model: torch.nn.Module  # this rank's module (DeepSpeed's: the wrapped one)
    timer: PhaseTimer  # step phases; the loop times its data fetch on it too
    comm: Communicator
    loss_is_global: bool  # `StepOutput.loss` is already averaged over the data-parallel group
    construct_peak_gb: float  # the most memory building this rank's share of the model held at once
    documents: DocumentMasking | None  # how to find the documents of a window (None: attend across them)

    def train_step(self, micro_batches: list[torch.Tensor], lr: float) -> StepOutput: ...
    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def step_times(self) -> dict[str, float]: ...  # seconds per phase since the last call
    def router_stats(self) -> torch.Tensor | None: ...  # MoE routing since the last call, summed over ranks (None: dense)
    def take_z_loss(self) -> float | None: ...  # the logits' z-loss since the last call, over passes and ranks (None: off)
