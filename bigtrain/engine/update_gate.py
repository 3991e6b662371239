"""Which optimiser updates to skip: a non-finite gradient norm or loss, or a loss spike.

The decision is a device tensor, so nothing waits for the host: the local engine on CUDA hands it
to fused AdamW as `found_inf` (the kernel then leaves weights, moments and step count alone); on
CPU reading it costs nothing. Under DeepSpeed the host reads it once per step, where DeepSpeed
itself already syncs on the gradient norm (ZeRO skips a non-finite norm on its own).
"""

from __future__ import annotations

import torch

EMA = 0.95  # weight of the running mean of accepted losses that a spike is measured against


class UpdateGate:
    """Skip an update whose gradient norm or loss is not finite, or whose loss exceeds
    `spike_factor` × the running mean of the losses of accepted updates."""

    def __init__(self, spike_factor: float | None):
        self.spike_factor = spike_factor
        self.mean_loss = torch.tensor(float("nan"))  # NaN until an update is accepted

    def skip(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | float) -> torch.Tensor:
        """True (a 0-dim bool tensor) when this step's update must not be applied."""
        norm = torch.as_tensor(grad_norm, dtype=torch.float32)
        bad = ~torch.isfinite(norm)
        if loss is None:
            return bad
        loss = loss.detach().float().to(norm.device)
        bad = bad | ~torch.isfinite(loss)
        if self.spike_factor:
            mean = self.mean_loss.to(loss.device)
            bad = bad | (loss > self.spike_factor * mean)  # False while the mean is NaN
            updated = torch.where(torch.isnan(mean), loss, EMA * mean + (1 - EMA) * loss)
            self.mean_loss = torch.where(bad, mean, updated)
        return bad

    def state_dict(self) -> dict[str, float | None]:
        mean = float(self.mean_loss)
        return {"mean_loss": None if mean != mean else mean}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        mean = state.get("mean_loss")
        self.mean_loss = torch.tensor(float("nan") if mean is None else mean)
