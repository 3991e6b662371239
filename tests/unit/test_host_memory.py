"""`reuse_freed_memory` keeps freed blocks in the process: a step's large tensors, allocated
again at the next step, no longer fault their pages in again."""

import subprocess
import sys

import pytest

from bigtrain.config import TrainConfig

STEPS = 10
PAGES = 64 * 2**20 // 4096  # one 64 MiB tensor, allocated, written and freed each "step"
PROGRAM = f"""
import resource, sys, torch
from bigtrain.train.host_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
for _ in range(10):  # the first steps (5-7 here) grow the heap until freed blocks coalesce into one
    torch.empty(16 * 2**20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({STEPS}):
    torch.empty(16 * 2**20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    assert page_faults("default") >= STEPS * PAGES * 0.9  # glibc unmaps each freed 64 MiB block
    assert page_faults("reuse") <= 2 * PAGES  # then the same resident heap block every time (0 faults)


def test_on_by_default():
    assert TrainConfig().reuse_host_memory
