"""Small-batch linear layers (y = x W^T) with the elementwise op before them fused in.

At decode batch 1 a linear layer is a matrix-vector product that reads its weight once, and the
elementwise kernel before it (the residual add + RMSNorm before q/k/v and gate/up, the SiLU-and-mul
before down_proj) is a separate launch of a few microseconds that reads a few kilobytes. Here each
program computes BLOCK_N outputs over the whole of K, so the fused prologue runs in every program on
the (L2-resident) input row: the residual add + RMSNorm accumulates the row's statistics beside the
product, the SiLU-and-mul computes its activations, and the separate launch is gone.

Products accumulate in float32. The residual sum and the activation are rounded to the model dtype
as in the unfused torch path (`norm_ref.py`, `activation_ref.py`); the RMSNorm's 1 / rms, one
factor per row, multiplies the finished sums (the unfused path rounds the normalized row to the
model dtype first: the two differ by that rounding, within bf16's error).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_ROWS = 4  # the largest M these kernels take; callers fall back to the GEMM above it

_PLAIN, _ADD_NORM, _SILU_MUL = 0, 1, 2


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] (PROLOGUE 0, 1) or [M, 2 K] gate | up (PROLOGUE 2)
    res_ptr,  # [M, K]: the residual stream (PROLOGUE 1)
    gamma_ptr,  # [K]: the RMSNorm weight (PROLOGUE 1)
    w_ptr,  # [N, K]
    bias_ptr,  # [N] (HAS_BIAS)
    out_ptr,  # [M, N]
    res_out_ptr,  # [M, K]: x + residual (PROLOGUE 1; written by program 0)
    M,
    N,
    K,
    stride_xm,
    stride_rm,
    stride_wn,
    stride_om,
    stride_ro,
    eps,
    PROLOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm  # [BLOCK_M, 1]
    sum_sq = tl.zeros((BLOCK_M,), tl.float32)  # PROLOGUE 1: the rows' sums of squares
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        mk = m_mask[:, None] & k_mask[None, :]
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        if PROLOGUE == 0:
            xv = tl.load(x_rows + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
        elif PROLOGUE == 1:
            # The norm's 1 / rms scales a whole row, so it is applied to the sums at the end:
            # one pass over K, the weight's loads never wait for the row's statistics.
            xv = tl.load(x_rows + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
            rv = tl.load(
                res_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mk, other=0.0
            ).to(tl.float32)
            summed = (xv + rv).to(dtype)  # rounded as the unfused residual stream is
            if pid == 0:
                tl.store(
                    res_out_ptr + offs_m[:, None] * stride_ro + offs_k[None, :], summed, mask=mk
                )
            s32 = summed.to(tl.float32)
            sum_sq += tl.sum(s32 * s32, axis=1)
            gamma = tl.load(gamma_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            xv = s32 * gamma[None, :]
        else:
            gate = tl.load(x_rows + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
            up = tl.load(x_rows + K + offs_k[None, :], mask=mk, other=0.0).to(tl.float32)
            xv = (gate * tl.sigmoid(gate) * up).to(dtype).to(tl.float32)
        acc += w[None, :, :] * xv[:, None, :]
    out = tl.sum(acc, axis=2)  # [BLOCK_M, BLOCK_N]
    if PROLOGUE == 1:
        out *= tl.rsqrt(sum_sq / K + eps)[:, None]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def default_config(n: int, k: int, rows: int) -> GemvConfig:
    """Enough programs to keep every SM's loads in flight (~2 per SM on an H100/H200 for the
    smaller projections), with the per-program accumulator bounded as rows grow."""
    block_k = 256 if rows == 1 else 128
    block_n = 8 if n <= 8192 else 16
    return GemvConfig(block_n, block_k, 4, 3)


def _rows(name: str, t: torch.Tensor, cols: int) -> torch.Tensor:
    if t.dim() != 2 or t.shape[1] != cols or t.stride(1) != 1:
        raise ValueError(
            f"{name} must be [M, {cols}] with unit column stride, got {tuple(t.shape)}"
        )
    return t


def _launch(
    prologue: int,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    gamma: torch.Tensor | None,
    eps: float,
    config: GemvConfig | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(
            f"weight must be [N, K] with unit column stride, got {tuple(weight.shape)}"
        )
    n, k = weight.shape
    if x.dtype not in _DTYPES or x.dtype != weight.dtype:
        raise ValueError(f"x ({x.dtype}) and weight ({weight.dtype}) must share one of {_DTYPES}")
    _rows("x", x, 2 * k if prologue == _SILU_MUL else k)
    m = x.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows, got {m}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = None
    if prologue == _ADD_NORM:
        assert residual is not None and gamma is not None
        _rows("residual", residual, k)
        if residual.shape[0] != m or gamma.shape != (k,):
            raise ValueError(f"residual must be [{m}, {k}] and the norm weight [{k}]")
        res_out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    cfg = config or default_config(n, k, m)
    grid = (triton.cdiv(n, cfg.block_n),)
    _gemv_kernel[grid](
        x,
        residual if residual is not None else x,
        gamma if gamma is not None else x,
        weight,
        bias if bias is not None else weight,
        out,
        res_out if res_out is not None else out,
        m,
        n,
        k,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        weight.stride(0),
        out.stride(0),
        res_out.stride(0) if res_out is not None else 0,
        eps,
        PROLOGUE=prologue,
        HAS_BIAS=bias is not None,
        BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, res_out


def gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_ROWS
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: GemvConfig | None = None,
) -> torch.Tensor:  # [M, N] = x W^T + b
    return _launch(_PLAIN, x, weight, bias, None, None, 0.0, config)[0]


def add_norm_gemv(
    x: torch.Tensor,  # [M, K]: a sublayer's output
    residual: torch.Tensor,  # [M, K]: the residual stream before it
    gamma: torch.Tensor,  # [K]: the RMSNorm weight
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(x + residual) W^T + b, x + residual)
    out, res_out = _launch(_ADD_NORM, x, weight, bias, residual, gamma, eps, config)
    assert res_out is not None
    return out, res_out


def silu_mul_gemv(
    gate_up: torch.Tensor,  # [M, 2 K]: gate | up
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:  # [M, N] = (silu(gate) * up) W^T + b
    return _launch(_SILU_MUL, gate_up, weight, bias, None, None, 0.0, config)[0]
