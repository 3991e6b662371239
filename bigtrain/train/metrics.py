"""What a logged step measures: throughput, MFU, the step-time split, memory, fp16 state.

MFU (model FLOPs utilisation) = tokens/s × FLOPs/token ÷ (devices × peak FLOP/s per device),
with FLOPs/token from `bigtrain.model.flops.flops_per_token` (6·N_matmul + 12·L·d·seq) and the
peak from `PEAK_TFLOPS` or `log.peak_tflops`. Records go to the sinks in `bigtrain.train.sinks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Dense bf16 tensor-core peaks in TFLOP/s (fp16 for V100), matched as substrings of
# torch.cuda.get_device_name(), first match wins: the PCIe/NVL variants come before their SXM names.
# MFU divides by these also under train.precision=fp8 (whose tensor-core peak is twice as high).
PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H800 PCIe": 756.0, "GH200": 989.0, "H200": 989.0,
    "H100": 989.0, "H800": 989.0,
    "B200": 2250.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0,
}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of one device for MFU; None when unknown (CPUs, unlisted GPUs) and not given."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def mfu(tokens_per_s: float, flops_per_token: float, devices: int, peak_per_device: float | None) -> float | None:
    """Achieved model FLOP/s over the peak of all devices; None without a known peak."""
    if not peak_per_device:
        return None
    return tokens_per_s * flops_per_token / (devices * peak_per_device)


@dataclass(frozen=True)
class SpeedMeter:
    """Turns a logging window (steps, wall seconds, per-phase seconds) into record fields."""

    tokens_per_step: int  # global: every data-parallel rank's windows × seq_len
    flops_per_token: float
    devices: int  # world size: dp × tp × pp
    peak_per_device: float | None

    def measure(self, steps: int, seconds: float, phases: dict[str, float],
                flops_per_token: float | None = None) -> dict[str, Any]:
        """`flops_per_token`: the window's mean when it differs from the meter's (shorter windows
        of a sequence-length warmup have less attention work per token)."""
        step_time = seconds / steps
        tokens_per_s = self.tokens_per_step / step_time
        return {
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.devices,
            "mfu": mfu(tokens_per_s, flops_per_token or self.flops_per_token, self.devices, self.peak_per_device),
            "step_time_s": step_time,
            **{f"time_{phase}_s": total / steps for phase, total in sorted(phases.items())},
        }


def directory_size(path: Path) -> int:
    """Bytes of all files under `path` (a checkpoint)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
