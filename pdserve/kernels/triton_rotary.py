"""Triton rotary position embedding, rotate-half ("neox") layout, applied in place to q and k.

One program per token: it reads the token's cos/sin row once and rotates all its q and k heads in
float32. The torch reference is `rotary_ref.apply_rotary_ref` (which returns new tensors instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pdserve.kernels.launch_math import next_power_of_2

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
def _rotate_q(
    q_ptr,  # this token's first q head
    stride_qh,
    cos_sin_row,  # this token's position's row of the cos | sin cache
    NUM_Q_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
):
    """Rotate a token's q heads; returns its cos, sin [1, BLOCK_HALF] and their offsets and mask
    for the k heads."""
    offs_d = tl.arange(0, BLOCK_HALF)[None, :]
    mask_d = offs_d < HALF
    cos = tl.load(cos_sin_row + offs_d, mask=mask_d, other=0.0)
    sin = tl.load(cos_sin_row + HALF + offs_d, mask=mask_d, other=0.0)
    _rotate_heads(q_ptr, stride_qh, cos, sin, mask_d, offs_d, NUM_Q_HEADS, BLOCK_HQ, HALF)
    return cos, sin, offs_d, mask_d


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
    cos, sin, offs_d, mask_d = _rotate_q(
        q_ptr + token * stride_qt, stride_qh, cos_sin_ptr + pos * stride_cs,
        NUM_Q_HEADS, HALF, BLOCK_HALF, BLOCK_HQ,
    )  # fmt: skip
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
    block_hq = next_power_of_2(num_q_heads)
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HALF=half,
        BLOCK_HALF=next_power_of_2(half), BLOCK_HQ=block_hq,
        BLOCK_HK=next_power_of_2(num_k_heads),
        num_warps=4 if block_hq * half >= 1024 else 2,
    )  # fmt: skip
    return q, k


@triton.jit
def _rotary_store_kernel(
    q_ptr,  # [T, Hq, D]: rotated in place
    k_ptr,  # [T, Hkv, D]: read only; rotated into k_cache
    v_ptr,  # [T, Hkv, D]: read only; copied into v_cache
    positions_ptr,  # [T] int
    slots_ptr,  # [T] int: page_id * page_size + offset
    cos_sin_ptr,  # [max_positions, 2 * HALF] float32: cos | sin
    k_cache_ptr,  # [num_slots, Hkv, D] (the pool's pages, viewed as slots)
    v_cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cs,
    stride_cache_slot,
    stride_cache_h,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    cos, sin, offs_d, mask_d = _rotate_q(
        q_ptr + token * stride_qt, stride_qh, cos_sin_ptr + pos * stride_cs,
        NUM_Q_HEADS, HALF, BLOCK_HALF, BLOCK_HQ,
    )  # fmt: skip
    cache_dtype = k_cache_ptr.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_HK)[:, None]
    # k: the rotated dimensions, then (partial rotary) the rest as they are.
    mask = (offs_h < NUM_K_HEADS) & mask_d
    src = k_ptr + token * stride_kt + offs_h * stride_kh + offs_d
    dst = k_cache_ptr + slot * stride_cache_slot + offs_h * stride_cache_h + offs_d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst, (x1 * cos - x2 * sin).to(cache_dtype), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(cache_dtype), mask=mask)
    offs_full = tl.arange(0, BLOCK_D)[None, :]
    in_head = (offs_h < NUM_K_HEADS) & (offs_full < HEAD_DIM)
    if 2 * HALF < HEAD_DIM:
        tail = in_head & (offs_full >= 2 * HALF)
        k_tail = tl.load(k_ptr + token * stride_kt + offs_h * stride_kh + offs_full, mask=tail)
        tl.store(
            k_cache_ptr + slot * stride_cache_slot + offs_h * stride_cache_h + offs_full,
            k_tail.to(cache_dtype),
            mask=tail,
        )
    v = tl.load(v_ptr + token * stride_vt + offs_h * stride_vh + offs_full, mask=in_head)
    tl.store(
        v_cache_ptr + slot * stride_cache_slot + offs_h * stride_cache_h + offs_full,
        v.to(cache_dtype),
        mask=in_head,
    )


def _slot_strides(cache: torch.Tensor) -> tuple[int, int] | None:
    """(slot stride, head stride) of a [num_pages, page_size, Hkv, D] cache whose pages are laid
    out slot after slot (page p, offset o is slot p * page_size + o); None when they are not."""
    if (
        cache.dim() != 4
        or cache.stride(-1) != 1
        or cache.stride(0) != cache.shape[1] * cache.stride(1)
    ):
        return None
    return cache.stride(1), cache.stride(2)


def apply_rotary_and_store_(
    q: torch.Tensor,  # [T, Hq, D], rotated in place
    k: torch.Tensor,  # [T, Hkv, D], left as it is: its rotated rows go to k_cache
    v: torch.Tensor,  # [T, Hkv, D]
    positions: torch.Tensor,  # [T] int32/int64, each < max_positions (not checked: no sync)
    cos_sin_cache: torch.Tensor,  # [max_positions, rotary_dim] float32: cos | sin halves
    k_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    v_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    slots: torch.Tensor,  # [T] int64: page_id * page_size + offset (not checked: no sync)
) -> torch.Tensor:  # q
    """Rotary on q and k and the KV-cache store of k and v, in one launch: what
    `apply_rotary_` followed by `attention_ref.store_kv` do, with k's rotation written to the
    cache only."""
    _check(q, k, positions, cos_sin_cache)
    strides = _slot_strides(k_cache)
    if (
        v.shape != k.shape
        or v.stride(-1) != 1
        or k_cache.shape != v_cache.shape
        or strides is None
        or _slot_strides(v_cache) != strides
        or tuple(k_cache.shape[2:]) != tuple(k.shape[1:])
        or slots.shape != (q.shape[0],)
    ):
        raise ValueError(
            f"apply_rotary_and_store_: v {tuple(v.shape)} must match k {tuple(k.shape)}, the "
            f"caches {tuple(k_cache.shape)} and {tuple(v_cache.shape)} must be [pages, page_size, "
            f"Hkv, D] with slot-contiguous pages, slots [T={q.shape[0]}], got {tuple(slots.shape)}"
        )
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    half = cos_sin_cache.shape[1] // 2
    if num_tokens == 0:
        return q
    block_hq = next_power_of_2(num_q_heads)
    _rotary_store_kernel[(num_tokens,)](
        q, k, v, positions, slots, cos_sin_cache, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0), strides[0], strides[1],
        NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, HEAD_DIM=head_dim, HALF=half,
        BLOCK_HALF=next_power_of_2(max(half, 1)), BLOCK_HQ=block_hq,
        BLOCK_HK=next_power_of_2(num_k_heads), BLOCK_D=next_power_of_2(head_dim),
        num_warps=4 if block_hq * half >= 1024 else 2,
    )  # fmt: skip
    return q
