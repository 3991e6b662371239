"""µP, the Maximal Update Parametrization for Adam (Yang et al., "Tensor Programs V: Tuning Large
Neural Networks via Zero-Shot Hyperparameter Transfer", 2021, Table 3, in the output-multiplier form
of its `mup` package's `MuReadout`): every rule that makes a wider model train like its base.

With width multiplier m = d_model / model.mup_base_width:

- hidden matrices (attention q/k/v/o, the MLP's and experts' gate/up/down): init std / sqrt(m)
  (std ∝ 1/sqrt(fan_in), equal to the base model's at m = 1), Adam learning rate lr / m;
- the MoE router (width in, a fixed number of experts out: output-like): init std / m, lr / m;
- the embedding, norms and the LM head: init and learning rate unchanged; the logits are multiplied
  by 1/m (the output multiplier) instead;
- attention scores are scaled by 1/head_dim instead of 1/sqrt(head_dim) (head_dim stays fixed as
  width grows; the number of heads grows with it).

Under `model.parametrization: standard` every multiplier is 1 and attention uses 1/sqrt(head_dim).
At m = 1 µP differs from standard parametrization in the attention scale only.
"""

from __future__ import annotations

import dataclasses
import math

from bigtrain.config import ModelConfig

HIDDEN = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
          "gate_proj.weight", "up_proj.weight", "down_proj.weight",
          "experts.gate_proj", "experts.up_proj", "experts.down_proj")
ROUTER = ("router.weight",)


def width_multiplier(cfg: ModelConfig) -> float:
    """m = d_model / mup_base_width under µP; 1 under standard parametrization."""
    return cfg.d_model / cfg.mup_base_width if cfg.parametrization == "mup" else 1.0


def init_multiplier(cfg: ModelConfig, name: str) -> float:
    """What µP multiplies parameter `name`'s initial std by: 1/sqrt(m) for hidden matrices, 1/m
    for the router, 1 for the rest."""
    m = width_multiplier(cfg)
    if name.endswith(HIDDEN):
        return 1 / math.sqrt(m)
    return 1 / m if name.endswith(ROUTER) else 1.0


def lr_multiplier(cfg: ModelConfig, name: str) -> float:
    """What µP multiplies parameter `name`'s Adam learning rate by: 1/m for hidden matrices and the
    router (matrices whose fan-in grows with width), 1 for the embedding, head and norms."""
    return 1 / width_multiplier(cfg) if name.endswith(HIDDEN + ROUTER) else 1.0


def output_multiplier(cfg: ModelConfig) -> float:
    """The factor on the logits: 1/m."""
    return 1 / width_multiplier(cfg)


def attention_scale(cfg: ModelConfig) -> float | None:
    """The attention scores' scale: 1/head_dim under µP; None (SDPA's 1/sqrt(head_dim)) otherwise."""
    return 1 / cfg.head_dim if cfg.parametrization == "mup" else None


def widened(cfg: ModelConfig, width: int, parametrization: str | None = None) -> ModelConfig:
    """`cfg` at d_model `width` the way µP widens a model: head_dim fixed (more heads, the same
    query/key-value grouping), the feed-forward width in proportion; `parametrization` when given.
    The base width (`mup_base_width`) stays, so m = width / mup_base_width."""
    head_dim, group = cfg.head_dim, cfg.n_heads // cfg.kv_heads
    if width % (head_dim * group):
        raise ValueError(f"width {width} is not a multiple of head_dim × heads per kv head = {head_dim * group}")
    n_heads = width // head_dim
    return dataclasses.replace(
        cfg, d_model=width, n_heads=n_heads, n_kv_heads=n_heads // group, head_dim=head_dim,
        ffn_hidden=max(1, round(cfg.ffn_dim * width / cfg.d_model)),
        parametrization=parametrization or cfg.parametrization)
