"""`bigtrain info`: the environment, or a config's parameter count, FLOPs/token and memory."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

import torch

from bigtrain.config import Config
from bigtrain.model import Llama, count_params, flops_per_token


def environment_report() -> str:
    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    lines = [
        f"bigtrain     {pkg('bigtrain')}",
        f"python       {platform.python_version()}",
        f"torch        {torch.__version__}",
        f"deepspeed    {pkg('deepspeed')}",
        f"CUDA         {torch.version.cuda or 'none'} (available: {torch.cuda.is_available()})",
    ]
    if torch.cuda.is_available():
        lines.append(f"NCCL         {'.'.join(map(str, torch.cuda.nccl.version()))}")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {props.name}, {props.total_memory / 2**30:.0f} GiB")
    lines.append(f"CPU threads  {torch.get_num_threads()}")
    return "\n".join(lines)


def model_report(cfg: Config) -> str:
    """Counts from the formula, cross-checked against a model built on the meta device (no memory)."""
    counts = count_params(cfg.model)
    with torch.device("meta"):
        built = sum(p.numel() for p in Llama(cfg.model).parameters())
    assert built == counts.total, f"parameter formula {counts.total} != built model {built}"
    m = cfg.model
    return "\n".join([
        f"model        d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} n_kv_heads={m.kv_heads} "
        f"ffn={m.ffn_dim} vocab={m.vocab_size} tied={m.tie_embeddings}",
        f"parameters   {counts.total:,} ({_human(counts.total)}); non-embedding {counts.non_embedding:,} "
        f"({_human(counts.non_embedding)})",
        f"FLOPs/token  {flops_per_token(m, cfg.data.seq_len):.4g} (training, seq_len={cfg.data.seq_len})",
        f"memory       weights {_bytes(2 * counts.total)} in bf16; "
        f"{_bytes(16 * counts.total)} for weights + grads + AdamW in mixed precision (one device, no ZeRO)",
    ])


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
