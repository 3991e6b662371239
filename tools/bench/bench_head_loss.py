"""The head + loss (`linear_cross_entropy`, forward + backward) on the CPU: CPU time and the bytes
its operators read and write, split into matmuls (by dtype) and the element-wise work around them.

    python tools/bench/bench_head_loss.py [--tokens 4096 --d-model 512 --vocab 32000]
    python tools/bench/bench_head_loss.py --trees /path/to/old/checkout .   # before vs after

Modes: fp32; bf16 autocast (the local engine's bf16, which on a GPU is where the fp32 weight-
gradient matmul cost 15-30 % of the step); each eager and with `compiled=True` where the tree's
`linear_cross_entropy` takes it. Bytes are counted per aten operator (inputs read + outputs
written, views excluded) with a dispatch mode, in a pass of their own, for the eager modes only (a
dispatch mode runs compiled code eagerly); the time is the median of
`--repeats` passes in CPU time of the process. With `--trees`, each tree's code runs in a process of
its own (its path first on `sys.path`), the trees taking turns, and one JSON line compares them.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import median

MATMULS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")


def measure(tokens: int, d_model: int, vocab: int, repeats: int) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from bigtrain.model.loss import linear_cross_entropy

    class Bytes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_kind: dict[str, int] = defaultdict(int)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if torch.Tag.view_copy in func.tags or func._schema.name in ("aten::view", "aten::t", "aten::slice",
                                                                         "aten::unsqueeze", "aten::squeeze",
                                                                         "aten::alias", "aten::detach", "aten::expand",
                                                                         "aten::select", "aten::transpose"):
                return out
            flat = [*args, *(kwargs or {}).values(), *(out if isinstance(out, (tuple, list)) else [out])]
            moved = sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            name = str(func.overloadpacket)
            if name.startswith(MATMULS):
                dtypes = {str(t.dtype).removeprefix("torch.") for t in args[-2:] if isinstance(t, torch.Tensor)}
                self.by_kind[f"matmul_{'/'.join(sorted(dtypes))}"] += moved
            else:
                self.by_kind["elementwise"] += moved
            return out

    torch.manual_seed(0)
    hidden = torch.randn(tokens, d_model, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, d_model)).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,))
    takes_compiled = "compiled" in inspect.signature(linear_cross_entropy).parameters
    results = {}
    for mode in ("fp32", "bf16", "fp32+compile", "bf16+compile"):
        if mode.endswith("compile") and not takes_compiled:
            continue
        kwargs = {"compiled": True} if mode.endswith("compile") else {}
        bf16 = mode.startswith("bf16")

        def step(bf16: bool = bf16, kwargs: dict = kwargs):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = linear_cross_entropy(hidden, weight, targets, **kwargs)
            grads = torch.autograd.grad(loss, (hidden, weight))
            return loss, grads

        loss, grads = step()  # warm-up (and compilation)
        cpu = []
        for _ in range(repeats):
            start = time.process_time()
            step()
            cpu.append(time.process_time() - start)
        results[mode] = {"cpu_s": round(median(cpu), 4), "loss": round(loss.item(), 6),
                         "grad_weight_norm": round(float(grads[1].norm()), 6)}
        if not kwargs:  # (a dispatch mode would run compiled code eagerly: its bytes are not counted)
            with Bytes() as counted:
                step()
            results[mode]["mib"] = {k: round(v / 2**20, 1) for k, v in sorted(counted.by_kind.items())}
            results[mode]["total_mib"] = round(sum(counted.by_kind.values()) / 2**20, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="with --trees: turns of each tree")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trees", nargs="+", type=Path, help="checkouts to compare, each in its own process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = {"tokens": args.tokens, "d_model": args.d_model, "vocab": args.vocab}
    if not args.trees or args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps({"bench": "head_loss", **shape, "threads": args.threads,
                          "modes": measure(args.tokens, args.d_model, args.vocab, args.repeats)}))
        return
    runs: dict[str, list[dict]] = defaultdict(list)
    for r in range(args.rounds):
        for tree in args.trees if r % 2 == 0 else list(reversed(args.trees)):
            env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": str(args.threads)}
            cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--d-model", str(args.d_model),
                   "--vocab", str(args.vocab), "--repeats", str(args.repeats), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs[str(tree)].append(json.loads(done.stdout.strip().splitlines()[-1])["modes"])
    trees = {}
    for tree, rounds in runs.items():
        modes = {}
        for mode in rounds[0]:
            modes[mode] = {**rounds[0][mode], "cpu_s": round(median(r[mode]["cpu_s"] for r in rounds), 4)}
        trees[tree] = modes
    print(json.dumps({"bench": "head_loss", **shape, "threads": args.threads, "trees": trees}))


if __name__ == "__main__":
    main()
