"""Metric sinks: `metrics.jsonl` in the run directory and a live progress line on the console."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16/fp16 tensor-core peaks in TFLOP/s, matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak FLOP/s of the device for MFU; None when unknown (CPUs, unlisted GPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA allocator memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Appends one JSON object per record to `metrics.jsonl` and shows progress on the console."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, console: bool = True):
        self.file = open(run_dir / "metrics.jsonl", "a")
        self.total_steps, self.start_step = total_steps, start_step
        self.console = console
        self.tty = sys.stdout.isatty()
        self.started = time.perf_counter()

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.console:
            self._print(record)

    def _print(self, r: dict[str, Any]) -> None:
        if "val_loss" in r:
            line = f"step {r['step']:>6} | val_loss {r['val_loss']:.4f} | val_ppl {r['val_perplexity']:.2f}"
            print(("\r\033[K" if self.tty else "") + line, flush=True)
            return
        done = r["step"] - self.start_step
        eta = (time.perf_counter() - self.started) / max(done, 1) * (self.total_steps - r["step"])
        parts = [
            f"step {r['step']:>6}/{self.total_steps}",
            f"loss {r['loss']:.4f}",
            f"lr {r['lr']:.2e}",
            f"{r['tokens_per_s'] / 1e3:.1f}k tok/s",
        ]
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        parts.append(f"eta {_duration(eta)}")
        line = " | ".join(parts)
        if self.tty:
            print("\r\033[K" + line, end="", flush=True)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.console and self.tty:
            print()
        self.file.close()


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
