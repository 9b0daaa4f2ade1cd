"""Rotary position embedding (RoPE), rotate-half ("neox") layout as in Llama, Mistral and Qwen.

Includes Llama-3's frequency scaling. The cos/sin cache is float32 whatever the model dtype, so long
positions keep their precision.
"""

from __future__ import annotations

import math

import torch

from pdserve.config.engine_config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """[head_dim // 2] float32, cpu: the rotation speed of each pair of dimensions."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling.rope_type == "default":
        return inv_freq
    if scaling.rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(
        f"rope_type={scaling.rope_type!r} is not supported: expected 'default' or 'llama3'"
    )


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Slow (long-wavelength) dimensions are stretched by `factor`, fast ones kept, the band between
    interpolated smoothly; this is how Llama 3.1 reaches 128k context from 8k pretraining."""
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    theta: float,
    scaling: RopeScaling,
    device: torch.device | str,
) -> torch.Tensor:  # [max_positions, head_dim] float32: cos in the first half, sin in the second
    inv_freq = rope_inv_freq(head_dim, theta, scaling)  # [D/2]
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)  # [max_positions, D/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def apply_rotary_ref(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int64
    cos_sin_cache: torch.Tensor,  # [max_positions, D] float32
) -> tuple[torch.Tensor, torch.Tensor]:  # q, k rotated, in their own dtypes
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D/2]: the same rotation for every head
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # [T, H, D/2]: dimension i pairs with i + D/2
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated.to(x.dtype)
