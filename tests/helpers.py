"""Small shared builders for tests."""

import os
import subprocess
import sys

from bigtrain.config import ModelConfig

CPU_RANKS_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# for peak-RSS measurements: every large block mmap'd and returned at free, so the peak RSS of a
# process is the peak of its live tensors (glibc's dynamic threshold would keep freed ones mapped)
PEAK_ENV = {**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` of `args` on `nproc` CPU (gloo) ranks, which must all succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=CPU_RANKS_ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def poisoned(build_engine, steps, factor=float("nan")):
    """`build_engine` whose model's logits are scaled by `factor` in the given (1-based) training steps."""
    calls = 0

    def build_poisoned(*args, **kwargs):
        engine = build_engine(*args, **kwargs)

        def hook(module, args, output):
            nonlocal calls
            if module.training:
                calls += 1
                return output * factor if calls in steps else output
            return output

        engine.model.register_forward_hook(hook)
        return engine

    return build_poisoned


def small_model_config(**overrides) -> ModelConfig:
    """A 2-layer model with grouped-query attention that runs in milliseconds."""
    shape = {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16}
    return ModelConfig(**{**shape, **overrides})
