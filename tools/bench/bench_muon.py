"""What Muon's Newton–Schulz costs a training step at a config's shape (default 125m), on CPU in fp32.

    python tools/bench/bench_muon.py [--config configs/125m.yaml] [--repeats 3] [--tokens 512]

One process, the local engine's own optimizers over the same model and gradients: torch's fused
AdamW (`train.optimizer=adamw`) and Muon (`train.optimizer=muon`), their `step()` timed in turns
(order alternating, median of `--repeats`, wall and CPU time). Newton–Schulz does not depend on the
batch, so the step-time ratio is given against a forward + backward of the config's own batch
(`data.micro_batch × data.seq_len` tokens), scaled linearly from one measured on `--tokens`
tokens (windows of at most `--tokens`: attention's extra cost at longer windows is left out, an
underestimate that makes the ratio lean against Muon).
"""

from __future__ import annotations

import argparse
import time
from statistics import median

import torch
from common import load_average, record

from bigtrain.config import load_config
from bigtrain.engine.optimizer import build_optimizer
from bigtrain.model import Llama, count_params


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/125m.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=512, help="tokens of the measured forward + backward")
    args = parser.parse_args()
    cfg = load_config(args.config, ["train.device=cpu", "train.precision=fp32"])
    torch.manual_seed(0)
    model = Llama(cfg.model, seed=0)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in model.parameters()]

    seq = min(cfg.data.seq_len, args.tokens)
    tokens = torch.randint(cfg.model.vocab_size, (max(1, args.tokens // seq), seq + 1), generator=gen)

    def forward_backward():
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        model.zero_grad(set_to_none=True)

    forward_backward()  # warm-up
    fb = timed(forward_backward)
    optimizers = {}
    for name in ("adamw", "muon"):
        cfg.train.optimizer = name
        optimizers[name] = build_optimizer(model, cfg.train)

    def step(name):
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = g
        optimizers[name].step()

    times: dict[str, list[tuple[float, float]]] = {"adamw": [], "muon": []}
    for name in optimizers:  # warm-up: state allocated
        step(name)
    for r in range(args.repeats):
        for name in (("adamw", "muon") if r % 2 == 0 else ("muon", "adamw")):
            times[name].append(timed(lambda name=name: step(name)))
    wall = {k: median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: median(t[1] for t in v) for k, v in times.items()}
    batch_tokens = cfg.data.micro_batch * cfg.data.seq_len
    fb_batch = fb[0] * batch_tokens / tokens[:, :-1].numel()
    fb_batch_cpu = fb[1] * batch_tokens / tokens[:, :-1].numel()
    record("muon_step", {
        "config": args.config, "params": count_params(cfg.model).total, "threads": torch.get_num_threads(),
        "optimizer_step_s": {k: round(v, 3) for k, v in wall.items()},
        "optimizer_step_cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "muon_vs_adamw_optimizer_step": round(wall["muon"] / wall["adamw"], 1),
        "muon_vs_adamw_optimizer_step_cpu": round(cpu["muon"] / cpu["adamw"], 1),
        "forward_backward_s_measured": round(fb[0], 2), "forward_backward_cpu_s_measured": round(fb[1], 2),
        "measured_tokens": tokens[:, :-1].numel(), "batch_tokens": batch_tokens,
        "forward_backward_s_batch_estimate": round(fb_batch, 1),
        "forward_backward_cpu_s_batch_estimate": round(fb_batch_cpu, 1),
        "step_time_ratio_muon_vs_adamw": round((fb_batch + wall["muon"]) / (fb_batch + wall["adamw"]), 3),
        "step_cpu_time_ratio_muon_vs_adamw": round((fb_batch_cpu + cpu["muon"]) / (fb_batch_cpu + cpu["adamw"]), 3),
        "load_average": load_average(),
    })


if __name__ == "__main__":
    main()
