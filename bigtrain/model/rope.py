"""RoPE inverse frequencies, plain or scaled to extend the context (`model.rope_scaling`).

Both rules match transformers' `ROPE_INIT_FUNCTIONS` (`_compute_llama3_parameters`,
`_compute_yarn_parameters`) number for number, so converted models agree with Hugging Face's:

- llama3 (Llama 3.1, Meta's `apply_scaling`): wavelengths shorter than original/high_freq_factor
  keep their frequency, those longer than original/low_freq_factor are divided by `factor`, and the
  band between blends the two linearly in original/wavelength.
- yarn (Peng et al. 2023, "YaRN: Efficient Context Window Extension of Large Language Models",
  arXiv:2309.00071): "NTK-by-parts" — dimensions that turn fewer than beta_slow times over the
  original context are interpolated (divided by `factor`), those turning more than beta_fast times
  kept, a linear ramp between; cos and sin are multiplied by the attention factor
  0.1·ln(factor) + 1 (or mscale's ratio, or the configured value).
"""

from __future__ import annotations

import math

import torch

from bigtrain.config import RopeScalingConfig


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScalingConfig | None = None,
                        device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] in float32, the factor cos and sin are multiplied by)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq, 1.0
    if scaling.type == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    return _yarn(inv_freq.device, head_dim, theta, scaling), yarn_attention_factor(scaling)


def _llama3(inv_freq: torch.Tensor, s: RopeScalingConfig) -> torch.Tensor:
    low, high = s.low_freq_factor, s.high_freq_factor
    old = s.original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / s.factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(device, head_dim: int, theta: float, s: RopeScalingConfig) -> torch.Tensor:
    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the original context
        return head_dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp  # 1: extrapolate (the original frequency), 0: interpolate (divided by factor)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    return 1.0 / (s.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


def yarn_attention_factor(s: RopeScalingConfig) -> float:
    """YaRN's cos/sin scale: the configured one, else mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) when both are set, else 0.1·ln(factor) + 1."""
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim)
    return mscale(s.factor)
