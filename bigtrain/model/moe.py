"""The Mixture-of-Experts feed-forward of Qwen3-MoE and DeepSeekMoE: a softmax router picks each
token's top-k of many small SwiGLU experts (optionally renormalising their probabilities), an
optional shared MLP sees every token, and the routed outputs are summed weighted by probability.

Dispatch sorts the token copies by expert, runs every expert on its contiguous rows (one grouped
matmul: `torch._grouped_mm` on CUDA, a loop over experts elsewhere, the same numbers), then scatters
the weighted rows back. Expert parallelism plugs in between (`MoE.exchange`, set by
`bigtrain.parallel.expert_parallel`): the sorted rows travel to the rank that holds their expert and
back. The load-balancing loss (Switch/GShard, normalised as Megatron-Core's: 1 when balanced) and
the router z-loss (ST-MoE) reach the gradients through `AuxiliaryLoss`, which adds their gradient in
backward without touching the language-model loss, so they work in every engine and pipeline stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.compat import in_backward
from bigtrain.config import ModelConfig
from bigtrain.model.mlp import MLP
from bigtrain.model.pointwise import compute_dtype, swiglu


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None) -> torch.Tensor:
    """Rows of `x` [n, k], grouped by expert (`counts` [E] rows each, in order), times their expert's
    `w` [E, k, m]: one `torch._grouped_mm` (`grouped`; default on CUDA) or a loop over experts."""
    if grouped if grouped is not None else x.is_cuda:
        return torch._grouped_mm(x, w, offs=counts.cumsum(0).to(torch.int32))
    return torch.cat([rows @ w[e] for e, rows in enumerate(x.split(counts.tolist()))])


class GroupedExperts(nn.Module):
    """`experts` SwiGLU MLPs as three stacked weights, in the layout of `nn.Linear` per expert:
    gate_proj and up_proj [experts, ffn, d_model], down_proj [experts, d_model, ffn]."""

    def __init__(self, experts: int, d_model: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(experts, ffn, d_model))
        self.up_proj = nn.Parameter(torch.empty(experts, ffn, d_model))
        self.down_proj = nn.Parameter(torch.empty(experts, d_model, ffn))

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [n, d_model] grouped by expert, `counts` [experts] rows each → [n, d_model]."""
        dtype = compute_dtype(x)
        x = x.to(dtype)
        weight = {name: getattr(self, name).to(dtype).transpose(1, 2) for name in ("gate_proj", "up_proj", "down_proj")}
        hidden = swiglu(grouped_mm(x, weight["gate_proj"], counts), grouped_mm(x, weight["up_proj"], counts))
        return grouped_mm(hidden, weight["down_proj"], counts)


