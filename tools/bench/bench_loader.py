"""Loader windows/s vs mosaicml-streaming's `StreamingDataset` over the same windows, and the
loader's tokens/s against what the 125m model consumes per H100 at 50 % MFU, in one run.

    python tools/bench/bench_loader.py --mb 64 --seq-len 2048 --micro-batch 16

Both sides produce shuffled [micro_batch, seq_len + 1] int64 torch batches from warm files: ours
from the Arrow shards (memory-mapped), streaming from the MDS conversion of the same windows,
read in place (no remote, no copy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import corpus_arguments, corpus_workspace, measure, record
from streaming import StreamingDataset

from bigtrain.config import load_config
from bigtrain.data.loader import PackedTokens, WindowLoader
from bigtrain.data.mds import StreamingWindowLoader, write_mds
from bigtrain.model.flops import flops_per_token
from bigtrain.train.metrics import PEAK_TFLOPS

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _warm(directory: Path) -> None:
    for f in directory.rglob("*"):
        if f.is_file():
            f.read_bytes()


def time_ours(arrow: Path, seq_len: int, micro_batch: int, steps: int) -> float:
    loader = WindowLoader(PackedTokens(arrow, seq_len), micro_batch, seed=0)
    loader.next_step()
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    return steps * micro_batch / (time.perf_counter() - start)


def time_streaming(mds: Path, micro_batch: int, steps: int) -> float:
    dataset = StreamingDataset(local=str(mds), batch_size=micro_batch, shuffle=True, shuffle_seed=0)
    samples = iter(dataset)
    next(samples)
    start = time.perf_counter()
    for _ in range(steps):
        rows = [next(samples)["tokens"] for _ in range(micro_batch)]
        torch.from_numpy(np.stack(rows).astype(np.int64))
    return steps * micro_batch / (time.perf_counter() - start)


def time_our_streaming_backend(mds: Path, seq_len: int, micro_batch: int, steps: int) -> float:
    loader = StreamingWindowLoader(None, mds, seq_len, micro_batch, seed=0)
    loader.next_step()
    start = time.perf_counter()
    for _ in range(steps):
        loader.next_step()
    return steps * micro_batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    corpus_arguments(parser, megabytes=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=16)
    args = parser.parse_args()

    with corpus_workspace(args, "loader") as (root, corpus, tokenizer):
        measure([sys.executable, "-m", "bigtrain", "prepare", "--input", str(corpus),
                 "--tokenizer", str(tokenizer), "--out", str(root / "arrow")])
        write_mds(root / "arrow", root / "mds", args.seq_len)
        _warm(root)
        windows = len(PackedTokens(root / "arrow", args.seq_len))
        steps = windows // args.micro_batch - 2  # about one epoch, the same windows on both sides
        ours = time_ours(root / "arrow", args.seq_len, args.micro_batch, steps)
        streaming = time_streaming(root / "mds", args.micro_batch, steps)
        backend = time_our_streaming_backend(root / "mds", args.seq_len, args.micro_batch, steps)

    model = load_config(CONFIGS / "125m.yaml").model
    need = 0.5 * PEAK_TFLOPS["H100"] * 1e12 / flops_per_token(model, args.seq_len)
    record("loader", {
        "windows": windows,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "bigtrain_windows_per_s": round(ours),
        "streaming_windows_per_s": round(streaming),
        "bigtrain_streaming_backend_windows_per_s": round(backend),
        "speedup": round(ours / streaming, 2),
        "bigtrain_tokens_per_s": round(ours * args.seq_len),
        "flops_per_token_125m": round(flops_per_token(model, args.seq_len)),
        "h100_125m_tokens_per_s_at_50pct_mfu": round(need),
        "headroom": round(ours * args.seq_len / need, 1),
    })


if __name__ == "__main__":
    main()
