"""Building a model's share for training: bigtrain's construction (meta device, each parameter
materialised in place on the training device from its (seed, name) stream) against building the
whole model on the host and moving it (what `Llama(cfg).to(device)` and most training scripts
do), on the same config and device, each side in a process of its own.

    python tools/bench/bench_construct.py [--models 125m 1b] [--device cuda]

Prints one JSON line per model: for each side the wall seconds, the host's peak RSS growth and
(on CUDA) the device's peak allocation during construction, next to the fp32 parameter bytes;
then a few bf16 training steps of bigtrain's engine on random tokens (the loss must be finite).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).parents[2] / "configs"


def side(name: str, model: str, device: str) -> dict:
    import torch

    from bigtrain.config import load_config
    from bigtrain.engine.memory import MemoryPeak, memory_in_use_gb, peak_rss_kib
    from bigtrain.engine.update_gate import UpdateGate
    from bigtrain.model import Llama, count_params
    from bigtrain.train.loop import build_engine

    cfg = load_config(CONFIGS / f"{model}.yaml", [f"train.device={device}", "train.precision=auto"])
    dev = torch.device(device)
    host_before, started = peak_rss_kib(), time.perf_counter()
    with MemoryPeak(dev) as peak:
        if name == "bigtrain":
            engine = build_engine(cfg, UpdateGate())
        else:
            model = Llama(cfg.model, seed=cfg.run.seed).to(dev)
    seconds = time.perf_counter() - started
    out = {"side": name, "seconds": round(seconds, 2), "host_peak_growth_gb": (peak_rss_kib() - host_before) / 2**20,
           "device_peak_gb": peak.gb if dev.type == "cuda" else None, "device_held_gb": memory_in_use_gb(dev),
           "fp32_param_gb": count_params(cfg.model).total * 4 / 2**30}
    if name == "bigtrain":
        tokens = torch.randint(0, cfg.model.vocab_size, (2, min(512, cfg.data.seq_len) + 1))
        losses = [float(engine.train_step([tokens], 1e-4).loss) for _ in range(3)]
        out["losses"] = losses
        assert all(torch.isfinite(torch.tensor(losses))), losses
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["125m", "1b"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(args.side, args.models[0], args.device)))
        return
    for model in args.models:
        sides = {}
        for name in ("bigtrain", "host-then-move"):
            proc = subprocess.run([sys.executable, __file__, "--side", name, "--models", model, "--device", args.device],
                                  capture_output=True, text=True)
            sides[name] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else \
                {"error": proc.stderr.strip().splitlines()[-1:]}
        print(json.dumps({"model": model, "device": args.device, **sides}), flush=True)


if __name__ == "__main__":
    main()
