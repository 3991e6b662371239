"""The SwiGLU feed-forward of a dense block (and of a Mixture of Experts' shared experts)."""

from __future__ import annotations

import torch
from torch import nn

from bigtrain.config import ModelConfig
from bigtrain.model.pointwise import swiglu


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), `ffn` wide (default: the model's)."""

    def __init__(self, cfg: ModelConfig, ffn: int | None = None):
        super().__init__()
        ffn = ffn or cfg.ffn_dim
        self.gate_proj = nn.Linear(cfg.d_model, ffn, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
