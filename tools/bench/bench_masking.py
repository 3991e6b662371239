"""What document masking costs a training step: the same model and windows with and without
`data.document_masking` (local engine, turns alternating, median step time), on windows cut into
documents of a given mean length.

    python tools/bench/bench_masking.py [--seq-len 2048] [--doc-len 256] [--d-model 256] [--layers 4]
                                        [--batch 2] [--repeats 5] [--device cuda]

On the CPU the masked side runs SDPA with the block-diagonal mask, on CUDA FlexAttention with a
document BlockMask against the plain causal kernel (bf16; `bench_gpu.py` runs that side). Prints
one JSON line with both step times and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bigtrain.config import ModelConfig, TrainConfig
from bigtrain.engine.local import local_engine
from bigtrain.model import Llama
from bigtrain.model.llama import DocumentMasking

EOS = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("seq-len", 2048), ("doc-len", 256), ("d-model", 256), ("layers", 4), ("batch", 2),
                          ("repeats", 5)):
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    cfg = ModelConfig(vocab_size=4096, d_model=args.d_model, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                      max_seq_len=args.seq_len)
    train = TrainConfig(device=args.device, precision="bf16" if args.device == "cuda" else "fp32", compile=False,
                        warmup_steps=0)
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(2, 4096, (args.batch, args.seq_len + 1), generator=generator)
    ends = torch.rand(windows.shape, generator=generator) < 1 / args.doc_len  # documents of mean length doc-len
    windows[ends] = EOS
    engines = {"causal": local_engine(Llama(cfg, seed=0), train), "masked": local_engine(Llama(cfg, seed=0), train)}
    engines["masked"].documents = DocumentMasking(EOS)
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(args.repeats + 1):  # the first round warms up
        for name in (list(engines) if round_ % 2 == 0 else list(reversed(engines))):
            if args.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            float(engines[name].train_step([windows], 1e-4).loss)
            if round_:
                times[name].append(time.perf_counter() - started)
    step = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({"bench": "document_masking", "device": args.device, "seq_len": args.seq_len,
                      "mean_doc_len": args.doc_len, "documents_per_window": float(ends[:, :-1].sum(1).float().mean()) + 1,
                      "d_model": args.d_model, "layers": args.layers, "batch": args.batch,
                      **{f"{name}_step_s": round(s, 4) for name, s in step.items()},
                      "masked_vs_causal": round(step["masked"] / step["causal"], 3)}))


if __name__ == "__main__":
    main()
