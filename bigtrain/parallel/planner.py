"""Memory and step-time estimates for a layout (dp × sp × tp × pp, ep, ZeRO stage, micro-batch) before launch.

Per-GPU bytes follow what DeepSpeed (the version pinned in pyproject.toml) allocates, as checked
against real allocations on 2 ranks in tests/distributed/test_memory_plan.py:

- parameters: N_rank × p, where N_rank is the largest pipeline stage's parameters (matmuls and
  the embedding split by tp, norms replicated), divided by dp under ZeRO-3 (here and below, ZeRO
  partitions over dp × sp: the sequence-parallel ranks join the partitioning);
- gradients: N_rank × g during the backward, in full at ZeRO 0/1 (stage 1 accumulates full
  gradients and reduces them at the step) and as a 1/dp partition at ZeRO 2/3; at the optimizer
  step (activations freed) the optimizer also gets an fp32 copy: of everything without ZeRO in
  mixed precision (DeepSpeed's FP16_Optimizer, also used for bf16), of the partition under
  ZeRO-3 and under ZeRO 1/2 in mixed precision. The bf16 pipeline engine without ZeRO
  (BF16_Optimizer) keeps a full accumulation buffer all along, in bf16 (DeepSpeed's default
  gradient accumulation dtype), and the bf16 gradients stay alive at the step (simulated);
- optimizer: fp32 master copy + Adam's two moments (12 bytes/param), 1/dp of it under ZeRO ≥ 1
  and with the bf16 pipeline engine, in CPU memory with `offload_optimizer`; plain fp32 without
  ZeRO keeps only the two moments (8 bytes); the local engine's `train.master_weights` holds bf16
  parameters, fp32 gradients and fp32 masters with the moments (2 + 4 + 12 bytes);
- buffers: the RoPE tables (one fp32 cos/sin pair per rank, whatever its blocks), ZeRO's
  gradient reduce bucket (sized by `zero_communication`, allocated whatever the model size;
  twice under ZeRO 1/2, whose `overlap_comm` double-buffers it, except with pipeline stages,
  where DeepSpeed turns the overlap off) and, under ZeRO-3, the gathered
  parameters: DeepSpeed keeps whole blocks gathered up to `stage3_max_live_parameters` (at
  least two: the one computing and the one prefetched), as `bigtrain info --simulate` measured;
- activations per micro-batch (bf16, flash attention), per layer and token:
  2·(4h/s + (3a + 4·kv + 3f)/tp) bytes (a = n_heads·head_dim, kv = kv_heads·head_dim) — norm
  inputs/outputs, q/k/v before and after RoPE,
  the attention output, SwiGLU's three ffn-wide tensors (gate, up and their product; SiLU is
  recomputed, bigtrain/model/pointwise.py) — or 2h/s with activation checkpointing (plus one
  block recomputed), where s = tp under tensor sequence parallelism (the norms, residuals and
  region inputs hold t/tp tokens) and 1 otherwise; logits 6·vocab/tp bytes per token (bf16 and
  the fp32 copy for the loss). 1F1B keeps up to min(pp, micro-batches) micro-batches in flight
  on the first stage. Ulysses sequence parallelism (`parallel.sp`) leaves each rank seq_len/sp
  tokens, plus per token the q, k, v and attention output on the other side of the all-to-all,
  2·(2a + 2·kv)/tp bytes.

Mixture-of-Experts models (`model.moe`): tensor parallelism leaves the MoE feed-forward (router,
experts, shared experts) whole, each tp rank routing the tokens it holds (t/s of them). With expert
parallelism `ep` each rank holds 1/ep of the routed experts' weights (the rest whole), so their
parameters, full gradients and, without ZeRO, optimizer state are divided by ep. ZeRO partitions the rank's experts over the dp/ep
ranks that hold the same ones (the rest over dp), which leaves every rank 1/dp of each weight:
ZeRO 1/2 partitions (fp32 master, moments, ZeRO-2 gradients) do not shrink with ep; DeepSpeed steps
its parameter groups one after another, and with ep > 1 the experts' are groups of their own, so
the step's fp32 gradient partition is that of the experts or of the rest, whichever is larger
(`bigtrain info --simulate` measured it; the norms' group is negligible). An MoE block's
activations replace the MLP's 3f/tp by, per token it holds, top_k routed copies of 2·(2h + 3·f_e) bytes
(the gathered input row, gate, up and their product, the expert output before its routing weight;
f_e = model.moe.ffn_hidden), the shared experts' 2·3·shared·f_e and the fp32 router probabilities
(4·experts); under selective checkpointing top_k·2·(2h + 2·f_e) + 2·2·shared·f_e + 4·experts. With
balanced routing, expert parallelism's all-to-alls leave every rank as many copies as it sent.
The estimate assumes balanced routing and no dropped tokens; of a pipeline stage's blocks, up to
all MoE blocks of the model are counted as MoE.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from typing import Any

from bigtrain.config import Config, ModelConfig
from bigtrain.errors import BigtrainError
from bigtrain.model.flops import count_params, flops_per_token
from bigtrain.parallel.activation_checkpointing import checkpointing_mode
from bigtrain.parallel.layout import (
    Layout,
    config_layout,
    layout_problem,
    max_blocks_per_stage,
    tp_sequence_parallel,
)

# step-time model: matmuls at this fraction of peak, links at these effective bandwidths (bytes/s)
COMPUTE_EFFICIENCY = 0.5
INTRA_NODE_BW = 300e9  # NVLink, per GPU, for tensor parallelism
INTER_NODE_BW = 25e9  # 200 Gb/s per GPU, for data-parallel reductions across nodes
PCIE_BW = 25e9  # optimizer offload traffic
FIT_FRACTION = 0.92  # of --gpu-mem usable by the allocator (CUDA context, fragmentation)
MIN_GRAD_BUCKET = 40_000_000  # Megatron-LM's gradient bucket: max(4e7, 1e6·dp) elements
MAX_LIVE_PARAMETERS = 1_000_000_000  # DeepSpeed's default stage3_max_live_parameters


def zero_communication(m: ModelConfig, zero_stage: int, dp: int, tp: int = 1) -> dict[str, Any]:
    """ZeRO's overlap and bucket sizes (elements) for this model shape (docs/distributed.md): the
    DeepSpeed config uses them and the memory plan counts them.

    ZeRO 1/2 reduce gradients in buckets of Megatron-LM's size, max(4e7, 1e6·dp), but never
    larger than the model. ZeRO-3 reduces in d² buckets and keeps parameters under 10·d (the
    norm weights) whole, as Hugging Face's DeepSpeed "auto" values do, prefetches one block
    ahead (FSDP's unit in torchtitan) and keeps at least that block and the one computing live.
    """
    if zero_stage == 0:
        return {}
    d2 = m.d_model ** 2
    if zero_stage < 3:
        bucket = min(count_params(m).total, max(MIN_GRAD_BUCKET, 1_000_000 * dp))
        return {"overlap_comm": True, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    block = count_params(m).blocks // m.n_layers // tp
    live = max(MAX_LIVE_PARAMETERS, 2 * block)
    return {"overlap_comm": True, "reduce_bucket_size": d2, "stage3_prefetch_bucket_size": block,
            "stage3_param_persistence_threshold": 10 * m.d_model, "stage3_max_live_parameters": live,
            "stage3_max_reuse_distance": live}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes on the most loaded GPU (the first pipeline stage) and, with offload, in CPU memory."""

    params: float
    grads: float  # during the backward, next to the activations
    grads_at_step: float  # at the optimizer step, after the activations are freed
    optimizer: float
    buffers: float
    activations: float  # everything kept for backward, all in-flight micro-batches
    activations_one_micro_batch: float
    optimizer_cpu: float = 0.0

    @property
    def gradients(self) -> float:
        return max(self.grads, self.grads_at_step)

    @property
    def total(self) -> float:
        peak = max(self.grads + self.activations, self.grads_at_step)
        return self.params + self.optimizer + self.buffers + peak


def precision_bytes(precision: str) -> tuple[int, int]:
    """(parameter, gradient) bytes per element; `auto` plans for GPUs, i.e. bf16."""
    return (4, 4) if precision == "fp32" else (2, 2)


def stage_params(m: ModelConfig, tp: int, pp: int) -> int:
    """Parameters on one GPU of the largest pipeline stage (DeepSpeed splits blocks evenly)."""
    counts = count_params(m)
    moe = m.moe
    moe_ff = m.d_model * moe.experts + (moe.experts + moe.shared_experts) * 3 * m.d_model * m.expert_ffn_dim
    whole = 2 * m.d_model + sum(map(m.is_moe_block, range(m.n_layers))) * moe_ff // m.n_layers  # norms, MoE: not split
    block = (counts.blocks // m.n_layers - whole) // tp + whole
    head_matrix = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    embedding, head = counts.embedding // tp, head_matrix // tp + m.d_model
    blocks_per_stage = max_blocks_per_stage(m.n_layers, pp)
    if pp == 1:
        return embedding + m.n_layers * block + head
    return max(embedding, head) + blocks_per_stage * block


def stage_expert_params(m: ModelConfig, pp: int) -> int:
    """The routed experts' weights in `stage_params(m, 1, pp)`: all of the model's with pp = 1, else
    the largest stage's blocks' average share."""
    per_block = m.moe.experts * 3 * m.d_model * m.expert_ffn_dim
    total = sum(m.is_moe_block(i) for i in range(m.n_layers)) * per_block
    return total if pp == 1 else max_blocks_per_stage(m.n_layers, pp) * total // m.n_layers


def activation_bytes(m: ModelConfig, seq_len: int, micro_batch: int, tp: int, layers: int,
                     checkpointing: bool | str = False, every: int = 1, sp: int = 1,
                     tp_sequence_parallel: bool = False) -> float:
    """Saved activations of one micro-batch over `layers` blocks plus the logits (bf16), with
    activation checkpointing (none, full or selective) of every `every`-th block, on one of sp
    (Ulysses) sequence-parallel ranks; under tensor sequence parallelism the d_model-wide tensors
    between the regions hold t/tp tokens."""
    h, a, kv, f = m.d_model, m.n_heads * m.head_dim, m.kv_heads * m.head_dim, m.ffn_dim
    s = tp if tp_sequence_parallel else 1
    block = 2 * (4 * h / s + (3 * a + 4 * kv + 3 * f) / tp) + (2 * (2 * a + 2 * kv) / tp if sp > 1 else 0)
    mode = checkpointing_mode(checkpointing)
    checkpointed = 0 if mode == "none" else -(-layers // every)
    # selective keeps the matmul outputs: d_model-wide ones (block input, o_proj, down_proj) are sharded by s
    kept = 2 * h / s if mode == "full" else 2 * (3 * h / s + (2 * a + 2 * kv + 2 * f) / tp)
    per_token = checkpointed * kept + (layers - checkpointed) * block + (block if checkpointed else 0)
    moe_blocks = min(layers, sum(m.is_moe_block(i) for i in range(m.n_layers)))
    if moe_blocks:  # see the module docstring; MoE blocks come first among the blocks not checkpointed
        k, fe, moe = m.moe.top_k, m.expert_ffn_dim, m.moe
        shared, probs = moe.shared_experts * fe, 4 * moe.experts
        # an MoE block over a dense one: the MoE feed-forward sees the t/s tokens of its rank, whole
        extra = (2 * (k * (2 * h + 3 * fe) + 3 * shared) + probs) / s - 2 * 3 * f / tp
        kept_extra = (2 * (k * (2 * h + 2 * fe) + 2 * shared) + probs) / s - 2 * 2 * f / tp if mode == "selective" else 0
        plain = min(moe_blocks, layers - checkpointed)
        per_token += plain * extra + (moe_blocks - plain) * kept_extra + (extra if checkpointed else 0)
    return micro_batch * seq_len / sp * (per_token + 6 * m.vocab_size / tp)


def recompute_factor(layout: Layout, n_layers: int) -> float:
    """Training FLOPs with the layout's activation checkpointing over those without: a fully
    checkpointed block runs its forward twice (8N instead of 6N); selective recomputes no matmul."""
    if checkpointing_mode(layout.activation_checkpointing) != "full":
        return 1.0
    return 1 + (-(-n_layers // layout.checkpoint_every) / n_layers) / 3


def memory_plan(m: ModelConfig, seq_len: int, precision: str, layout: Layout) -> MemoryPlan:
    """Per-GPU memory of `layout` (see the module docstring for every term)."""
    p_bytes, g_bytes = ((2 if layout.master_weights else 4), 4) if layout.local else precision_bytes(precision)
    n = stage_params(m, layout.tp, layout.pp)
    experts = stage_expert_params(m, layout.pp)
    held = n - experts + experts / layout.ep  # the rank's 1/ep of the experts and everything else
    dp, zero = layout.dp * layout.sp, layout.zero  # ZeRO partitions over dp × sp (experts: dp / ep, 1/dp of each)
    params = n * p_bytes / dp if zero == 3 else held * p_bytes
    full, part = held * g_bytes, n * g_bytes / dp
    mixed = g_bytes < 4
    bf16_pipeline = zero == 0 and mixed and layout.pp > 1 and precision != "fp16"
    if zero == 0:
        accumulator = full if bf16_pipeline else 0.0  # BF16_Optimizer's, in bf16 (DeepSpeed's default)
        grads = full + accumulator
        grads_at_step = full + accumulator + (4 * held if mixed else 0.0)
    else:
        grads = full if zero == 1 else part
        # ZeRO 1/2 step one parameter group at a time, with its fp32 gradients: with ep > 1 the experts are groups apart
        fp32 = max(n - experts, experts) if layout.ep > 1 and zero < 3 else n
        grads_at_step = part + (4 * fp32 / dp if zero == 3 or mixed else 0.0)
    if zero >= 1 or bf16_pipeline:
        optimizer = 12 * n / dp
    else:
        optimizer = 12 * held if mixed or layout.master_weights else 8 * held
    buffers = 2 * m.max_seq_len * m.head_dim * 4.0  # the RoPE tables
    comm = zero_communication(m, zero, dp, layout.tp)
    if zero >= 1:  # double-buffered where DeepSpeed overlaps the reduction (not with pipeline stages)
        buffers += (1 if zero == 3 or layout.pp > 1 else 2) * comm["reduce_bucket_size"] * g_bytes
    if zero == 3:
        block = count_params(m).blocks // m.n_layers // layout.tp
        gathered = min(n, max(2, comm["stage3_max_live_parameters"] // block) * block)
        buffers += gathered * p_bytes
    layers = max_blocks_per_stage(m.n_layers, layout.pp)
    one = activation_bytes(m, seq_len, layout.micro_batch, layout.tp, layers, layout.activation_checkpointing,
                           layout.checkpoint_every, layout.sp, layout.tp_sequence_parallel)
    in_flight = min(layout.pp, layout.grad_accum) if layout.pp > 1 else 1
    offloaded = layout.offload and zero >= 1
    return MemoryPlan(params=params, grads=grads, grads_at_step=grads_at_step,
                      optimizer=0.0 if offloaded else optimizer, buffers=buffers, activations=one * in_flight,
                      activations_one_micro_batch=one, optimizer_cpu=optimizer if offloaded else 0.0)


def checkpoint_staging_bytes(m: ModelConfig, layout: Layout, plan: MemoryPlan) -> float:
    """Host memory `checkpoint.async` holds on rank 0 (the most loaded) to stage its share of a
    checkpoint: its weights and optimizer state as the engine saves them, plus the full fp32
    weights it writes to `model.safetensors` without tensor or pipeline split (with expert
    parallelism rank 0 gathers the single-process layout: fp32 weights and both moments)."""
    total = count_params(m).total
    if layout.ep > 1:
        return 12.0 * total
    if layout.local:  # the weights as saved (fp32: the masters with train.master_weights) and both moments
        return plan.optimizer if layout.master_weights else plan.params + plan.optimizer
    full = 4.0 * total if layout.tp == 1 and layout.pp == 1 else 0.0
    return plan.params + plan.optimizer + plan.optimizer_cpu + full


def step_time(m: ModelConfig, seq_len: int, precision: str, layout: Layout, peak_flops: float,
              gpus_per_node: int) -> float:
    """Seconds per optimiser step: compute at COMPUTE_EFFICIENCY of peak, stretched by the pipeline
    bubble and recomputation, plus non-overlapped TP, SP, DP and offload traffic."""
    p_bytes, g_bytes = precision_bytes(precision)
    tokens_per_gpu_row = layout.micro_batch * layout.grad_accum * seq_len  # per data-parallel replica
    flops = flops_per_token(m, seq_len) * tokens_per_gpu_row / (layout.tp * layout.pp * layout.sp)
    flops *= recompute_factor(layout, m.n_layers)
    compute = flops / (peak_flops * COMPUTE_EFFICIENCY)
    if layout.pp > 1:
        compute *= 1 + (layout.pp - 1) / layout.grad_accum
    t = compute
    if layout.tp > 1:  # 2 all-reduces forward, 2 backward per block, of the block's activations (each
        # as much traffic as 2 all-gathers or reduce-scatters); sequence parallelism: 4 of those
        # forward, 6 backward (each region's input is gathered again)
        units = 10 if layout.tp_sequence_parallel else 8
        volume = units * (layout.tp - 1) / layout.tp * tokens_per_gpu_row * m.d_model * p_bytes
        t += volume * max_blocks_per_stage(m.n_layers, layout.pp) / INTRA_NODE_BW
    if layout.sp > 1:  # all-to-alls of q, k, v and the attention output, forward and backward, per block
        sp, a, kv = layout.sp, m.n_heads * m.head_dim, m.kv_heads * m.head_dim
        volume = 2 * (sp - 1) / sp * tokens_per_gpu_row / sp * (2 * a + 2 * kv) / layout.tp * p_bytes
        bandwidth = INTRA_NODE_BW if sp * layout.tp <= gpus_per_node else INTER_NODE_BW
        t += volume * max_blocks_per_stage(m.n_layers, layout.pp) / bandwidth
    if layout.ep > 1:  # dispatch and combine all-to-alls of the top_k token copies, forward and backward, per MoE block
        s = layout.sp * (layout.tp if layout.tp_sequence_parallel else 1)  # the tokens a rank routes: t/s
        ep, copies = layout.ep, tokens_per_gpu_row / s * m.moe.top_k
        moe_blocks = min(max_blocks_per_stage(m.n_layers, layout.pp), sum(map(m.is_moe_block, range(m.n_layers))))
        volume = 4 * (ep - 1) / ep * copies * m.d_model * p_bytes
        t += volume * moe_blocks / (INTRA_NODE_BW if ep * layout.tp * layout.sp <= gpus_per_node else INTER_NODE_BW)
    replicas = layout.dp * layout.sp  # gradients reduce over dp × sp, the rank's experts over dp × sp / ep
    if replicas > 1:
        n, experts = stage_params(m, layout.tp, layout.pp), stage_expert_params(m, layout.pp)
        ring = 2 * (replicas - 1) / replicas * (n - experts)
        if experts and replicas // layout.ep > 1:
            ring += 2 * (replicas // layout.ep - 1) / (replicas // layout.ep) * experts / layout.ep
        volume = ring * g_bytes + (ring / 2 * p_bytes if layout.zero == 3 else 0.0)
        across_nodes = replicas * layout.tp * layout.pp > gpus_per_node
        t += volume / (INTER_NODE_BW if across_nodes else INTRA_NODE_BW)
    if layout.offload and layout.zero >= 1:  # gradients down, updated weights back up
        t += 2 * stage_params(m, layout.tp, layout.pp) / replicas * 4 / PCIE_BW
    return t


def fits(plan: MemoryPlan, gpu_mem_gib: float) -> bool:
    return plan.total <= FIT_FRACTION * gpu_mem_gib * 2**30


def candidate_layouts(cfg: Config, gpus: int, gpus_per_node: int) -> list[Layout]:
    """Every (dp, sp, tp, pp, ep, zero, micro-batch, checkpointing) that keeps the config's global batch
    and passes the layout check; ep (MoE models only) over the divisors of dp that divide the experts."""
    base = config_layout(cfg, gpus)
    batch = base.micro_batch * base.grad_accum * base.dp
    out = []
    for tp, pp, sp in itertools.product(range(1, gpus_per_node + 1), range(1, gpus + 1), range(1, gpus + 1)):
        if gpus % (tp * pp * sp) or batch % (gpus // (tp * pp * sp)):
            continue
        dp = gpus // (tp * pp * sp)
        per_replica, experts = batch // dp, cfg.model.moe.experts
        eps = [e for e in range(1, dp + 1) if dp % e == 0 and experts % e == 0] if experts else [1]
        for micro_batch, ep in itertools.product((b for b in range(1, per_replica + 1) if per_replica % b == 0), eps):
            for zero in range(1 if dp * sp == 1 else 4):  # ZeRO needs dp × sp > 1
                probe = replace(cfg, parallel=replace(cfg.parallel, engine="deepspeed", tp=tp, pp=pp, sp=sp, ep=ep,
                                                      zero_stage=zero),
                                data=replace(cfg.data, micro_batch=micro_batch),
                                train=replace(cfg.train, grad_accum=per_replica // micro_batch, global_batch=batch))
                if layout_problem(probe, gpus):
                    continue
                for offload, checkpointing in itertools.product((False, True) if zero else (False,),
                                                                (False, "selective", True)):
                    out.append(Layout(dp, tp, pp, zero, sp, micro_batch, per_replica // micro_batch, offload,
                                      checkpointing, tp_sequence_parallel=tp_sequence_parallel(probe), ep=ep))
    return out


def suggest(cfg: Config, gpus: int, gpu_mem_gib: float, peak_flops: float, gpus_per_node: int = 8,
            top: int = 10) -> list[tuple[Layout, MemoryPlan, float]]:
    """The fastest layouts that fit, by estimated step time (ties: less memory first)."""
    m, seq, precision = cfg.model, cfg.data.seq_len, cfg.train.precision
    ranked = []
    for layout in candidate_layouts(cfg, gpus, gpus_per_node):
        plan = memory_plan(m, seq, precision, layout)
        if fits(plan, gpu_mem_gib):
            ranked.append((layout, plan, step_time(m, seq, precision, layout, peak_flops, gpus_per_node)))
    if not ranked:
        raise BigtrainError(f"no layout of {gpus} GPUs with {gpu_mem_gib:g} GiB fits this model and global batch")
    ranked.sort(key=lambda r: (round(r[2], 6), r[1].total))
    return ranked[:top]
