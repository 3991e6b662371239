"""The step benchmark runs as documented and its sides really are the same model: bigtrain's local
and DeepSpeed engines and HF `LlamaForCausalLM` get the same first loss from the same weights."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import yaml

BENCH = Path(__file__).parents[2] / "tools" / "bench" / "bench_step.py"


def test_step_benchmark_sides_agree(tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"model": {"vocab_size": 97, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                                "n_kv_heads": 2, "max_seq_len": 16},
                                      "data": {"seq_len": 16, "micro_batch": 2}}))
    cmd = [sys.executable, str(BENCH), "--config", str(config), "--steps", "1", "--repeats", "2", "--warmup", "1", "--threads", "1",
           "--sides", "hf", "bigtrain", "deepspeed,train.adamw_impl=foreach"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    record = json.loads(next(line for line in out.splitlines() if line.startswith('{"bench"')))
    sides = record["sides"]
    assert list(sides) == ["hf", "bigtrain", "deepspeed,train.adamw_impl=foreach"]
    assert record["params"] == 97 * 32 * 2 + 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 256 + 2 * 32) + 32
    losses = [side["first_loss"] for side in sides.values()]
    assert losses[0] == losses[1] == losses[2]
    assert abs(losses[0] - math.log(97)) < 0.1  # near-uniform at initialisation
    assert sides["hf"]["vs_hf_per_s"] == 1.0
    for side in sides.values():
        assert len(side["rounds"]) == 2 and side["tokens_per_s"] > 0 and side["tokens_per_cpu_s"] > 0


def test_loss_curve_learns_the_byte_corpus(tmp_path):
    """`loss_curve.py`, which bench_gpu.py runs per precision on a GPU, here in fp32 on the CPU."""
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({"model": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4,
                                                "n_kv_heads": 2, "max_seq_len": 32}}))
    cmd = [sys.executable, str(BENCH.parent / "loss_curve.py"), "--config", str(config), "--precision", "fp32",
           "--steps", "30", "--micro-batch", "4", "--seq-len", "32", "--lr", "3e-3", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=True).stdout
    record = json.loads(out.strip().splitlines()[-1])
    assert record["precision"] == "fp32" and len(record["losses"]) == 30 and record["tokens_per_s"] > 0
    assert abs(record["losses"][0] - math.log(256)) < 0.2
    assert record["losses"][-1] < record["losses"][0] - 1.0  # bytes of Python source are learnable
