"""Triton rotary position embedding, rotate-half ("neox") layout, applied in place to q and k.

One program per token: it reads the token's cos/sin row once and rotates all its q and k heads in
float32. The torch reference is `rotary_ref.apply_rotary_ref` (which returns new tensors instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rotate_heads(
    x_ptr,  # this token's first head
    stride_h,
    cos,  # [1, BLOCK_HALF] float32
    sin,  # [1, BLOCK_HALF] float32
    mask_d,  # [1, BLOCK_HALF]
    offs_d,  # [1, BLOCK_HALF]
    NUM_HEADS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    mask = (offs_h < NUM_HEADS) & mask_d
    first = (
        x_ptr + offs_h * stride_h + offs_d
    )  # [BLOCK_H, BLOCK_HALF]: dimension i pairs with i+HALF
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [T, Hq, D]
    k_ptr,  # [T, Hkv, D]
    positions_ptr,  # [T] int
    cos_sin_ptr,  # [max_positions, 2 * HALF] float32: cos | sin
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cs,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask_d = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=mask_d, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d, mask=mask_d, other=0.0)
    _rotate_heads(
        q_ptr + token * stride_qt, stride_qh, cos, sin, mask_d, offs_d, NUM_Q_HEADS, BLOCK_HQ, HALF
    )
    _rotate_heads(
        k_ptr + token * stride_kt, stride_kh, cos, sin, mask_d, offs_d, NUM_K_HEADS, BLOCK_HK, HALF
    )


def _check(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"q and k must be [T, Hq, D] and [T, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if q.dtype not in _DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share one dtype of {_DTYPES}, got {q.dtype}, {k.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k need a contiguous last (head_dim) dimension")
    if positions.shape != (q.shape[0],) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"positions must be [T={q.shape[0]}] int32/int64, got "
            f"{tuple(positions.shape)} {positions.dtype}"
        )
    if not positions.is_contiguous():
        raise ValueError("positions must be contiguous")
    rotary_dim = cos_sin_cache.shape[-1] if cos_sin_cache.dim() == 2 else -1
    if (
        cos_sin_cache.dim() != 2
        or cos_sin_cache.dtype != torch.float32
        or rotary_dim % 2 != 0
        or rotary_dim > q.shape[2]
        or cos_sin_cache.stride(-1) != 1
    ):
        raise ValueError(
            f"cos_sin_cache must be [max_positions, rotary_dim <= {q.shape[2]}] "
            f"float32 (cos | sin, even width, contiguous rows), got "
            f"{tuple(cos_sin_cache.shape)} {cos_sin_cache.dtype}"
        )
    for name, t in (("k", k), ("positions", positions), ("cos_sin_cache", cos_sin_cache)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def apply_rotary_(
    q: torch.Tensor,  # [T, Hq, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D], rotated in place
    positions: torch.Tensor,  # [T] int32/int64, each < max_positions (not checked: no sync)
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim] float32: cos | sin halves
) -> tuple[torch.Tensor, torch.Tensor]:  # (q, k), the same tensors
    """Rotate the first rotary_dim dimensions of every head (all of them when rotary_dim == D)."""
    _check(q, k, positions, cos_sin_cache)
    num_tokens, num_q_heads, _ = q.shape
    num_k_heads = k.shape[1]
    half = cos_sin_cache.shape[1] // 2
    if num_tokens == 0 or half == 0:
        return q, k
    block_hq = triton.next_power_of_2(num_q_heads)
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=block_hq,
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        num_warps=4 if block_hq * half >= 1024 else 2,
    )  # fmt: skip
    return q, k
