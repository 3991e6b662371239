"""Which optimiser updates to skip: a non-finite gradient norm or loss, or a spike.

A spike is a loss or gradient norm above mean + sigma × std of a rolling window of the last
accepted steps (OLMo-core's `SkipStepOptimizer` rule). The window is a fixed-size ring buffer on
the device and every decision is a device tensor, so nothing waits for the host: the local engine
on CUDA hands it to fused AdamW as `found_inf` (the kernel then leaves weights, moments and step
count alone); on CPU reading it costs nothing. Under DeepSpeed the host reads it once per step,
where DeepSpeed itself already syncs on the gradient norm (ZeRO skips a non-finite norm on its own).
Every rank sees the same loss (averaged over data-parallel ranks first) and the same global
gradient norm, so every rank keeps the same window and takes the same decision.
"""

from __future__ import annotations

from typing import Any

import torch

SIGNALS = ("loss", "grad_norm")  # the window's rows


def min_values(window: int) -> int:
    """Accepted steps the window needs before it judges (OLMo-core: half the window, at least 2)."""
    return max(2, window // 2)


class UpdateGate:
    """Skip an update whose gradient norm or loss is not finite or, with `window` > 0, spikes:
    exceeds mean + `sigma` × std (unbiased) of the last `window` accepted values of that signal,
    once `min_values(window)` steps were accepted. Skipped steps do not enter the window."""

    def __init__(self, window: int = 0, sigma: float = 6.0, signals: tuple[str, ...] = SIGNALS):
        self.window, self.sigma, self.signals = window, sigma, signals
        self.values = torch.zeros(len(SIGNALS), window)  # accepted losses (row 0) and gradient norms (row 1)
        self.count = torch.zeros((), dtype=torch.long)  # accepted values so far; slot count % window is next
        self.spiked = torch.zeros((), dtype=torch.bool)  # whether the latest decision was a spike

    @classmethod
    def from_config(cls, train: Any, pipelined: bool = False) -> UpdateGate:
        """The gate `train.spike_*` asks for; the pipeline engine knows no loss before its update,
        so `spike_signals=auto` watches the gradient norm alone there."""
        signals = {"auto": ("grad_norm",) if pipelined else SIGNALS, "both": SIGNALS}.get(
            train.spike_signals, (train.spike_signals,))
        return cls(train.spike_window, train.spike_sigma, signals)

    @property
    def watches_loss(self) -> bool:
        """Whether a decision needs the step's loss (averaged over data-parallel ranks) before the update."""
        return bool(self.window) and "loss" in self.signals

    def skip(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | float) -> torch.Tensor:
        """True (a 0-dim bool tensor) when this step's update must not be applied."""
        norm = torch.as_tensor(grad_norm, dtype=torch.float32)
        bad = ~torch.isfinite(norm)
        if loss is not None:
            loss = loss.detach().float().to(norm.device)
            bad = bad | ~torch.isfinite(loss)
        if not self.window:
            return bad
        current = torch.stack([loss if loss is not None else torch.full_like(norm, float("nan")), norm])
        spike = self._spike(current) & ~bad
        accept = ~(bad | spike)
        slot = torch.arange(self.window, device=norm.device) == self.count.to(norm.device) % self.window
        self.values = torch.where(slot & accept, current[:, None], self.values.to(norm.device))
        self.count = self.count.to(norm.device) + accept.long()
        self.spiked = spike
        return bad | spike

    def _spike(self, current: torch.Tensor) -> torch.Tensor:
        """Whether a watched signal of `current` ([loss, norm]) is above its window's threshold."""
        device = current.device
        count = self.count.to(device)
        filled = (torch.arange(self.window, device=device) < count).float()  # a full window: all slots
        n = filled.sum()
        values = self.values.to(device)
        mean = (values * filled).sum(1) / n.clamp(min=1)
        std = ((((values - mean[:, None]) * filled) ** 2).sum(1) / (n - 1).clamp(min=1)).sqrt()
        above = current > mean + self.sigma * std  # a NaN (no loss) is never above
        spike = torch.zeros((), dtype=torch.bool, device=device)  # no host-to-device copy: nothing to wait for
        for i, name in enumerate(SIGNALS):
            if name in self.signals:
                spike = spike | above[i]
        return spike & (count >= min_values(self.window))

    def state_dict(self) -> dict[str, Any]:
        """The window as plain floats (float32 values round-trip exactly through JSON; a loss the
        pipeline engine never sees is null)."""
        if not self.window:
            return {}
        values = [[None if v != v else v for v in row] for row in self.values.cpu().tolist()]
        return {"spike_window": {"count": int(self.count), "values": values}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("spike_window")
        if not self.window:
            return
        if saved is None or len(saved["values"][0]) != self.window:  # none yet, or another length: start over
            self.values, self.count = torch.zeros(len(SIGNALS), self.window), torch.zeros((), dtype=torch.long)
            return
        self.values = torch.tensor([[float("nan") if v is None else v for v in row] for row in saved["values"]],
                                   dtype=torch.float32)
        self.count = torch.tensor(saved["count"], dtype=torch.long)
