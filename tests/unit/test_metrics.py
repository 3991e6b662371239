"""FLOPs per token, MFU and the peak table against hand computations; the phase timer."""

import time

import pytest
import torch

from bigtrain.config import ModelConfig
from bigtrain.distributed.timing import PhaseTimer
from bigtrain.model import count_params, flops_per_token
from bigtrain.train import metrics
from bigtrain.train.metrics import SpeedMeter, mfu, peak_flops

# d=16, 2 layers, 4 heads of 4, 2 kv heads, ffn 32, vocab 100
SHAPE = {"vocab_size": 100, "d_model": 16, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 32,
         "max_seq_len": 8}


def test_flops_per_token_by_hand():
    # per block: q, o 16·16 each; k, v 16·(2·4) each; SwiGLU 3·16·32 → 256+256+128+128+1536 = 2304
    # matmul weights: 2 blocks · 2304 + LM head 100·16 = 6208 (the embedding lookup is no matmul)
    # 6·6208 + 12·n_layers·d_model·seq_len = 37,248 + 12·2·16·8 = 37,248 + 3,072 = 40,320
    assert flops_per_token(ModelConfig(**SHAPE), seq_len=8) == 40_320
    # tying shares the weights, not the work: the head matmul still costs the same
    tied = ModelConfig(**SHAPE, tie_embeddings=True)
    assert flops_per_token(tied, seq_len=8) == 40_320
    assert count_params(tied).total == count_params(ModelConfig(**SHAPE)).total - 1600


def test_mfu_by_hand():
    # 1,000 tokens/s × 40,320 FLOPs = 4.032e7 FLOP/s over 2 devices of 1 TFLOP/s
    assert mfu(1000.0, 40_320, 2, 1e12) == pytest.approx(2.016e-5)
    assert mfu(1000.0, 40_320, 2, None) is None
    meter = SpeedMeter(tokens_per_step=4096, flops_per_token=40_320, devices=2, peak_per_device=1e12)
    fields = meter.measure(steps=4, seconds=2.0, phases={"forward": 0.8, "data": 0.2})
    assert fields["step_time_s"] == 0.5
    assert fields["tokens_per_s"] == 8192 and fields["tokens_per_s_per_device"] == 4096
    assert fields["mfu"] == pytest.approx(8192 * 40_320 / 2e12)
    assert fields["time_forward_s"] == pytest.approx(0.2) and fields["time_data_s"] == pytest.approx(0.05)


def test_peak_table_and_override(monkeypatch):
    assert peak_flops(torch.device("cpu"), None) is None
    assert peak_flops(torch.device("cpu"), 123.0) == 123e12
    for name, tflops in [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835),
                         ("NVIDIA H800 PCIe", 756), ("NVIDIA H800", 989),
                         ("NVIDIA A100-SXM4-80GB", 312), ("Tesla V100-SXM2-32GB", 125), ("Some New GPU", None)]:
        monkeypatch.setattr(metrics.torch.cuda, "get_device_name", lambda device, n=name: n)
        expected = tflops * 1e12 if tflops else None
        assert peak_flops(torch.device("cuda", 0), None) == expected, name
        assert peak_flops(torch.device("cuda", 0), 500.0) == 500e12  # the override always wins


def test_phase_timer_accumulates_and_resets():
    timer = PhaseTimer(torch.device("cpu"))
    for _ in range(2):
        with timer.phase("forward"):
            time.sleep(0.02)
    times = timer.read()
    assert times.keys() == {"forward"} and times["forward"] >= 0.04  # both sleeps, however slow the machine
    assert timer.read() == {}


def test_console_lines(capsys):
    from bigtrain.train.sinks.console import ConsoleSink

    sink = ConsoleSink(total_steps=100, start_step=0)  # not a terminal under pytest: plain lines
    sink.log({"step": 10, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 12_345.0, "mfu": 0.4123,
              "step_time_s": 0.25, "peak_mem_gb": 1.5, "loss_scale": 65536.0, "skipped_steps": 2})
    sink.log({"step": 11, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1e3, "step_time_s": 0.25,
              "peak_mem_gb": 1.5, "moe/aux_loss": 1.0312, "moe/max_load": 1.456, "moe/dropped_frac": 0.0})
    sink.log({"step": 10, "val_loss": 2.25, "val_perplexity": 9.4877})
    sink.log({"step": 10, "checkpoint": "step-0000010", "checkpoint_stall_s": 1.25, "checkpoint_write_s": 1.25,
              "checkpoint_gb": 0.5})
    sink.log({"step": 12, "checkpoint": "step-0000010", "checkpoint_stall_s": 0.125, "checkpoint_write_s": 1.5,
              "checkpoint_gb": 0.5})
    sink.close()
    train, moe, val, saved, saved_async = capsys.readouterr().out.splitlines()
    assert train.startswith("step     10 | loss 2.5000 | lr 1.00e-03 | gnorm 0.500 | 12.3k tok/s | mfu 41.2% | "
                            "250 ms/step | mem 1.50 GB | scale 65536 | skipped 2 | eta ")
    assert moe.startswith("step     11 | loss 2.5000 | moe aux 1.031 max_load 1.46 | lr 1.00e-03 | ")
    assert val == "step     10 | val_loss 2.2500 | val_ppl 9.49"
    assert saved == "step     10 | saved step-0000010 (0.500 GB in 1.2 s)"
    assert saved_async == "step     12 | saved step-0000010 (0.500 GB in 1.5 s, loop waited 0.12 s)"
