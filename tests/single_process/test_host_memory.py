"""`reuse_freed_memory` keeps freed blocks in the process: a step's large tensors, allocated
again at the next step, no longer fault their pages in again; training sets it unless
`train.reuse_host_memory` is off."""

import json
import subprocess
import sys

import pytest

from tests.helpers import tiny_config

STEPS = 10
PAGES = 64 * 2**20 // 4096  # one 64 MiB tensor, allocated, written and freed each "step"
PROGRAM = f"""
import json, resource, sys, torch
from bigtrain.train.host_memory import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
elif sys.argv[1] == "train":  # a one-step run of the config given: its train.reuse_host_memory decides
    from bigtrain.config import from_dict
    from bigtrain.train.loop import train
    train(from_dict(json.loads(sys.argv[2])), console=False)
for _ in range(10):  # the first steps (5-7 here) grow the heap until freed blocks coalesce into one
    torch.empty(16 * 2**20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({STEPS}):
    torch.empty(16 * 2**20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, *args: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode, *args], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])  # the count is the last line printed


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    assert page_faults("default") >= STEPS * PAGES * 0.9  # glibc unmaps each freed 64 MiB block
    assert page_faults("reuse") <= 2 * PAGES  # then the same resident heap block every time (0 faults)


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_training_reuses_freed_memory_unless_switched_off(stdlib_data, tmp_path):
    def after_training(name, **switches) -> int:
        cfg = tiny_config(stdlib_data, tmp_path / name, validate=False, verify_checksums=False, steps=1, val_every=1000, **switches)
        return page_faults("train", json.dumps(cfg.to_dict()))

    assert after_training("default") <= 2 * PAGES  # on by default
    assert after_training("off", reuse_host_memory=False) >= STEPS * PAGES * 0.9
