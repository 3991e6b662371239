"""`bigtrain info CONFIG --gpus N --simulate`: build one rank of a large layout for real, on this
machine, and compare what it holds with the planner's figures.

The process joins a fake process group as rank R of N (torch's fake backend: collectives return
at once and move nothing), builds its share of the model exactly as `train` does (meta device,
materialised shard, ZeRO-3 partitioned from construction on), sets up DeepSpeed's engine and
optimizer, and runs probe steps of a few tokens per micro-batch so that gradients, reduce
buckets and ZeRO-3's gathered blocks exist once. Activations are not simulated (the probe's
sequence is tiny); the planner's activation figure stands on its own. Without a GPU the run uses
the CPU with the precision a GPU run would train in (bf16 for `auto`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from bigtrain import compat
from bigtrain.config import Config
from bigtrain.errors import BigtrainError
from bigtrain.parallel import planner

FIGURES = {"parameters": "params", "gradients": "gradients", "optimizer": "optimizer", "buffers": "buffers"}  # → MemoryPlan


def planned_gib(cfg: Config, gpus: int) -> tuple[planner.Layout, dict[str, float], float]:
    """The layout `cfg` asks for on `gpus` GPUs, the planner's four figures for it (GiB) and its total."""
    layout = planner.config_layout(cfg, gpus)
    plan = planner.memory_plan(cfg.model, cfg.data.seq_len, cfg.train.precision, layout)
    return layout, {name: getattr(plan, field) / 2**30 for name, field in FIGURES.items()}, plan


def simulate(cfg: Config, gpus: int, rank: int, gpu_mem_gib: float) -> dict:
    """Build rank `rank` of `cfg`'s layout on `gpus` GPUs; {"planned": …, "built": …} in GiB.
    A layout that does not fit `gpu_mem_gib` is refused before anything is built."""
    layout, planned, plan = planned_gib(cfg, gpus)
    if not 0 <= rank < gpus:
        raise BigtrainError(f"--rank {rank} is not a rank of {gpus} GPUs")
    if layout.local:
        raise BigtrainError("--simulate builds DeepSpeed layouts: set parallel.engine=deepspeed")
    if not planner.fits(plan, gpu_mem_gib):
        raise BigtrainError(f"{layout.describe()} does not fit: {plan.total / 2**30:.1f} GiB planned per GPU of "
                            f"{gpu_mem_gib:g} GiB (see bigtrain info --suggest)")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
    from bigtrain.engine.deepspeed.engine import build_deepspeed_engine
    from bigtrain.engine.deepspeed.grid import grid_topology
    from bigtrain.engine.update_gate import UpdateGate

    with tempfile.TemporaryDirectory() as tmp:
        sim = _probe_config(cfg, layout, Path(tmp))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(gpus), LOCAL_RANK="0")
        compat.init_fake_process_group(rank, gpus)
        engine = build_deepspeed_engine(sim, grid_topology(sim), UpdateGate())
        built = _measure(engine, sim, steps=2 if layout.zero == 3 else 1)  # ZeRO-3 prefetches from its second step
    return {"planned": planned, "built": {name: built[name] / 2**30 for name in FIGURES},
            "layout": layout.describe(), "rank": rank, "gpus": gpus}


def _probe_config(cfg: Config, layout: planner.Layout, tmp: Path) -> Config:
    """`cfg` on this CPU: DeepSpeed in the precision a GPU run would use, probe windows of 8·tp·sp
    tokens, one micro-batch per step (as many as pipeline stages, to fill the pipeline: no figure
    measured here depends on their number), nothing compiled."""
    precision = {"fp32": {}, "fp16": {"fp16": {"enabled": True}}}.get(cfg.train.precision, {"bf16": {"enabled": True}})
    overrides = json.loads(Path(cfg.parallel.deepspeed_overrides).read_text()) if cfg.parallel.deepspeed_overrides else {}
    (tmp / "deepspeed.json").write_text(json.dumps({**overrides, **precision}))
    p = cfg.parallel
    return replace(cfg, train=replace(cfg.train, device="cpu", precision="auto", compile=False, global_batch=None,
                                      grad_accum=min(layout.grad_accum, p.pp)),
                   data=replace(cfg.data, seq_len=8 * p.tp * p.sp),
                   parallel=replace(p, engine="deepspeed", deepspeed_overrides=str(tmp / "deepspeed.json")))


