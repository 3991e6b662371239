"""The parallel layout, in one place: world = pp × dp × sp × tp, which weight splits along which
dimension under tensor parallelism, what sequence parallelism needs of the model, the layers of each pipeline stage, the one check of a layout,
and the global-batch arithmetic.

Every other module asks this one: config checks at launch, the engines, the planner's candidate
filter, checkpoint consolidation and `convert reshard`. Errors name keys a user can set.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from bigtrain import compat
from bigtrain.config import Config, ModelConfig
from bigtrain.errors import BigtrainError
from bigtrain.parallel.activation_checkpointing import checkpointing_mode
from bigtrain.parallel.tensor_parallel_layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    VocabParallelLMHead,
)


@dataclass(frozen=True)
class Split:
    """Swap the module for `layer`, which keeps this rank's slice of its weight along
    `layer.split_dim`; `sequence_out`: under sequence parallelism its output is reduce-scattered
    to sequence shards (row-parallel layers and the embedding)."""

    layer: type
    sequence_out: bool = False


@dataclass(frozen=True)
class EnterRegion:
    """The module's input enters a column-parallel region: copied in once (under sequence
    parallelism: gathered from the sequence shards), whatever the region's projections."""


@dataclass(frozen=True)
class Replicate:
    """The module's parameters stay whole on every rank. Under sequence parallelism each rank
    applies them to its own tokens, so their gradients are summed over the group (the RMSNorms);
    `per_head`: each rank applies them to its own heads, so they are summed in any case (the
    query/key norms)."""

    per_head: bool = False


# Megatron-style tensor parallelism as data: module name → what happens to it, in order. Column-parallel
# layers split output features (dim 0), row-parallel ones input features (dim 1), the embedding its
# vocabulary (dim 0), the head its vocabulary (dim 0, a column-parallel layer that also computes
# the vocab-parallel loss). Every parameter of the model belongs to a module named here (a test checks).
TP_PLAN: dict[str, tuple[Split | EnterRegion | Replicate, ...]] = {
    "embed_tokens": (Split(VocabParallelEmbedding, sequence_out=True),),
    "input_layernorm": (Replicate(),),
    "self_attn": (EnterRegion(),),
    "q_proj": (Split(ColumnParallelLinear),), "k_proj": (Split(ColumnParallelLinear),),
    "v_proj": (Split(ColumnParallelLinear),),
    "q_norm": (Replicate(per_head=True),), "k_norm": (Replicate(per_head=True),),
    "o_proj": (Split(RowParallelLinear, sequence_out=True),),
    "post_attention_layernorm": (Replicate(),),
    "mlp": (EnterRegion(),),
    "gate_proj": (Split(ColumnParallelLinear),), "up_proj": (Split(ColumnParallelLinear),),
    "down_proj": (Split(RowParallelLinear, sequence_out=True),),
    "norm": (Replicate(),),
    "lm_head": (Split(VocabParallelLMHead), EnterRegion()),
}


# A Mixture-of-Experts feed-forward stays whole on every tensor-parallel rank (its children: these):
# each rank routes the tokens it holds (its sequence shard under tensor sequence parallelism, whose
# gradients are then summed over the group, as the RMSNorms'); expert parallelism splits the experts.
MOE_CHILDREN = ("router", "experts", "shared_experts")


def in_moe(param_name: str) -> bool:
    """Whether `param_name` belongs to a Mixture-of-Experts feed-forward (replicated under tp)."""
    return any(f".mlp.{child}." in param_name for child in MOE_CHILDREN)


def tp_split_dim(param_name: str) -> int | None:
    """The dimension tensor parallelism splits parameter `param_name` along (None: replicated)."""
    if in_moe(param_name):
        return None
    module = param_name.split(".")[-2] if "." in param_name else ""
    splits = [entry.layer.split_dim for entry in TP_PLAN.get(module, ()) if isinstance(entry, Split)]
    return splits[0] if splits else None


def tp_slice(full: torch.Tensor, param_name: str, tp: int, tp_rank: int) -> torch.Tensor:
    """Tensor-parallel rank `tp_rank`'s part of the full tensor of `param_name`."""
    dim = tp_split_dim(param_name)
    return full if dim is None or tp == 1 else full.chunk(tp, dim=dim)[tp_rank]


