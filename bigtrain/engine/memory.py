"""How much memory this process holds, and the most it held: the CUDA allocator's figures on a
GPU, the resident set (Linux `/proc/self/status`) on the CPU."""

from __future__ import annotations

import resource

import torch


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def peak_rss_kib() -> int:
    """This process's peak resident memory (KiB): Linux's VmHWM of its own address space, as
    `ru_maxrss` would also count a parent's memory carried over by fork + exec."""
    peak = _status_kib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def peak_memory_gb(device: torch.device) -> float:
    """Peak CUDA allocator memory, or the process's peak RSS on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_kib() / 2**20


def memory_in_use_gb(device: torch.device) -> float:
    """CUDA allocator memory in use, or the process's resident memory on CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return (_status_kib("VmRSS") or peak_rss_kib()) / 2**20


class MemoryPeak:
    """`with MemoryPeak(device) as peak: …` then `peak.gb`: the most memory held at once inside
    the block beyond what was held when it began (on Linux the CPU peak is reset on entry, through
    `/proc/self/clear_refs`; where it cannot be, the process's peak so far stands in)."""

    def __init__(self, device: torch.device):
        self.device, self.gb = device, 0.0

    def __enter__(self) -> MemoryPeak:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as refs:
                    refs.write("5")  # resets VmHWM to the current resident set
            except OSError:
                pass
        self.before = memory_in_use_gb(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self.gb = max(0.0, peak_memory_gb(self.device) - self.before)
