"""The training-loss curve of one config in one precision: `--steps` steps of the local engine on
the embedded stdlib corpus as bytes (token id = byte value, so no tokenizer is trained; the
config's vocabulary and shape are kept), from a fixed seed, the batches the same for every
precision. Prints one JSON line: the per-step losses and the tokens/s after the first 10 steps.

    python tools/bench/loss_curve.py --config configs/125m.yaml --precision fp8 [--steps 200]

`bench_gpu.py` runs it per precision, each in a process of its own, and compares the curves.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.config import load_config
from bigtrain.data.corpus import write_default_corpus
from bigtrain.data.prepare import iter_documents
from bigtrain.engine.local import local_engine
from bigtrain.model import Llama
from bigtrain.train.schedule import lr_at

TIMED_FROM = 10  # steps before this one include compilation and warm-up


def byte_batches(steps: int, micro_batch: int, seq_len: int) -> torch.Tensor:
    """[steps, micro_batch, seq_len + 1] windows of the stdlib corpus's UTF-8 bytes, in order."""
    needed = steps * micro_batch * (seq_len + 1)
    with tempfile.TemporaryDirectory(prefix="bench-curve-") as tmp:
        corpus, _ = write_default_corpus(Path(tmp), val_fraction=0.0)
        data = bytearray()
        for text in iter_documents([corpus]):
            data += text.encode() + b"\n"
            if len(data) >= needed:
                break
    if len(data) < needed:
        raise SystemExit(f"the corpus has {len(data):,} bytes, fewer than the {needed:,} needed")
    tokens = torch.frombuffer(data[:needed], dtype=torch.uint8).long()
    return tokens.view(steps, micro_batch, seq_len + 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--precision", required=True, choices=["fp32", "bf16", "fp8"])
    parser.add_argument("--steps", type=int, default=200, help=f"more than {TIMED_FROM}")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    cfg = load_config(Path(args.config), [f"train.precision={args.precision}", f"train.steps={args.steps}",
                                          f"train.warmup_steps={args.steps // 10}", f"train.lr={args.lr}",
                                          f"data.seq_len={args.seq_len}", f"train.device={args.device}"])
    batches = byte_batches(args.steps, args.micro_batch, args.seq_len)
    torch.manual_seed(cfg.run.seed)
    engine = local_engine(Llama(cfg.model), cfg.train)
    losses, started = [], None
    for step in range(args.steps):
        if step == TIMED_FROM:
            sync(engine.device)
            started = time.perf_counter()
        losses.append(engine.train_step([batches[step]], lr_at(step, cfg.train)).loss)
    sync(engine.device)
    seconds = time.perf_counter() - started
    tokens_per_s = (args.steps - TIMED_FROM) * args.micro_batch * args.seq_len / seconds
    print(json.dumps({"precision": args.precision, "losses": [round(x.item(), 5) for x in losses],
                      "tokens_per_s": round(tokens_per_s)}), flush=True)


if __name__ == "__main__":
    main()