def _storage_bytes(tensors, besides=()) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one flat buffer count once),
    leaving out those behind `besides`."""
    def storages(ts):
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if torch.is_tensor(t) and t.numel()}

    excluded = storages(besides)
    return sum(size for ptr, size in storages(tensors).items() if ptr not in excluded)


def _measure(engine, cfg: Config, steps: int) -> dict[str, int]:
    """Bytes this rank holds: parameters (ZeRO-3: its partitions), optimizer (fp32 masters and
    AdamW moments), the most gradient storage held at once, and buffers (the modules' buffers plus
    the most reduce-bucket and ZeRO-3 gathered-parameter storage held at once) over `steps` probe
    steps."""
    params = list(engine.model.parameters())
    wrapper, inner = engine.engine.optimizer, engine._client_optimizer
    masters = compat.master_partitions(wrapper)
    peak = {"gradients": 0, "in_flight": 0}

    def sample(*_):
        buckets = compat.bucket_buffers(wrapper)  # gradients copied into a bucket count as the bucket
        peak["gradients"] = max(peak["gradients"], _storage_bytes(grads_of(params, masters, wrapper), besides=buckets))
        in_flight = [p.data for p in params if compat.gathered_now(p)] + buckets
        peak["in_flight"] = max(peak["in_flight"], _storage_bytes(in_flight))

    hooks = [m.register_forward_hook(sample) for m in engine.model.modules()]
    hooks += [m.register_full_backward_hook(sample) for m in engine.model.modules() if next(m.parameters(False), None) is not None]
    step = inner.step
    inner.step = lambda *a, **k: (sample(), step(*a, **k))[1]
    update = wrapper.step  # the fake world's data can make gradients non-finite, and DeepSpeed would
    wrapper.step = lambda *a, **k: (_zero(grads_of(params, masters, wrapper)), update(*a, **k))[1]  # skip the update
    tokens = torch.zeros((cfg.data.micro_batch, cfg.data.seq_len + 1), dtype=torch.long)
    if engine.pipelined and engine.engine.stage_id > 0:  # no earlier stage will say what it sends
        p = cfg.parallel
        seq = cfg.data.seq_len // p.sp // (p.tp if engine.topology.tp_sequence_parallel else 1)
        hidden = torch.zeros((cfg.data.micro_batch, seq, cfg.model.d_model), dtype=params[0].dtype)
        if not compat.expect_pipeline_input(engine.engine, hidden):
            raise BigtrainError("--simulate builds later pipeline stages only where activations travel whole "
                                "(parallel.tp=1 or parallel.tp_sequence_parallel=true); try --rank 0")
    for _ in range(steps):
        engine.train_step([tokens] * cfg.train.grad_accum, 0.0)
        sample()
    for hook in hooks:
        hook.remove()
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    module_buffers = list(engine.model.buffers())
    return {
        "parameters": _storage_bytes([getattr(p, "ds_tensor", p) for p in params]),
        "optimizer": _storage_bytes(masters + states),
        "gradients": peak["gradients"],
        "buffers": _storage_bytes(module_buffers) + peak["in_flight"],
    }


def grads_of(params, masters, wrapper) -> list[torch.Tensor]:
    """Every gradient tensor the rank holds: its parameters', the fp32 masters', DeepSpeed's buffers."""
    return [p.grad for p in params] + [t.grad for t in masters] + compat.gradient_buffers(wrapper)


def _zero(tensors) -> None:
    """Zero the gradients before the probe's update, so that it runs (and creates AdamW's moments)."""
    for t in tensors:
        if torch.is_tensor(t):
            t.detach().zero_()


def simulate_report(result: dict) -> str:
    """Planned vs built GiB per figure, one row each."""
    rows = [f"simulated    rank {result['rank']} of {result['gpus']}: {result['layout']}",
            f"{'GiB':<14}{'planned':>12}{'built':>12}{'built/planned':>16}"]
    for name in FIGURES:
        planned, built = result["planned"][name], result["built"][name]
        ratio = f"{built / planned:.3f}" if planned else "-"
        rows.append(f"{name:<14}{planned:>12.3f}{built:>12.3f}{ratio:>16}")
    return "\n".join(rows)
