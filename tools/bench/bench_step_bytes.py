"""Bytes a local-engine bf16 step moves outside its matmuls, counted per aten operator on the CPU
(same operators as on a GPU, eager), in both bf16 modes: autocast over fp32 weights (the default)
and bf16 parameters with fp32 master weights (`train.master_weights`).

    python tools/bench/bench_step_bytes.py [--size 10m] [--grad-accum 1 4]

Each operator's bytes are its tensor inputs read plus its outputs written (views excluded), in
classes: the weights' bf16 copies (fp32 → bf16 `_to_copy` of a parameter), the gradients' casts
to fp32 (bf16 → fp32 `_to_copy` of a weight-shaped tensor), gradient accumulation in fp32
(`add_`/`add` of a weight-shaped fp32 tensor and a weight-shaped one), the matmuls, the optimizer
(norm, clipping, fused AdamW, the masters' copy into the bf16 parameters) and the rest of the
element-wise work. Two gradient-accumulation depths separate what a step costs once from what each
micro-batch costs. One JSON line.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bigtrain.config import TrainConfig, load_config
from bigtrain.engine import local
from bigtrain.engine.local import local_engine
from bigtrain.model import Llama

SIZES = {"10m": ["model.vocab_size=8192", "model.d_model=256", "model.n_layers=8", "model.n_heads=4",
                 "model.n_kv_heads=2"]}
VIEWS = {"aten::view", "aten::t", "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach",
         "aten::expand", "aten::select", "aten::transpose", "aten::_unsafe_view", "aten::permute",
         "aten::as_strided", "aten::reshape", "aten::unbind", "aten::split", "aten::split_with_sizes"}
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product")


class StepBytes(TorchDispatchMode):
    def __init__(self, weight_shapes: set[tuple[int, ...]], params: set[int]):
        super().__init__()
        self.weight_shapes, self.params = weight_shapes, params
        self.by_class: dict[str, int] = defaultdict(int)
        self.phase = "model"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        if name in VIEWS:
            return out
        tensors = [t for t in tree_leaves((args, kwargs or {})) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        moved = sum(t.numel() * t.element_size() for t in [*tensors, *outs])
        first = tensors[0] if tensors else None
        if self.phase == "optimizer":
            kind = "optimizer"
        elif name.startswith(MATMULS):
            kind = "matmul"
        elif name == "aten::_to_copy" and first is not None and id(first) in self.params:
            kind = "weight_cast"
        elif name == "aten::_to_copy" and first is not None and tuple(first.shape) in self.weight_shapes \
                and first.dtype == torch.bfloat16 and outs and outs[0].dtype == torch.float32:
            kind = "grad_cast"
        elif name in ("aten::add_", "aten::add") and first is not None and tuple(first.shape) in self.weight_shapes \
                and first.dtype == torch.float32 and len(tensors) == 2 and tensors[1].shape == first.shape \
                and tensors[1].dtype in (torch.float32, torch.bfloat16):
            kind = "grad_accumulate"
        else:
            kind = "elementwise"
        self.by_class[kind] += moved
        return out


def measure(size: str, grad_accum: int, micro_batch: int, seq_len: int, master_weights: bool) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = load_config(None, [*SIZES[size], f"model.max_seq_len={seq_len}"])
    local.resolve_precision = lambda *args: "bf16"  # the GPU's bf16, on the CPU
    engine = local_engine(Llama(cfg.model), TrainConfig(device="cpu", grad_clip=1.0, master_weights=master_weights))
    params = list(engine.model.parameters())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.model.vocab_size, (micro_batch, seq_len + 1), generator=gen)
               for _ in range(grad_accum)]
    engine.train_step(batches, 1e-4)  # AdamW's state exists from here on
    counter = StepBytes({tuple(p.shape) for p in params if p.dim() == 2}, {id(p) for p in params})
    timer_phase = engine.timer.phase

    def phase(name, **kwargs):  # the optimizer phase's bytes in a class of their own
        counter.phase = "optimizer" if name == "optimizer" else "model"
        return timer_phase(name, **kwargs)

    engine.timer.phase = phase
    with counter:
        engine.train_step(batches, 1e-4)
    return {k: round(v / 2**20, 1) for k, v in sorted(counter.by_class.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="10m")
    parser.add_argument("--grad-accum", type=int, nargs=2, default=[1, 4])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    params = sum(p.numel() for p in Llama(load_config(None, SIZES[args.size]).model, device="meta").parameters())
    result = {"bench": "step_bytes", "size": args.size, "params": params, "micro_batch": args.micro_batch,
              "seq_len": args.seq_len}
    for mode, master_weights in (("autocast_fp32_weights", False), ("master_weights", True)):
        few, many = (measure(args.size, k, args.micro_batch, args.seq_len, master_weights) for k in args.grad_accum)
        result[mode] = {f"mib_per_step_at_grad_accum_{args.grad_accum[0]}": few,
                        f"mib_per_step_at_grad_accum_{args.grad_accum[1]}": many,
                        "mib_per_extra_micro_batch": {
                            k: round((many.get(k, 0) - few.get(k, 0)) / (args.grad_accum[1] - args.grad_accum[0]), 1)
                            for k in many}}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
