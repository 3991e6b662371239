"""A Mixture-of-Experts step against a dense step of the same active parameters, in one process
on the same batches: 8 experts, top-2, each expert half the dense MLP's width (so a token passes
through as many feed-forward weights in both), and what the MoE layer's dispatch costs.

    python tools/bench/bench_moe.py [--d-model 256] [--layers 4] [--seq-len 256] [--batch 8] [--repeats 5]
                                    [--device cuda]   # bf16; experts as one torch._grouped_mm (bench_gpu.py runs it)

Prints one JSON line: each model's parameters (total and active), its median step time (forward,
backward, AdamW; the two models take turns), their ratio, and the MoE layers' time split into the
expert matmuls and the rest (routing, sort, gather, weighted scatter: the dispatch), from timing a
layer's forward + backward with and without the routing around the same grouped matmuls.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bigtrain.config import ModelConfig, MoEConfig, TrainConfig
from bigtrain.engine.local import local_engine
from bigtrain.model import Llama, count_params
from bigtrain.model.moe import MoE


def seconds(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    shape = {"vocab_size": 4096, "d_model": args.d_model, "n_layers": args.layers, "n_heads": 4, "n_kv_heads": 2,
             "max_seq_len": args.seq_len, "ffn_hidden": 2 * args.d_model}
    models = {
        "dense": ModelConfig(**shape),
        "moe": ModelConfig(**shape, moe=MoEConfig(experts=8, top_k=2, ffn_hidden=args.d_model)),
    }
    train = TrainConfig(device=args.device, precision="bf16" if device.type == "cuda" else "fp32", compile=False,
                        warmup_steps=0)
    engines = {name: local_engine(Llama(cfg, seed=0, device=device), train) for name, cfg in models.items()}
    batches = [torch.randint(0, 4096, (args.batch, args.seq_len + 1))]
    for engine in engines.values():
        engine.train_step(batches, 1e-4)  # warm up
    steps = {name: [] for name in engines}
    for round_ in range(args.repeats):  # alternate, so both see the same machine load
        for name in (list(engines) if round_ % 2 == 0 else list(reversed(engines))):
            steps[name].append(seconds(lambda e=engines[name]: e.train_step(batches, 1e-4)))

    moe_layers = [m for m in engines["moe"].model.modules() if isinstance(m, MoE)]
    layer = moe_layers[0]
    x = torch.randn(args.batch, args.seq_len, args.d_model, device=device, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        chosen = layer.router(x.reshape(-1, args.d_model)).topk(2).indices.flatten()
    order = chosen.argsort(stable=True)
    rows = x.detach().reshape(-1, args.d_model)[order // 2].to(dtype).requires_grad_()
    counts = torch.bincount(chosen, minlength=8)
    layer = layer.to(dtype) if device.type == "cuda" else layer
    layer_times, expert_times = [], []
    for _ in range(args.repeats * 4):  # the first quarter warms up; then alternate
        layer_times.append(seconds(lambda: layer(x).sum().backward()))
        expert_times.append(seconds(lambda: layer.experts(rows, counts).sum().backward()))
    whole = statistics.median(layer_times[args.repeats:])
    experts = statistics.median(expert_times[args.repeats:])

    record = {
        "bench": "moe_step", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "grouped_mm": device.type == "cuda", "d_model": args.d_model, "layers": args.layers, "seq_len": args.seq_len,
        "batch": args.batch, "threads": torch.get_num_threads(),
        **{f"{name}_params": count_params(cfg).total for name, cfg in models.items()},
        **{f"{name}_active_params": count_params(cfg).active for name, cfg in models.items()},
        **{f"{name}_step_s": round(statistics.median(t), 4) for name, t in steps.items()},
        "moe_vs_dense_step": round(statistics.median(steps["moe"]) / statistics.median(steps["dense"]), 3),
        "moe_layer_s": round(whole, 5), "expert_matmuls_s": round(experts, 5),
        "dispatch_share_of_moe_layer": round(1 - experts / whole, 3),
        # every MoE layer's dispatch (the layer less its expert matmuls) over the whole step
        "dispatch_share_of_step": round(len(moe_layers) * (whole - experts) / statistics.median(steps["moe"]), 3),
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
