"""One profiled training step of a config on the GPU: the CUDA kernel table (by GPU time), which
attention kernel ran, and the GEMMs that ran in fp32 (there should be none in bf16 training).

    python tools/bench/kernel_table.py --config configs/125m.yaml [train.compile=true …]

Prints the profiler's table, then one JSON line (`{"bench": "kernels", …}`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from bench_step import BigtrainSide, dotted
from common import record

from bigtrain.config import load_config
from bigtrain.model import Llama

ATTENTION = re.compile(r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)", re.IGNORECASE)
GEMM = re.compile(r"gemm|matmul|cutlass|xmma|cublas", re.IGNORECASE)
FP32_GEMM = re.compile(r"sgemm|gemm_f32|f32f32_f32f32|s1688gemm|s16816gemm|tf32|_f32_f32", re.IGNORECASE)


def classify(names: dict[str, float]) -> dict:
    """The attention kernels, the fp32 GEMMs, and the GEMM time share of kernels named `names`
    (name → GPU microseconds)."""
    total = sum(names.values()) or 1.0
    gemms = {n: t for n, t in names.items() if GEMM.search(n)}
    return {
        "attention_kernels": sorted(n for n in names if ATTENTION.search(n)),
        "fp32_gemm_kernels": sorted(n for n in gemms if FP32_GEMM.search(n)),
        "gemm_time_share": round(sum(gemms.values()) / total, 3),
        "kernel_time_ms": round(total / 1e3, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_table.py needs a CUDA GPU; none is visible")
    file_cfg = load_config(args.config)
    cfg = load_config(None, [*dotted("model", file_cfg.to_dict()["model"]), f"data.seq_len={file_cfg.data.seq_len}",
                             f"data.micro_batch={file_cfg.data.micro_batch}", "train.device=cuda", *args.overrides])
    side = BigtrainSide(cfg, Llama(cfg.model).state_dict())
    batch = [torch.randint(0, cfg.model.vocab_size, (cfg.data.micro_batch, cfg.data.seq_len + 1))]
    for _ in range(args.warmup):
        side.train_step(batch, 3e-4)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        side.train_step(batch, 3e-4)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="device_time_total", row_limit=40), flush=True)
    names = {e.key: e.device_time_total for e in events if e.device_time_total > 0}
    record("kernels", {"config": str(args.config), "overrides": args.overrides,
                       "device": torch.cuda.get_device_name(), "torch": torch.__version__, **classify(names)})


if __name__ == "__main__":
    main()