def tp_join(param_name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor of `param_name` from its tensor-parallel parts, in rank order."""
    dim = tp_split_dim(param_name)
    return parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)


def is_expert_weight(param_name: str) -> bool:
    """Whether `param_name` is a stacked expert weight: expert parallelism splits it along dim 0
    (its experts); tensor parallelism leaves it whole."""
    return ".mlp.experts." in param_name


def ep_slice(full: torch.Tensor, param_name: str, ep: int, ep_rank: int) -> torch.Tensor:
    """Expert-parallel rank `ep_rank`'s part of the full tensor of `param_name`."""
    return full.chunk(ep, dim=0)[ep_rank] if ep > 1 and is_expert_weight(param_name) else full


@dataclass(frozen=True)
class Layout:
    """A resolved layout of a run over its GPUs: what `config_layout` reads from a config and
    checks, what the planner enumerates (each candidate passes `layout_problem`) and plans."""

    dp: int
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sp: int = 1
    micro_batch: int = 1
    grad_accum: int = 1
    offload: bool = False
    activation_checkpointing: bool | str = False  # false/none, true/full or selective
    checkpoint_every: int = 1
    local: bool = False  # the local engine: fp32 weights, gradients and AdamW moments, bf16 autocast
    master_weights: bool = False  # local engine with train.master_weights: bf16 weights, fp32 masters and gradients
    tp_sequence_parallel: bool = False  # parallel.tp_sequence_parallel with tp > 1
    ep: int = 1  # expert parallelism: each rank of an ep group holds 1/ep of the experts (carved from dp)

    def describe(self) -> str:
        mode = checkpointing_mode(self.activation_checkpointing)
        every = f"/{self.checkpoint_every}" if self.checkpoint_every > 1 else ""
        flags = "".join([" tp-seq-parallel" if self.tp_sequence_parallel else "", " offload" if self.offload else "",
                         f" act-ckpt={mode}{every}" if mode != "none" else "",
                         (" (local engine, master weights)" if self.master_weights else " (local engine)") if self.local else ""])
        sp = f" sp={self.sp}" if self.sp > 1 else ""
        sp += f" ep={self.ep}" if self.ep > 1 else ""
        return (f"dp={self.dp}{sp} tp={self.tp} pp={self.pp} zero={self.zero} "
                f"micro_batch={self.micro_batch} grad_accum={self.grad_accum}{flags}")


def tensor_parallel_problem(m: ModelConfig, tp: int) -> str | None:
    """Why tp ranks cannot split the model's heads, KV heads, vocabulary or MLP width (None: they can)."""
    sizes = [
        ("model.n_heads", m.n_heads, ""),
        ("model.n_kv_heads", m.kv_heads, "" if m.n_kv_heads else " (model.n_heads, as model.n_kv_heads is unset)"),
        ("model.vocab_size", m.vocab_size, ""),
        ("model.ffn_hidden", m.ffn_dim, "" if m.ffn_hidden else " (derived from model.d_model)"),
    ]
    for key, size, note in sizes:
        if size % tp:
            return f"{key}={size}{note} is not divisible by parallel.tp={tp}"
    return None


def tp_sequence_parallel(cfg: Config) -> bool:
    """Whether the tensor-parallel ranks also split the sequence between their regions (Megatron's
    sequence parallelism): `parallel.tp_sequence_parallel` with tp > 1."""
    return cfg.parallel.tp > 1 and cfg.parallel.tp_sequence_parallel


def check_tensor_parallel(m: ModelConfig, tp: int) -> None:
    problem = tensor_parallel_problem(m, tp)
    if problem:
        raise BigtrainError(problem)


def sequence_parallel_problem(m: ModelConfig, seq_len: int, sp: int, tp: int) -> str | None:
    """Why sp ranks cannot split the sequence, and (Ulysses' all-to-all) the heads each tensor-parallel
    rank holds (None: they can). Grouped-query KV heads are not repeated to fit: they must divide too."""
    if seq_len % sp:
        return f"data.seq_len={seq_len} is not divisible by parallel.sp={sp}"
    for key, heads in (("model.n_heads", m.n_heads), ("model.n_kv_heads", m.kv_heads)):
        if heads % (sp * tp):
            return (f"{key}={heads} is not divisible by parallel.sp × parallel.tp = {sp * tp} "
                    "(Ulysses sequence parallelism splits the heads of each tensor-parallel rank)")
    return None


def expert_parallel_problem(cfg: Config, world_size: int) -> str | None:
    """Why the Mixture-of-Experts model cannot run in this layout (None: it can, or it is dense)."""
    p, moe = cfg.parallel, cfg.model.moe
    if not moe.experts:
        return None
    if p.ep > 1 and p.zero_stage == 3:
        return "parallel.ep > 1 needs parallel.zero_stage <= 2 (DeepSpeed partitions expert groups with ZeRO 1 and 2 only)"
    if world_size % (p.tp * p.pp * p.sp) == 0:
        dp = world_size // (p.tp * p.pp * p.sp)
        if dp % p.ep:
            return f"parallel.ep={p.ep} does not divide the data-parallel size {dp} (expert parallelism is carved from dp)"
    return None


def stage_bounds(n_layers: int, pp: int) -> list[int]:
    """Layer-list boundaries of the pp stages (stage s holds layers [b[s], b[s+1])), as DeepSpeed's
    `PipelineModule(partition_method="type:Block")` cuts the list embedding, n blocks, head."""
    if pp == 1:
        return [0, n_layers + 2]
    return compat.partition_layers([0] + [1] * n_layers + [0], pp)


def max_blocks_per_stage(n_layers: int, pp: int) -> int:
    """Transformer blocks on the most loaded pipeline stage."""
    bounds = stage_bounds(n_layers, pp)
    return max(len(range(max(a, 1), min(b, n_layers + 1))) for a, b in itertools.pairwise(bounds))


def layout_problem(cfg: Config, world_size: int) -> str | None:
    """Why `cfg`'s parallel layout cannot run on `world_size` processes (None: it can)."""
    p, m = cfg.parallel, cfg.model
    if p.engine == "local":
        if world_size > 1:
            return f"parallel.engine=local runs one process, but {world_size} were launched; use parallel.engine=deepspeed"
        if p.tp > 1 or p.pp > 1 or p.sp > 1 or p.ep > 1 or p.zero_stage > 0:
            return "parallel.tp, parallel.pp, parallel.sp, parallel.ep and parallel.zero_stage need parallel.engine=deepspeed"
    if problem := expert_parallel_problem(cfg, world_size):
        return problem
    if world_size % (p.tp * p.pp * p.sp):
        return (f"world size {world_size} is not divisible by parallel.tp × parallel.pp × parallel.sp = "
                f"{p.tp * p.pp * p.sp}")
    if problem := tensor_parallel_problem(m, p.tp):
        return problem
    if p.sp > 1 and (problem := sequence_parallel_problem(m, cfg.data.seq_len, p.sp, p.tp)):
        return problem
    if tp_sequence_parallel(cfg) and cfg.data.seq_len % (p.sp * p.tp):
        split = f"parallel.tp={p.tp}" if p.sp == 1 else f"parallel.sp × parallel.tp = {p.sp * p.tp}"
        return (f"data.seq_len={cfg.data.seq_len} is not divisible by {split}, as "
                "parallel.tp_sequence_parallel needs (or set parallel.tp_sequence_parallel=false)")
    warmup = cfg.data.seq_len_warmup
    split = p.sp * (p.tp if tp_sequence_parallel(cfg) else 1)
    if warmup is not None and warmup.start % split:
        return (f"data.seq_len_warmup.start={warmup.start} is not divisible by the {split} ranks that split "
                "each window (parallel.sp × parallel.tp with tensor sequence parallelism)")
    if m.n_layers < p.pp:
        return f"model.n_layers={m.n_layers} is fewer than parallel.pp={p.pp} pipeline stages"
    if p.pp > 1 and p.zero_stage > 1:
        return f"parallel.zero_stage={p.zero_stage} cannot be combined with pipeline parallelism (use 0 or 1)"
    if p.pp > 1 and m.tie_embeddings:
        return "model.tie_embeddings is not supported with parallel.pp > 1"
    if cfg.eval.tasks and (p.tp > 1 or p.pp > 1 or p.sp > 1 or p.zero_stage > 2):
        return ("eval.tasks needs a whole model and whole sequences on every rank: parallel.tp=1, "
                "parallel.pp=1, parallel.sp=1 and parallel.zero_stage <= 2 (evaluate checkpoints of other layouts with bigtrain eval --tasks)")
    dp = data_parallel_size(cfg, world_size)
    if cfg.train.global_batch is not None and cfg.train.global_batch != global_batch(cfg, dp):
        d, t = cfg.data, cfg.train
        return (f"train.global_batch={t.global_batch} but data.micro_batch × train.grad_accum × dp = "
                f"{d.micro_batch} × {t.grad_accum} × {dp} = {global_batch(cfg, dp)}")
    return None


def check_layout(cfg: Config, world_size: int) -> int:
    """Refuse an impossible layout in one line (before any process group exists); return dp."""
    problem = layout_problem(cfg, world_size)
    if problem:
        raise BigtrainError(problem)
    return data_parallel_size(cfg, world_size)


def data_parallel_size(cfg: Config, world_size: int) -> int:
    """Replicas that read different windows (the sp ranks of one replica share its windows)."""
    p = cfg.parallel
    return world_size // (p.tp * p.pp * p.sp)


def global_batch(cfg: Config, dp: int) -> int:
    """Windows per optimizer step: data.micro_batch × train.grad_accum × dp."""
    return cfg.data.micro_batch * cfg.train.grad_accum * dp


def grad_accum_for(cfg: Config, dp: int) -> int:
    """train.grad_accum, or the one that `train.global_batch` implies on dp replicas."""
    t, micro_batch = cfg.train, cfg.data.micro_batch
    if t.global_batch is None:
        return t.grad_accum
    if t.global_batch % (micro_batch * dp):
        raise BigtrainError(f"train.global_batch={t.global_batch} is not a multiple of data.micro_batch × dp = "
                            f"{micro_batch} × {dp}")
    return t.global_batch // (micro_batch * dp)


def world_size_for(cfg: Config) -> int:
    """The processes `cfg` runs on: tp × pp × sp × the dp that train.global_batch implies (else dp = 1)."""
    p, per_replica, batch = cfg.parallel, cfg.data.micro_batch * cfg.train.grad_accum, cfg.train.global_batch
    if p.engine == "local":
        return 1
    return p.tp * p.pp * p.sp * (batch // per_replica if batch and batch % per_replica == 0 else 1)


def describe(cfg: Config) -> str:
    p = cfg.parallel
    if p.engine == "local":
        return "the local engine"
    return f"DeepSpeed ZeRO-{p.zero_stage}, tp={p.tp}, pp={p.pp}" + (f", sp={p.sp}" if p.sp > 1 else "")


def config_layout(cfg: Config, gpus: int) -> Layout:
    """The layout `cfg` asks for on `gpus` GPUs; `train.global_batch`, when set, fixes grad_accum.
    A local-engine config on more than one GPU is planned as DeepSpeed."""
    p, t = cfg.parallel, cfg.train
    probe = replace(cfg, parallel=replace(p, engine="deepspeed"), train=replace(t, global_batch=None))
    dp = check_layout(probe, gpus)
    return Layout(dp=dp, tp=p.tp, pp=p.pp, zero=p.zero_stage, sp=p.sp, micro_batch=cfg.data.micro_batch,
                  grad_accum=grad_accum_for(cfg, dp), offload=p.offload_optimizer,
                  activation_checkpointing=p.activation_checkpointing, checkpoint_every=p.activation_checkpointing_every,
                  local=p.engine == "local" and gpus == 1, tp_sequence_parallel=tp_sequence_parallel(cfg), ep=p.ep,
                  master_weights=t.master_weights and p.engine == "local" and gpus == 1)
