"""Keep freed host memory in the process for the next step.

glibc's malloc serves every block above its mmap threshold (activations, logits, gradients,
ZeRO's flat buffers: megabytes each) with a fresh `mmap` and unmaps it when freed, so each
training step faults the same memory in again, page by page, zero-filled by the kernel: on CPU
that is 5-10 % of a step in system time. Raising the mmap and trim thresholds makes freed blocks
stay in the heap and be reused, as tcmalloc or jemalloc would.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap; up to 1 GiB of free heap is kept


def reuse_freed_memory() -> bool:
    """Set glibc's thresholds (a process-wide setting, for allocations from now on); False, and
    nothing changed, where the C library is not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
