"""`bigtrain info`: the environment, or a config's parameters, FLOPs/token and per-GPU memory plan."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from bigtrain.config import Config
from bigtrain.model import Llama, count_params, flops_per_token
from bigtrain.parallel import planner

PACKAGES = ("bigtrain", "torch", "deepspeed", "accelerate", "mosaicml-streaming", "wandb", "pyarrow",
            "tokenizers", "transformers")
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "TORCHELASTIC_RUN_ID", "CUDA_VISIBLE_DEVICES")


def environment_report() -> str:
    """Versions, devices and the launcher/Slurm variables this process sees."""
    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = [f"{'python':<20} {platform.python_version()} ({platform.platform()})"]
    lines += [f"{name:<20} {pkg(name)}" for name in PACKAGES]
    lines.append(f"{'CUDA':<20} {torch.version.cuda or 'none'} (available: {torch.cuda.is_available()})")
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a (no CUDA)"
    lines.append(f"{'NCCL':<20} {nccl}")
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        lines.append(f"{f'GPU {i}':<20} {props.name}, {props.total_memory / 2**30:.1f} GiB, "
                     f"compute capability {props.major}.{props.minor}")
    lines.append(f"{'CPU':<20} {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    seen = {k: v for k, v in sorted(os.environ.items()) if k in LAUNCH_VARIABLES or k.startswith("SLURM_")}
    lines.append(f"{'launch variables':<20} " + (" ".join(f"{k}={v}" for k, v in seen.items()) or "none (a lone process)"))
    return "\n".join(lines)


def model_report(cfg: Config) -> str:
    """Counts from the formula, cross-checked against a model built on the meta device (no memory)."""
    counts = count_params(cfg.model)
    with torch.device("meta"):
        built = sum(p.numel() for p in Llama(cfg.model).parameters())
    assert built == counts.total, f"parameter formula {counts.total} != built model {built}"
    m = cfg.model
    return "\n".join([
        f"model        d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} n_kv_heads={m.kv_heads} head_dim={m.head_dim} "
        f"ffn={m.ffn_dim} vocab={m.vocab_size} tied={m.tie_embeddings}",
        f"parameters   {counts.total:,} ({_human(counts.total)}); non-embedding {counts.non_embedding:,} "
        f"({_human(counts.non_embedding)})",
        *([f"experts      {m.moe.experts} routed (top {m.moe.top_k}, {m.expert_ffn_dim} wide) + {m.moe.shared_experts} "
           f"shared per MoE block; active parameters {counts.active:,} ({_human(counts.active)})"] if m.moe.experts else []),
        f"FLOPs/token  {flops_per_token(m, cfg.data.seq_len):.4g} (training, seq_len={cfg.data.seq_len})",
    ])


def plan_report(cfg: Config, gpus: int, gpu_mem_gib: float, gpus_per_node: int, suggest: bool) -> str:
    """Per-GPU memory of the config's layout under every ZeRO stage, its estimated step time,
    and with `suggest` the fastest layouts that fit."""
    m, seq, precision = cfg.model, cfg.data.seq_len, cfg.train.precision
    layout = planner.config_layout(cfg, gpus)
    peak = (cfg.log.peak_tflops or 989.0) * 1e12
    variants = [("local", layout)] if layout.local else []
    variants += [(f"ZeRO {z}", planner.replace(layout, zero=z, offload=False, local=False)) for z in range(4)]
    variants.append(("ZeRO 3+off", planner.replace(layout, zero=3, offload=True, local=False)))
    variants = [(name, v) for name, v in variants if (layout.pp == 1 or v.zero <= 1) and (layout.ep == 1 or v.zero <= 2)]
    plans = [planner.memory_plan(m, seq, precision, v) for _, v in variants]
    layers = -(-m.n_layers // layout.pp)
    no_ckpt, selective, ckpt = (planner.activation_bytes(m, seq, layout.micro_batch, layout.tp, layers, mode,
                                                         sp=layout.sp, tp_sequence_parallel=layout.tp_sequence_parallel)
                                for mode in ("none", "selective", "full"))
    global_batch = layout.micro_batch * layout.grad_accum * layout.dp
    width = 12
    rows = [
        f"layout       {layout.describe()} on {gpus} GPU{'s' if gpus > 1 else ''} ({gpus_per_node}/node), global batch "
        f"{global_batch} × {seq} = {global_batch * seq:,} tokens, precision "
        f"{'bf16' if precision == 'auto' else precision}",
        f"activations  {_gib(no_ckpt)} per micro-batch, {_gib(selective)} with selective and {_gib(ckpt)} with "
        f"full activation checkpointing (config: activation_checkpointing={str(layout.activation_checkpointing).lower()}"
        + (f"; ×{min(layout.pp, layout.grad_accum)} micro-batches in flight on stage 0)" if layout.pp > 1 else ")"),
        f"{'GiB per GPU':<14}" + "".join(f"{name:>{width}}" for name, _ in variants),
    ]
    for label, field in (("parameters", "params"), ("gradients", "gradients"), ("optimizer", "optimizer"),
                         ("buffers", "buffers"), ("activations", "activations"), ("total", "total"),
                         ("CPU (offload)", "optimizer_cpu")):
        rows.append(f"{label:<14}" + "".join(f"{getattr(p, field) / 2**30:>{width}.2f}" for p in plans))
    rows.append(f"{'async ckpt':<14}" + "".join(
        f"{planner.checkpoint_staging_bytes(m, v, p) / 2**30:>{width}.2f}" for (_, v), p in zip(variants, plans, strict=True)))
    rows.append(f"{f'fits {gpu_mem_gib:g} GiB':<14}" + "".join(
        f"{('yes' if planner.fits(p, gpu_mem_gib) else 'NO'):>{width}}" for p in plans))
    chosen = planner.memory_plan(m, seq, precision, layout)
    seconds = planner.step_time(m, seq, precision, layout, peak, gpus_per_node)
    verdict = "fits" if planner.fits(chosen, gpu_mem_gib) else "DOES NOT FIT"
    name = "local engine" if layout.local else f"ZeRO {layout.zero}{' + offload' if layout.offload else ''}"
    rows.append(f"chosen       {name}: "
                f"{_gib(chosen.total)} of {gpu_mem_gib:g} GiB — {verdict}; estimated step {seconds:.3f} s "
                f"({global_batch * seq / seconds:,.0f} tokens/s at {planner.COMPUTE_EFFICIENCY:.0%} MFU, "
                f"peak {peak / 1e12:g} TFLOP/s per GPU)")
    if suggest:
        rows.append("suggested layouts (fastest first; estimated step time, memory per GPU):")
        for i, (cand, plan, t) in enumerate(planner.suggest(cfg, gpus, gpu_mem_gib, peak, gpus_per_node), 1):
            rows.append(f"  {i:>2}. {cand.describe():<72} {t:8.3f} s  {_gib(plan.total):>10}")
    return "\n".join(rows)


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
