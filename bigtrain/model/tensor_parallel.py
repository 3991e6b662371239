"""Megatron-style tensor parallelism, applied to a finished `Llama` by swapping its layers.

q/k/v and gate/up are column-parallel (output features split, so each rank owns whole heads),
o_proj and down_proj row-parallel (input features split, output all-reduced), the embedding is
vocab-parallel, and lm_head is column-parallel with its logits left vocab-sharded for
`vocab_parallel_cross_entropy`. RMSNorm weights stay replicated: their inputs are the same on
every rank, so their gradients are too. The model has no dropout and the shards are sliced from
the full, already initialised weights, so no per-rank RNG tracker is needed for correctness.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.errors import BigtrainError
from bigtrain.model.llama import Block, Embedding, Head, Llama


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise a one-line `BigtrainError` unless heads, KV heads, vocabulary and MLP width split by tp."""
    ffn_note = "" if cfg.ffn_hidden else " (derived from model.d_model)"
    sizes = [
        ("model.n_heads", cfg.n_heads, ""),
        ("model.n_kv_heads", cfg.kv_heads, ""),
        ("model.vocab_size", cfg.vocab_size, ""),
        ("model.ffn_hidden", cfg.ffn_dim, ffn_note),
    ]
    for key, size, note in sizes:
        if size % tp:
            raise BigtrainError(f"{key}={size}{note} is not divisible by parallel.tp={tp}")


class _CopyToRegion(torch.autograd.Function):
    """Identity forward, all-reduce backward: the entry to a column-parallel region."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward, identity backward: the output of a row-parallel region."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def copy_to_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron's `copy_to_tensor_model_parallel_region`."""
    return _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Megatron's `reduce_from_tensor_model_parallel_region`."""
    return _ReduceFromRegion.apply(x, group)


def _shard(weight: torch.Tensor, dim: int, group: dist.ProcessGroup) -> nn.Parameter:
    """This rank's slice of `weight` along `dim`, marked as DeepSpeed and Megatron mark TP params.

    `tensor_model_parallel` makes DeepSpeed's gradient-norm code count the shard on every TP rank
    (replicated parameters only on TP rank 0); `partition_dim`/`partition_stride` describe the split.
    """
    shard = weight.detach().chunk(dist.get_world_size(group), dim=dim)[dist.get_rank(group)]
    param = nn.Parameter(shard.clone(memory_format=torch.contiguous_format), weight.requires_grad)
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1
    return param


class ColumnParallelLinear(nn.Module):
    """A bias-free linear holding a slice of the output features; the output stays sharded.

    Its input must already be in the parallel region: `apply_tensor_parallel` copies it in once
    per region (q/k/v share one entry, gate/up another), so backward all-reduces once per region
    rather than once per projection.
    """

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup):
        super().__init__()
        self.weight = _shard(linear.weight, 0, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """A bias-free linear holding a slice of the input features; partial outputs are all-reduced."""

    def __init__(self, linear: nn.Linear, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.weight = _shard(linear.weight, 1, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp_region(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Module):
    """An embedding holding one contiguous vocabulary range; other ids give zeros, then all-reduce."""

    def __init__(self, embedding: nn.Embedding, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.weight = _shard(embedding.weight, 0, group)
        self.vocab_start = dist.get_rank(group) * self.weight.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp_region(x.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


def _enter_region_on_input(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Pass `module`'s first input through `copy_to_tp_region` (as torchtitan's PrepareModuleInput)."""
    module.register_forward_pre_hook(lambda _, args: (copy_to_tp_region(args[0], group), *args[1:]))


def shard_layer(layer: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Shard one layer of the list (embedding, block or head) in place across `group`; returns it.

    A head whose weight is tied to the embedding gets a sharded copy here: re-tie it to the
    sharded embedding afterwards (as `apply_tensor_parallel` does).
    """
    if isinstance(layer, Embedding):
        layer.embed_tokens = VocabParallelEmbedding(layer.embed_tokens, group)
    elif isinstance(layer, Block):
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = (
            ColumnParallelLinear(lin, group) for lin in (attn.q_proj, attn.k_proj, attn.v_proj)
        )
        attn.o_proj = RowParallelLinear(attn.o_proj, group)
        mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, group)
        mlp.up_proj = ColumnParallelLinear(mlp.up_proj, group)
        mlp.down_proj = RowParallelLinear(mlp.down_proj, group)
        _enter_region_on_input(attn, group)
        _enter_region_on_input(mlp, group)
    elif isinstance(layer, Head):
        layer.lm_head = ColumnParallelLinear(layer.lm_head, group)
        _enter_region_on_input(layer.lm_head, group)
    else:
        raise TypeError(f"cannot shard a {type(layer).__name__}")
    return layer


def apply_tensor_parallel(model: Llama, group: dist.ProcessGroup) -> Llama:
    """Shard `model` in place across `group` by slicing its full weights; returns the model.

    Each rank then computes exactly what the full model does, except that the logits are
    vocab-sharded: use `vocab_parallel_cross_entropy` instead of `lm_loss`.
    """
    check_tensor_parallel(model.cfg, dist.get_world_size(group))
    embedding, head = model.layers[0], model.layers[-1]
    tied = head.lm_head.weight is embedding.embed_tokens.weight
    for layer in model.layers:
        shard_layer(layer, group)
    if tied:
        head.lm_head.weight = embedding.embed_tokens.weight
    return model


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup):
        x = logits.float()
        max_logit = x.max(dim=-1, keepdim=True).values
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        x = x - max_logit
        exp = x.exp()
        sum_exp = exp.sum(dim=-1, keepdim=True)
        dist.all_reduce(sum_exp, group=group)

        local = targets - dist.get_rank(group) * x.shape[-1]
        outside = (local < 0) | (local >= x.shape[-1])
        local = local.masked_fill(outside, 0).unsqueeze(-1)
        target_logit = x.gather(-1, local).masked_fill(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(target_logit, group=group)

        ctx.save_for_backward(exp.div_(sum_exp), local, outside)
        ctx.logits_dtype = logits.dtype
        return (sum_exp.log() - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, local, outside = ctx.saved_tensors
        grad_logits = softmax.scatter_add(-1, local, -(~outside).unsqueeze(-1).to(softmax.dtype))
        return (grad_logits * (grad / local.numel())).to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """Mean cross-entropy of vocab-sharded logits [b, t, V/tp] (fp32), never gathering the vocabulary.

    Equals `lm_loss` on the gathered logits; each rank's gradient is softmax − one-hot on its shard.
    """
    return _VocabParallelCrossEntropy.apply(logits, targets, group)
