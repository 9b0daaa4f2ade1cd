"""The torch reference of triton_gemv's fused small-batch linears, with the same signatures: the
elementwise reference, then the matmul. The CPU tests run the model's fused path through these."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.kernels.activation_ref import silu_and_mul_ref
from pdserve.kernels.norm_ref import fused_add_rms_norm_ref

MAX_ROWS = 4


def gemv(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N]
    return F.linear(x, weight, bias)


def add_norm_gemv(
    x: torch.Tensor,  # [M, K]
    residual: torch.Tensor,  # [M, K]
    gamma: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(x + residual) W^T + b, x + residual)
    normed, summed = fused_add_rms_norm_ref(x, residual, gamma, eps)
    return F.linear(normed, weight, bias), summed


def silu_mul_gemv(
    gate_up: torch.Tensor,  # [M, 2 K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [M, N]
    return F.linear(silu_and_mul_ref(gate_up), weight, bias)