class AuxiliaryLoss(torch.autograd.Function):
    """Identity on `x`; in backward, `loss` gets the gradient `scale` (its weight in the step's
    mean loss: 1 / micro-batches), as if `scale · loss` had been added to the objective."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, device=grad.device), None


class RouterStats:
    """What a router saw in training forward passes (not recomputes) since the last `take`, summed
    on the device (no host sync per step): FIELDS, then token copies per expert."""

    FIELDS = ("passes", "aux_loss", "z_loss", "dropped", "routed")

    def __init__(self):
        self.sums: torch.Tensor | None = None

    def add(self, routed: torch.Tensor, aux: torch.Tensor, z: torch.Tensor, dropped: torch.Tensor,
            share: float = 1.0) -> None:
        """One forward pass, of which this rank saw `share` of the tokens (and computed that part of the losses)."""
        head = torch.stack([torch.full_like(aux, share), aux, z, dropped.float(), routed.sum().float()]).detach()
        row = torch.cat([head, routed.float()])
        self.sums = row if self.sums is None else self.sums + row

    def take(self) -> torch.Tensor | None:
        sums, self.sums = self.sums, None
        return sums


class MoE(nn.Module):
    """Top-k routed experts (+ shared experts) in place of the MLP of block `block`."""

    def __init__(self, cfg: ModelConfig, block: int = 0):
        super().__init__()
        moe = cfg.moe
        self.index = sum(cfg.is_moe_block(b) for b in range(block))  # this block's place among the MoE blocks
        self.experts_total, self.top_k, self.normalize = moe.experts, moe.top_k, moe.normalize_top_k
        self.capacity_factor, self.aux_coeff, self.z_coeff = moe.capacity_factor, moe.aux_loss, moe.z_loss
        self.router = nn.Linear(cfg.d_model, moe.experts, bias=False)
        self.experts = GroupedExperts(moe.experts, cfg.d_model, cfg.expert_ffn_dim)
        self.shared_experts = None
        if moe.shared_experts:
            self.shared_experts = MLP(cfg, moe.shared_experts * cfg.expert_ffn_dim)
        # expert parallelism: sorted rows, counts per global expert → rows of the local experts,
        # their counts, and the way back (None: every expert is here)
        self.exchange: Callable | None = None
        self.loss_scale = 1.0  # the auxiliary losses' weight in the step's loss (engines set 1 / micro-batches)
        # when a micro-batch's tokens are split over ranks (sequence parallelism): sums a tensor over
        # them, so the balance loss sees every token's routing; this rank's share of the tokens
        self.token_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.token_share = 1.0
        self.stats = RouterStats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        with torch.autocast(h.device.type, enabled=False):  # routing in fp32
            logits = F.linear(h.float(), self.router.weight.float())
        probs = logits.softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # token copies sorted by expert, in token order within one
        routed = torch.bincount(flat, minlength=self.experts_total)
        order, counts = self._within_capacity(order, routed, h.shape[0])
        tokens = order // self.top_k
        rows = h[tokens].to(compute_dtype(h))  # (cast before any exchange: half the bytes under bf16)
        if self.exchange is None:
            y = self.experts(rows, counts)
        else:
            local_rows, local_counts, back = self.exchange(rows, counts)
            y = back(self.experts(local_rows, local_counts))
        y = y * weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
        out = torch.zeros(h.shape, dtype=y.dtype, device=h.device).index_add_(0, tokens, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(h)
        if self.training and torch.is_grad_enabled():
            out = self._auxiliary(out, logits, probs, routed, routed.sum() - counts.sum())
        return out.view(shape)

    def _within_capacity(self, order: torch.Tensor, routed: torch.Tensor, n_tokens: int):
        """The sorted token copies each expert takes (all of them when dropless) and their counts."""
        if self.capacity_factor is None:
            return order, routed
        capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.experts_total)
        starts = routed.cumsum(0) - routed
        expert = torch.repeat_interleave(torch.arange(self.experts_total, device=routed.device), routed)
        keep = torch.arange(order.numel(), device=order.device) - starts[expert] < capacity
        return order[keep], routed.clamp(max=capacity)

    def _auxiliary(self, out: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor, routed: torch.Tensor,
                   dropped: torch.Tensor) -> torch.Tensor:
        """Attach the weighted auxiliary losses' gradient to `out`; record the router's statistics
        (once: not again when activation checkpointing recomputes the forward). With tokens split
        over ranks, each computes its part of both losses from the counts of all (their sum over
        the ranks is the loss of the whole micro-batch, and so are the gradients)."""
        counts = torch.cat([routed.float(), routed.new_full((1,), probs.shape[0], dtype=torch.float)])
        if self.token_sum is not None:
            counts = self.token_sum(counts)
        counts, n = counts[:-1], counts[-1]
        aux = self.experts_total / (n * n * self.top_k) * (counts * probs.sum(0)).sum()
        z = logits.logsumexp(dim=-1).square().sum() / n
        if not in_backward():
            self.stats.add(routed, aux, z, dropped, self.token_share)
        if self.aux_coeff or self.z_coeff:
            out = AuxiliaryLoss.apply(out, self.aux_coeff * aux + self.z_coeff * z, self.loss_scale)
        return out


def moe_layers(module: nn.Module) -> list[MoE]:
    return [m for m in module.modules() if isinstance(m, MoE)]


def take_router_stats(module: nn.Module, cfg: ModelConfig) -> torch.Tensor:
    """[MoE blocks, RouterStats.FIELDS + experts]: what each MoE block of `module` saw since the
    last call (zero rows for blocks held elsewhere, so ranks can sum their tables)."""
    rows = sum(cfg.is_moe_block(b) for b in range(cfg.n_layers))
    table = torch.zeros(rows, len(RouterStats.FIELDS) + cfg.moe.experts, dtype=torch.float64)
    for layer in moe_layers(module):
        sums = layer.stats.take()
        if sums is not None:
            table[layer.index] += sums.double().cpu()
    return table


def set_auxiliary_scale(module: nn.Module, scale: float) -> None:
    """Weight the auxiliary losses of every MoE layer in `module` by `scale` (1 / micro-batches)."""
    for layer in moe_layers(module):
        layer.loss_scale = scale
