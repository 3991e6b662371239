"""A run with a sequence-length warmup: windows grow as scheduled at constant tokens per step, MFU
counts each length's FLOPs, and a resumed run continues the curve bit for bit."""

import json

import pytest

from bigtrain.config import SeqLenWarmupConfig
from bigtrain.model import flops_per_token
from bigtrain.train.loop import train
from tests.helpers import tiny_config

PEAK_TFLOPS = 1.0


def run(data, run_dir, steps: int, **overrides):
    cfg = tiny_config(data, run_dir, validate=False, steps=steps, warmup_steps=1)
    cfg.data.seq_len_warmup = SeqLenWarmupConfig(start=16, steps=4)
    cfg.log.every, cfg.checkpoint.every, cfg.log.peak_tflops = 1, 3, PEAK_TFLOPS
    for key, value in overrides.items():
        setattr(cfg.run, key, value)
    train(cfg, console=False)
    return cfg, [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_windows_grow_at_constant_tokens_and_resume_exactly(stdlib_data, tmp_path):
    cfg, records = run(stdlib_data, tmp_path / "straight", steps=6)
    assert [r["seq_len"] for r in records] == [16, 16, 32, 32, 64, 64]  # ramp 16 → 64 over 4 steps
    assert [r["tokens"] for r in records] == [8 * 64 * (i + 1) for i in range(6)]
    for r in records:
        expected = r["tokens_per_s"] * flops_per_token(cfg.model, r["seq_len"]) / (PEAK_TFLOPS * 1e12)
        assert r["mfu"] == pytest.approx(expected, rel=1e-9)
    checkpoint = tmp_path / "straight" / "checkpoints" / "step-0000003"
    _, resumed = run(stdlib_data, tmp_path / "resumed", steps=6, resume=str(checkpoint))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in records[3:]]  # bitwise
    assert [r["seq_len"] for r in resumed] == [32, 64, 64]


def test_compiled_blocks_compile_once_per_length(stdlib_data, tmp_path):
    """16 → 32 → 64 tokens: the blocks' one compiled forward is compiled three times, no more, and
    the loss chunk's body once (its token dimension is dynamic)."""
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    cfg = tiny_config(stdlib_data, tmp_path, validate=False, steps=7, warmup_steps=1, compile=True)
    cfg.data.seq_len_warmup = SeqLenWarmupConfig(start=16, steps=4)
    train(cfg, console=False)
    assert counters["frames"]["total"] == counters["frames"]["ok"] == 3 + 1
    assert counters["stats"]["unique_graphs"] == 3 + 1
