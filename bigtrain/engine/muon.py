"""Muon (`train.optimizer: muon`): Newton–Schulz orthogonalised Nesterov momentum for the hidden
matrices of the blocks, torch's AdamW for everything else (embedding, head, norms, the MoE
feed-forward), in one optimizer whose `state_dict` is a plain tensor dict.

The update of a hidden matrix W (A × B) follows Keller Jordan's reference with Moonlight's RMS
matching (Liu et al. 2025, "Muon is scalable for LLM training"), so `train.lr` and
`train.weight_decay` mean what they mean for AdamW:

    m ← β·m + (1−β)·g          u = (1−β)·g + β·m   (Nesterov, β = `train.muon_momentum`)
    O = NS₅(u)                  5 quintic Newton–Schulz steps, (a, b, c) = (3.4445, −4.7750, 2.0315)
    W ← W·(1 − lr·wd) − lr · 0.2·√max(A, B) · O

Newton–Schulz needs the whole matrix. Under tensor parallelism each rank holds a slice: the
momentum-blended update `u` is all-gathered along the weight's split dimension
(`parallel.layout.tp_split_dim`), orthogonalised whole on every tp rank and sliced back. Under
ZeRO 1/2 the optimizer holds one flat fp32 partition per group: `u` (elementwise, so computed on
the partition) is all-gathered over the data-parallel group into the group's flat buffer, every
matrix is cut out of it at DeepSpeed's offsets and orthogonalised (every rank computes all of
them: exact and simple, at dp× redundant Newton–Schulz work), and each rank applies its own
partition of the result. Momentum stays partitioned. A skipped step (`found_inf` set to 1, or the
step not called) leaves weights and momentum unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.parallel.layout import in_moe, tp_split_dim

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
RMS_MATCH = 0.2  # Moonlight: 0.2·√max(A, B)·O has about AdamW's update RMS
HIDDEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """Whether Muon updates parameter `name`: the 2-D attention and dense-MLP weights of the blocks.
    The embedding, head, norms and the MoE feed-forward (router, 3-D expert stacks, shared experts)
    stay with AdamW."""
    parts = name.split(".")
    return p.dim() == 2 and len(parts) >= 2 and parts[-2] in HIDDEN and not in_moe(name)


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The quintic Newton–Schulz approximation of U·Vᵀ (G = U·S·Vᵀ): singular values land near 1
    (roughly 0.7–1.2). bf16 on CUDA, fp32 elsewhere; returned in g's dtype."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if tall else x).to(g.dtype)


def rms_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """Moonlight's factor 0.2·√max(A, B) for a full A × B matrix."""
    return RMS_MATCH * math.sqrt(max(shape[0], shape[1]))


@dataclass
class Matrix:
    """One hidden matrix as this rank holds it: its local shape, and how tensor parallelism split
    it (`split_dim` None: whole here)."""

    shape: torch.Size
    split_dim: int | None = None
    tp_group: Any = None

    def orthogonalised(self, u: torch.Tensor) -> torch.Tensor:
        """0.2·√max(A, B)·NS(full u), this rank's slice of it."""
        if self.split_dim is None or self.tp_group is None:
            return newton_schulz(u) * rms_scale(u.shape)
        tp, rank = dist.get_world_size(self.tp_group), dist.get_rank(self.tp_group)
        parts = [torch.empty_like(u) for _ in range(tp)]
        dist.all_gather(parts, u.contiguous(), group=self.tp_group)
        full = torch.cat(parts, dim=self.split_dim)
        return (newton_schulz(full) * rms_scale(full.shape)).chunk(tp, dim=self.split_dim)[rank]


@dataclass
class FlatPartition:
    """A ZeRO 1/2 group as the optimizer holds it: one flat partition of `size` elements, rank
    `rank` of `group`; the group's matrices start at `offsets` in the flat buffer."""

    matrices: list[Matrix]
    offsets: list[int]
    size: int
    group: Any
    rank: int
    world: int


