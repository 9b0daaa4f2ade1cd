"""RMSNorm and the fused residual-add + RMSNorm that every decoder layer runs twice."""

from __future__ import annotations

import torch


def rms_norm_ref(
    x: torch.Tensor,  # [..., N]
    weight: torch.Tensor,  # [N]
    eps: float,
) -> torch.Tensor:  # [..., N], x's dtype
    # Statistics in float32; the weight is applied after casting back, as Hugging Face does, so
    # half-precision results round the same way.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor,  # [T, N]: a sublayer's output
    residual: torch.Tensor,  # [T, N]: the residual stream before x
    weight: torch.Tensor,  # [N]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(x + residual), x + residual)
    summed = x + residual  # in the model dtype, like the unfused model
    return rms_norm_ref(summed, weight, eps), summed
