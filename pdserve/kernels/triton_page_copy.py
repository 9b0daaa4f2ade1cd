"""Triton gather/scatter of whole KV pages between the pool and a contiguous staging buffer.

Used by KV transfer. A page of one layer's K (or V) is one contiguous run of bytes, so the kernels
copy 32-bit words (16- or 8-bit when a page's byte count demands it) whatever the cache dtype: one
program copies one block of one page of one (layer, K|V). The torch reference is `page_copy_ref.py`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_MAX_BLOCK_WORDS = 4096


@triton.jit
def _page_copy_kernel(
    pool_ptr,  # [L, KV, num_pages, page_words] words
    staging_ptr,  # [L, KV, n, page_words] words, contiguous
    page_ids_ptr,  # [n] int32/int64
    num_kv,
    num_ids,
    stride_pl,
    stride_pkv,
    stride_pp,
    PAGE_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
    GATHER: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64)  # which of the n pages
    layer_kv = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PAGE_WORDS
    layer = (layer_kv // num_kv).to(tl.int64)
    kv = (layer_kv % num_kv).to(tl.int64)
    page = tl.load(page_ids_ptr + idx).to(tl.int64)
    pool_off = layer * stride_pl + kv * stride_pkv + page * stride_pp + offs
    staging_off = ((layer * num_kv + kv) * num_ids + idx) * PAGE_WORDS + offs
    if GATHER:
        words = tl.load(pool_ptr + pool_off, mask=mask)
        tl.store(staging_ptr + staging_off, words, mask=mask)
    else:
        words = tl.load(staging_ptr + staging_off, mask=mask)
        tl.store(pool_ptr + pool_off, words, mask=mask)


@triton.jit
def _pool_to_pool_kernel(
    src_ptr,  # [L, KV, num_src_pages, page_words] words
    dst_ptr,  # [L, KV, num_dst_pages, page_words] words
    src_ids_ptr,  # [n] int32/int64
    dst_ids_ptr,  # [n] int32/int64
    num_kv,
    stride_sl,
    stride_skv,
    stride_sp,
    stride_dl,
    stride_dkv,
    stride_dp,
    PAGE_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    idx = tl.program_id(0).to(tl.int64)
    layer_kv = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PAGE_WORDS
    layer = (layer_kv // num_kv).to(tl.int64)
    kv = (layer_kv % num_kv).to(tl.int64)
    src_page = tl.load(src_ids_ptr + idx).to(tl.int64)
    dst_page = tl.load(dst_ids_ptr + idx).to(tl.int64)
    words = tl.load(
        src_ptr + layer * stride_sl + kv * stride_skv + src_page * stride_sp + offs, mask=mask
    )
    tl.store(
        dst_ptr + layer * stride_dl + kv * stride_dkv + dst_page * stride_dp + offs,
        words,
        mask=mask,
    )


def _as_words(name: str, t: torch.Tensor) -> torch.Tensor:
    """[L, KV, P, *page] -> [L, KV, P, page_words] view in the widest word the page bytes allow."""
    page_bytes = math.prod(t.shape[3:]) * t.element_size()
    word = (
        torch.int32 if page_bytes % 4 == 0 else torch.int16 if page_bytes % 2 == 0 else torch.uint8
    )
    try:
        return t.view(*t.shape[:3], -1).view(torch.uint8).view(word)
    except RuntimeError as e:
        raise ValueError(
            f"{name} with shape {tuple(t.shape)}, strides {t.stride()} and storage "
            f"offset {t.storage_offset()} cannot be read as whole pages of {word}"
        ) from e


def _check(buffer: torch.Tensor, page_ids: torch.Tensor, staging: torch.Tensor) -> None:
    if buffer.dim() < 4:
        raise ValueError(f"buffer must be [L, 2, num_pages, *page], got {tuple(buffer.shape)}")
    page_dims = buffer.shape[3:]
    expected_strides = torch.empty(page_dims, device="meta").stride()
    if buffer.stride()[3:] != expected_strides:
        raise ValueError(f"each page of buffer must be contiguous: strides {buffer.stride()}")
    if page_ids.dim() != 1 or page_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"page_ids must be [n] int32/int64, got {tuple(page_ids.shape)} {page_ids.dtype}"
        )
    if not page_ids.is_contiguous():
        raise ValueError("page_ids must be contiguous")
    expected = (*buffer.shape[:2], page_ids.shape[0], *page_dims)
    if staging.shape != expected or staging.dtype != buffer.dtype:
        raise ValueError(
            f"staging must be {expected} {buffer.dtype}, got {tuple(staging.shape)} {staging.dtype}"
        )
    if not staging.is_contiguous():
        raise ValueError("staging must be contiguous")
    for name, t in (("page_ids", page_ids), ("staging", staging)):
        if t.device != buffer.device:
            raise ValueError(f"{name} is on {t.device}, buffer on {buffer.device}")


def _launch(
    buffer: torch.Tensor, page_ids: torch.Tensor, staging: torch.Tensor, gather: bool
) -> None:
    _check(buffer, page_ids, staging)
    pool = _as_words("buffer", buffer)  # [L, KV, num_pages, page_words]
    words = _as_words("staging", staging)  # [L, KV, n, page_words]
    num_layers, num_kv, num_ids, page_words = words.shape
    if words.numel() == 0:
        return
    block = min(_MAX_BLOCK_WORDS, triton.next_power_of_2(page_words))
    grid = (num_ids, num_layers * num_kv, triton.cdiv(page_words, block))
    _page_copy_kernel[grid](
        pool, words, page_ids, num_kv, num_ids,
        pool.stride(0), pool.stride(1), pool.stride(2),
        PAGE_WORDS=page_words, BLOCK=block, GATHER=gather,
        num_warps=4 if block >= 1024 else 1,
    )  # fmt: skip


def gather_pages(
    buffer: torch.Tensor,  # [L, 2, num_pages, page_size, Hkv, D]; any layer slice of the pool
    page_ids: torch.Tensor,  # [n] int32/int64, on buffer's device
    out: torch.Tensor | None = None,  # [L, 2, n, page_size, Hkv, D] contiguous, buffer's dtype
) -> torch.Tensor:  # [L, 2, n, page_size, Hkv, D]: buffer[:, :, page_ids]
    if out is None:
        out = torch.empty(
            (*buffer.shape[:2], page_ids.shape[0], *buffer.shape[3:]),
            dtype=buffer.dtype,
            device=buffer.device,
        )
    _launch(buffer, page_ids, out, gather=True)
    return out


def scatter_pages(
    buffer: torch.Tensor,  # [L, 2, num_pages, page_size, Hkv, D], written in place
    page_ids: torch.Tensor,  # [n] int32/int64, distinct, on buffer's device
    staging: torch.Tensor,  # [L, 2, n, page_size, Hkv, D] contiguous, buffer's dtype
) -> None:
    """buffer[:, :, page_ids] = staging."""
    _launch(buffer, page_ids, staging, gather=False)


def copy_pages(
    src: torch.Tensor,  # [L, 2, num_src_pages, page_size, Hkv, D]
    src_ids: torch.Tensor,  # [n] int32/int64, on src's device
    dst: torch.Tensor,  # [L, 2, num_dst_pages, page_size, Hkv, D], same device, written in place
    dst_ids: torch.Tensor,  # [n] int32/int64, distinct, on dst's device
) -> None:
    """dst[:, :, dst_ids] = src[:, :, src_ids] in one pass (no staging buffer)."""
    if src.shape[:2] != dst.shape[:2] or src.shape[3:] != dst.shape[3:] or src.dtype != dst.dtype:
        raise ValueError(
            f"src {tuple(src.shape)} {src.dtype} and dst {tuple(dst.shape)} "
            f"{dst.dtype} differ outside the page axis"
        )
    if src_ids.shape != dst_ids.shape or src_ids.dim() != 1:
        raise ValueError(
            f"src_ids {tuple(src_ids.shape)} and dst_ids {tuple(dst_ids.shape)} must be [n] alike"
        )
    for name, t in (("src_ids", src_ids), ("dst", dst), ("dst_ids", dst_ids)):
        if t.device != src.device:
            raise ValueError(f"{name} is on {t.device}, src on {src.device}")
    src_w = _as_words("src", src)  # [L, KV, P, page_words]
    dst_w = _as_words("dst", dst)
    num_layers, num_kv, _, page_words = src_w.shape
    if src_ids.numel() == 0:
        return
    block = min(_MAX_BLOCK_WORDS, triton.next_power_of_2(page_words))
    grid = (src_ids.numel(), num_layers * num_kv, triton.cdiv(page_words, block))
    _pool_to_pool_kernel[grid](
        src_w, dst_w, src_ids.contiguous(), dst_ids.contiguous(), num_kv,
        src_w.stride(0), src_w.stride(1), src_w.stride(2),
        dst_w.stride(0), dst_w.stride(1), dst_w.stride(2),
        PAGE_WORDS=page_words, BLOCK=block,
        num_warps=4 if block >= 1024 else 1,
    )  # fmt: skip