class Muon(torch.optim.Optimizer):
    """Muon for the groups marked `muon: True`, torch's AdamW (sharing this optimizer's `state`
    and group dicts) for the others. `matrices[i]` describes group i's parameters (Muon groups
    only); `flatten` switches a group to ZeRO's flat partition."""

    def __init__(self, groups: list[dict], matrices: dict[int, list[Matrix]], lr: float, momentum: float,
                 adamw_kwargs: dict[str, Any]):
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": 0.0, "muon": False,
                                  "fused": bool(adamw_kwargs.get("fused"))})
        self.matrices = matrices
        self._matrix_of = {id(p): m for i, g in enumerate(self.param_groups) if g["muon"]
                           for p, m in zip(g["params"], matrices[i], strict=True)}
        self.flat: dict[int, FlatPartition] = {}
        adam_groups = [g for g in self.param_groups if not g["muon"]]
        self.adamw = torch.optim.AdamW(adam_groups, lr=lr, **adamw_kwargs) if adam_groups else None
        self._link()

    def _link(self) -> None:
        """The inner AdamW works on this optimizer's group dicts and state (`load_state_dict` replaces both)."""
        if self.adamw is not None:
            self.adamw.param_groups = [g for g in self.param_groups if not g["muon"]]
            self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    def flatten(self, index: int, params: list[torch.Tensor], offsets: list[int], size: int, group: Any) -> None:
        """ZeRO-1/2 now hands group `index` to `step` as this rank's flat partition of `size`
        elements, partitioned over process group `group`: `params` (this group's, at construction)
        start at `offsets` in the whole flat buffer."""
        matrices = [self._matrix_of[id(p)] for p in params]
        self.flat[index] = FlatPartition(matrices, offsets, size, group, dist.get_rank(group), dist.get_world_size(group))

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = getattr(self, "found_inf", None)  # 1.0: skip on the device (fused AdamW's protocol)
        grad_scale = getattr(self, "grad_scale", None)  # gradients are divided by it (fused AdamW's protocol)
        self._link()
        if self.adamw is not None:
            fused = bool(self.adamw.defaults.get("fused"))
            self.adamw.found_inf = found_inf if fused else None
            self.adamw.grad_scale = grad_scale if fused else None
            if fused or found_inf is None or not bool(found_inf):
                self.adamw.step()
        keep = None if found_inf is None else found_inf == 0
        for index, group in enumerate(self.param_groups):
            if not group["muon"]:
                continue
            if index in self.flat:
                self._step_flat(group, self.flat[index], keep, grad_scale)
            else:
                for p, matrix in zip(group["params"], self.matrices[index], strict=True):
                    u = self._nesterov(p, group, keep, grad_scale)
                    self._apply(p, matrix.orthogonalised(u), group, keep)
        return None

    def _nesterov(self, p: torch.Tensor, group: dict, keep: torch.Tensor | None,
                  grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Update the momentum (unless `keep` is False) and return the Nesterov blend u."""
        grad = p.grad if p.grad is not None else torch.zeros_like(p)  # every rank joins the gathers
        if grad_scale is not None:
            grad = grad / grad_scale
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m, beta = state["momentum_buffer"], group["momentum"]
        new_m = m.lerp(grad, 1 - beta)
        m.copy_(new_m if keep is None else torch.where(keep, new_m, m))
        return grad.lerp(new_m, beta)

    def _apply(self, p: torch.Tensor, update: torch.Tensor, group: dict, keep: torch.Tensor | None) -> None:
        new_p = p * (1 - group["lr"] * group["weight_decay"]) - group["lr"] * update
        p.copy_(new_p if keep is None else torch.where(keep, new_p, p))

    def _step_flat(self, group: dict, flat: FlatPartition, keep: torch.Tensor | None,
                   grad_scale: torch.Tensor | None) -> None:
        (p,) = group["params"]
        u = self._nesterov(p, group, keep, grad_scale)
        parts = [torch.empty_like(u) for _ in range(flat.world)]
        dist.all_gather(parts, u.contiguous(), group=flat.group)
        whole = torch.cat(parts)
        update = torch.zeros_like(whole)
        for matrix, offset in zip(flat.matrices, flat.offsets, strict=True):
            n = matrix.shape.numel()
            update[offset:offset + n] = matrix.orthogonalised(whole[offset:offset + n].view(matrix.shape)).flatten()
        self._apply(p, update[flat.rank * flat.size:(flat.rank + 1) * flat.size], group, keep)


def muon_groups(model: nn.Module, groups: list[dict], names: dict[int, str] | None = None,
                tp_group: Any = None) -> tuple[list[dict], dict[int, list[Matrix]]]:
    """Each of AdamW's `groups` split in two: its hidden matrices in a group marked `muon` (first,
    keeping the group's other settings: weight decay, a learning-rate scale), the rest in one for
    AdamW; with each Muon group's `Matrix` descriptions. `names` maps `id(param)` to its name in the
    one-process model (default: `model`'s own names); `tp_group` is given under tensor parallelism."""
    names = names or {id(p): n for n, p in model.named_parameters()}
    muon, adamw, matrices = [], [], {}
    for group in groups:
        hidden = [p for p in group["params"] if is_hidden_matrix(names[id(p)], p)]
        rest = [p for p in group["params"] if not is_hidden_matrix(names[id(p)], p)]
        if hidden:
            matrices[len(muon)] = [Matrix(p.shape, tp_split_dim(names[id(p)]), tp_group) for p in hidden]
            muon.append({**group, "params": hidden, "muon": True})
        if rest:
            adamw.append({**group, "params": rest, "muon": False})
    return [*muon, *adamw], matrices


def build_muon(model: nn.Module, groups: list[dict], cfg: Any, adamw_kwargs: dict[str, Any],
               names: dict[int, str] | None = None, tp_group: Any = None) -> Muon:
    """`Muon` over AdamW's `groups` of `model` with `train.*` settings `cfg` (see `muon_groups`)."""
    groups, matrices = muon_groups(model, groups, names, tp_group)
    return Muon(groups, matrices, cfg.lr, cfg.muon_momentum,
                {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, **adamw_kwargs})
