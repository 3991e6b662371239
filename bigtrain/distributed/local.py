"""The local engine: one process, one device (CPU or a CUDA GPU), no launcher, no DeepSpeed.

This is the debug mode and the reference every parallel layout is compared against.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from bigtrain.config import TrainConfig
from bigtrain.distributed import safe_load
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.distributed.update_gate import UpdateGate
from bigtrain.errors import BigtrainError
from bigtrain.model import compile_blocks, lm_loss


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BigtrainError("train.device=cuda but no CUDA device is visible")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA unless fp32 is asked for; plain fp32 on CPU."""
    if precision == "fp16":
        raise BigtrainError("train.precision=fp16 needs parallel.engine=deepspeed (dynamic loss scaling)")
    if precision == "bf16" and device.type != "cuda":
        raise BigtrainError("train.precision=bf16 needs a CUDA device (use fp32 or auto on CPU)")
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, vectors (norm weights) do not."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups`, with the kernel `train.adamw_impl` names."""
    impl = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, **impl[cfg.adamw_impl])


@dataclass
class StepOutput:
    loss: torch.Tensor  # mean loss over the step's micro-batches (a device tensor: no host sync)
    grad_norm: torch.Tensor  # total gradient norm before clipping
    skipped: torch.Tensor  # True when the update was not applied (see `UpdateGate`)


class LocalEngine:
    """Runs forward, backward and AdamW for one optimiser step over a list of micro-batches."""

    rank, world_size, dp_rank, dp_size, is_main = 0, 1, 0, 1, True
    overflow_steps, loss_scale = 0, None  # no fp16 loss scaling here

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.device = pick_device(cfg.device)
        self.timer = PhaseTimer(self.device)
        self.model = model.to(self.device)
        self.loss_fn = lm_loss
        if cfg.compile:
            compile_blocks(self.model.layers)
            self.loss_fn = torch.compile(lm_loss, dynamic=False)  # fuses softmax and its gradient
        self.autocast = lambda: autocast_for(self.device, cfg.precision)
        self.grad_clip = cfg.grad_clip
        self.optimizer = build_adamw(self.model, cfg)
        self.gate = UpdateGate(cfg.spike_factor)

    def train_step(self, micro_batches: list[torch.Tensor], lr: float) -> StepOutput:
        """Accumulate gradients over `micro_batches` ([b, seq+1] tokens each), then update once."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.device)
        for batch in micro_batches:
            with self.timer.phase("forward"):
                tokens = batch.to(self.device, non_blocking=True)
                with self.autocast():
                    loss = self.loss_fn(self.model(tokens[:, :-1]), tokens[:, 1:]) / len(micro_batches)
            with self.timer.phase("backward"):
                loss.backward()
            total += loss.detach()
        with self.timer.phase("optimizer"):
            max_norm = self.grad_clip if self.grad_clip else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            skip = self.gate.skip(total, grad_norm)
            if self.optimizer.defaults["fused"]:
                self.optimizer.found_inf = skip.float()  # fused AdamW skips on the device: no host sync
                self.optimizer.step()
            elif not skip:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss=total, grad_norm=grad_norm, skipped=skip)

    def step_times(self) -> dict[str, float]:
        """Seconds per phase since the last call (call at logging time: it waits for the device)."""
        return self.timer.read()

    def barrier(self) -> None:
        """Nothing to wait for: there is one process."""

    def any_rank(self, flag: bool) -> bool:
        return flag

    def sum_across_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of one batch, in eval mode."""
        self.model.eval()
        tokens = tokens.to(self.device)
        with self.autocast():
            loss = lm_loss(self.model(tokens[:, :-1]), tokens[:, 1:])
        self.model.train()
        return loss

    def save(self, directory: Path) -> None:
        """Write the weights (safetensors) and the AdamW state into a checkpoint directory."""
        safetensors.torch.save_model(self.model, str(directory / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        load_weights(self.model, directory)
        state = safe_load.load(directory / "optimizer.pt", map_location=self.device)
        self.optimizer.load_state_dict(state)


def load_weights(model: nn.Module, directory: Path) -> None:
    """Load `model.safetensors` from a checkpoint directory into `model` (strict)."""
    missing, unexpected = safetensors.torch.load_model(model, str(directory / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise BigtrainError(f"{directory} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
