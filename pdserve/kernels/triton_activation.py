"""Triton SiLU-and-multiply for the gated MLP: [T, 2I] (gate | up) -> silu(gate) * up, [T, I].

Computed in float32 and rounded once; the torch reference (`activation_ref.silu_and_mul_ref`) rounds
after the SiLU and again after the product, so the two differ by at most an ulp or two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.launch_math import cdiv, next_power_of_2

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2 * I]
    out_ptr,  # [T, I]
    inter_size,
    stride_xt,
    stride_ot,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter_size
    row = x_ptr + token * stride_xt
    gate = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + inter_size + offs, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + token * stride_ot + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(
    x: torch.Tensor,  # [..., 2 * I]
    *,
    out: torch.Tensor | None = None,  # [..., I], x's dtype
) -> torch.Tensor:  # [..., I]
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be one of {_DTYPES}, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % 2 != 0:
        raise ValueError(f"x must be [..., 2 * I], got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(f"x needs a contiguous last dimension, got strides {x.stride()}")
    inter_size = x.shape[-1] // 2
    out_shape = (*x.shape[:-1], inter_size)
    if out is None:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    if out.shape != out_shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must be {out_shape} {x.dtype} on {x.device}, got "
            f"{tuple(out.shape)} {out.dtype} {out.device}"
        )
    try:
        x2 = x.view(-1, 2 * inter_size)  # [T, 2I]
        out2 = out.view(-1, inter_size)  # [T, I]
    except RuntimeError as e:
        raise ValueError(f"x {x.stride()} and out {out.stride()} must be viewable as rows") from e
    if out2.stride(-1) != 1:
        raise ValueError(f"out needs a contiguous last dimension, got strides {out.stride()}")
    num_tokens = x2.shape[0]
    if num_tokens == 0 or inter_size == 0:
        return out
    block = min(_BLOCK, next_power_of_2(inter_size))
    grid = (num_tokens, cdiv(inter_size, block))
    _silu_and_mul_kernel[grid](
        x2, out2, inter_size, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=4
    )
    return out
