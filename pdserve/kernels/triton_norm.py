"""Triton RMSNorm and fused residual-add + RMSNorm, one program per row.

Rounds like the torch reference (`norm_ref.py`): statistics in float32, the normalized row cast to
the input dtype before the weight is applied, the residual sum rounded to the model dtype before its
norm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.launch_math import next_power_of_2

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_BLOCK = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, N]
    residual_ptr,  # [T, N] (only when HAS_RESIDUAL)
    weight_ptr,  # [N]
    out_ptr,  # [T, N]
    sum_out_ptr,  # [T, N]: x + residual (only when HAS_RESIDUAL)
    n_cols,
    eps,
    stride_x,
    stride_r,
    stride_o,
    stride_s,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(sum_out_ptr.dtype.element_ty)
        tl.store(sum_out_ptr + row * stride_s + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_o + offs, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask
    )


def _as_rows(name: str, t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """[..., N] -> a [T, N] view with unit column stride (never a copy, so in-place writes land)."""
    if t.dim() < 1 or t.shape[-1] != n_cols:
        raise ValueError(f"{name} must be [..., {n_cols}], got shape {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} needs a contiguous last dimension, got strides {t.stride()}")
    try:
        return t.view(-1, n_cols)
    except RuntimeError as e:
        raise ValueError(f"{name} with strides {t.stride()} cannot be viewed as rows") from e


def _check(x: torch.Tensor, weight: torch.Tensor) -> int:
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"x and weight must be one of {_DTYPES}, got {x.dtype}, {weight.dtype}")
    if weight.dim() != 1 or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [N] tensor, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}")
    n_cols = weight.shape[0]
    if next_power_of_2(n_cols) > _MAX_BLOCK:
        raise ValueError(f"hidden size {n_cols} is larger than this kernel's {_MAX_BLOCK}")
    return n_cols


def _launch(
    x2: torch.Tensor,
    residual2: torch.Tensor | None,
    weight: torch.Tensor,
    out2: torch.Tensor,
    sum2: torch.Tensor | None,
    eps: float,
) -> None:
    n_rows, n_cols = x2.shape
    if n_rows == 0:
        return
    block = next_power_of_2(n_cols)
    has_residual = residual2 is not None
    residual2 = residual2 if has_residual else x2
    sum2 = sum2 if sum2 is not None else out2
    _rms_norm_kernel[(n_rows,)](
        x2, residual2, weight, out2, sum2, n_cols, eps,
        x2.stride(0), residual2.stride(0), out2.stride(0), sum2.stride(0),
        BLOCK=block, HAS_RESIDUAL=has_residual,
        num_warps=min(16, max(1, block // 512)),
    )  # fmt: skip


def rms_norm(
    x: torch.Tensor,  # [..., N]
    weight: torch.Tensor,  # [N]
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [..., N] of promote_types(x, weight); may be x itself
) -> torch.Tensor:  # [..., N]
    n_cols = _check(x, weight)
    x2 = _as_rows("x", x, n_cols)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if out.shape != x.shape or out.dtype != out_dtype:
        raise ValueError(
            f"out must be {tuple(x.shape)} {out_dtype}, got {tuple(out.shape)} {out.dtype}"
        )
    _launch(x2, None, weight, _as_rows("out", out, n_cols), None, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor,  # [..., N]: a sublayer's output
    residual: torch.Tensor,  # [..., N]: the residual stream before x
    weight: torch.Tensor,  # [N]
    eps: float,
    *,
    inplace: bool = False,  # write the norm into x and the sum into residual (no allocation)
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(x + residual), x + residual)
    n_cols = _check(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"residual must match x ({tuple(x.shape)} {x.dtype} {x.device}), got "
            f"{tuple(residual.shape)} {residual.dtype} {residual.device}"
        )
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if inplace and out_dtype != x.dtype:
        raise ValueError(f"inplace needs weight no wider than x, got {weight.dtype} and {x.dtype}")
    x2, residual2 = _as_rows("x", x, n_cols), _as_rows("residual", residual, n_cols)
    if inplace:
        normed, summed = x, residual
    else:
        normed = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        summed = torch.empty_like(x)
    _launch(
        x2,
        residual2,
        weight,
        _as_rows("out", normed, n_cols),
        _as_rows("summed", summed, n_cols),
        eps,
    )
    return normed, summed
