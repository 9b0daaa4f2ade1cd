"""Triton copies of whole KV pages: pool <-> contiguous staging buffer, and pool -> pool.

Used by KV transfer. A page of one layer's K (or V) is one contiguous run of bytes, so the kernels
copy 32-bit words (16- or 8-bit when a page's byte count demands it) whatever the cache dtype: one
program copies one block of one page of one (layer, K|V), so one launch covers a whole transfer.
The torch reference is `page_copy_ref.py`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from pdserve.kernels.launch_math import cdiv, next_power_of_2

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
def _copy_page_block(
    src_ptr, dst_ptr, src_page, dst_page, num_kv,
    stride_sl, stride_skv, stride_sp, stride_dl, stride_dkv, stride_dp,
    PAGE_WORDS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """This program's block of one page of one (layer, K|V): grid axis 1 is layer x KV, axis 2
    the block within the page."""
    layer_kv = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PAGE_WORDS
    layer = (layer_kv // num_kv).to(tl.int64)
    kv = (layer_kv % num_kv).to(tl.int64)
    words = tl.load(
        src_ptr + layer * stride_sl + kv * stride_skv + src_page * stride_sp + offs, mask=mask
    )
    tl.store(
        dst_ptr + layer * stride_dl + kv * stride_dkv + dst_page * stride_dp + offs,
        words,
        mask=mask,
    )


@triton.jit(do_not_specialize=["ids_offset", "num_ids"])
def _pool_to_pool_kernel(
    src_ptr,  # [L, KV, num_src_pages, page_words] words
    dst_ptr,  # [L, KV, num_dst_pages, page_words] words
    ids_ptr,  # int32/int64: src ids at [ids_offset, +num_ids), dst ids right after them
    ids_offset,
    num_ids,
    num_kv,
    stride_sl, stride_skv, stride_sp, stride_dl, stride_dkv, stride_dp,
    PAGE_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    idx = tl.program_id(0).to(tl.int64)  # which of the num_ids pages
    src_page = tl.load(ids_ptr + ids_offset + idx).to(tl.int64)
    dst_page = tl.load(ids_ptr + ids_offset + num_ids + idx).to(tl.int64)
    _copy_page_block(
        src_ptr, dst_ptr, src_page, dst_page, num_kv,
        stride_sl, stride_skv, stride_sp, stride_dl, stride_dkv, stride_dp, PAGE_WORDS, BLOCK,
    )  # fmt: skip


@triton.jit(do_not_specialize=["s0", "s1", "s2", "s3", "d0", "d1", "d2", "d3"])
def _few_pages_kernel(
    src_ptr,  # [L, KV, num_src_pages, page_words] words
    dst_ptr,  # [L, KV, num_dst_pages, page_words] words
    s0, s1, s2, s3,  # src page ids (those past the grid's page count unused)
    d0, d1, d2, d3,  # dst page ids
    num_kv,
    stride_sl, stride_skv, stride_sp, stride_dl, stride_dkv, stride_dp,
    PAGE_WORDS: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Up to FEW_PAGES pages, their ids passed as arguments: no page-id upload before it."""
    idx = tl.program_id(0)
    src_page = tl.where(idx == 0, s0, tl.where(idx == 1, s1, tl.where(idx == 2, s2, s3)))
    dst_page = tl.where(idx == 0, d0, tl.where(idx == 1, d1, tl.where(idx == 2, d2, d3)))
    _copy_page_block(
        src_ptr, dst_ptr, src_page.to(tl.int64), dst_page.to(tl.int64), num_kv,
        stride_sl, stride_skv, stride_sp, stride_dl, stride_dkv, stride_dp, PAGE_WORDS, BLOCK,
    )  # fmt: skip


FEW_PAGES = 4  # transfers of at most this many pages take _few_pages_kernel


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
    block = min(_MAX_BLOCK_WORDS, next_power_of_2(page_words))
    grid = (num_ids, num_layers * num_kv, cdiv(page_words, block))
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


# Triton versions whose CompiledKernel.run this module calls directly, as JITFunction.run does
# (checked bit for bit by tests/kernels/test_triton_page_copy.py); others take the usual path.
_DIRECT_LAUNCH_TRITON = ("3.6.",)


class PoolCopy:
    """Copies pages from one pool into another on the same device: one kernel launch per call, over
    every layer and K and V. Shapes, dtypes and strides are checked once, here, so a call costs a
    launch and nothing else.

    `__call__` reads page ids from a device tensor (src ids, then dst ids), so a transfer, or
    several requests' transfers together, needs one host-to-device copy of its ids; `copy_few`
    takes up to FEW_PAGES ids as kernel arguments and needs none.

    After a kernel's first call (which compiles it, through Triton's usual launch), later calls
    launch the compiled kernel directly with its pointers resolved once: Triton's per-call
    dispatch (binding, specialization key, pointer queries) is most of a small transfer's launch.
    """

    few_pages = FEW_PAGES  # the most pages copy_few takes

    def __init__(
        self,
        src: torch.Tensor,  # [L, 2, num_src_pages, page_size, Hkv, D]
        dst: torch.Tensor,  # [L, 2, num_dst_pages, page_size, Hkv, D], same device, written
        block: int | None = None,  # words one program copies (default: a page, at most 4096)
        num_warps: int | None = None,
    ) -> None:
        if (
            src.shape[:2] != dst.shape[:2]
            or src.shape[3:] != dst.shape[3:]
            or src.dtype != dst.dtype
        ):
            raise ValueError(
                f"src {tuple(src.shape)} {src.dtype} and dst {tuple(dst.shape)} "
                f"{dst.dtype} differ outside the page axis"
            )
        if dst.device != src.device:
            raise ValueError(f"dst is on {dst.device}, src on {src.device}")
        self.device = src.device
        self._src = _as_words("src", src)  # [L, KV, P, page_words]
        self._dst = _as_words("dst", dst)
        num_layers, num_kv, _, page_words = self._src.shape
        self.page_words = page_words
        self.block = block or min(_MAX_BLOCK_WORDS, next_power_of_2(page_words))
        self.num_warps = num_warps or (4 if self.block >= 1024 else 1)
        self._grid_yz = (num_layers * num_kv, cdiv(page_words, self.block))
        self._shape_args = (num_kv, *self._src.stride()[:3], *self._dst.stride()[:3])
        self._meta = {"PAGE_WORDS": page_words, "BLOCK": self.block, "num_warps": self.num_warps}
        self._pool_ptrs = (self._src.data_ptr(), self._dst.data_ptr())
        self.direct = triton.__version__.startswith(_DIRECT_LAUNCH_TRITON)
        self._compiled: dict[Any, Any] = {}  # launch key -> compiled kernel, for direct launches

    def __call__(
        self,
        ids: torch.Tensor,  # [>= ids_offset + 2 num_ids] int32/int64 on the pools' device
        ids_offset: int,  # where this call's src ids start; its dst ids follow them
        num_ids: int,  # pages to copy
    ) -> None:
        """dst[:, :, ids[o + n : o + 2n]] = src[:, :, ids[o : o + n]], on the current stream.
        The caller guarantees every id is in range and the dst ids are distinct (KV transfer
        checks them on the host before the copy)."""
        if num_ids == 0:
            return
        ids_key = (ids.data_ptr(), ids.dtype)  # what the compiled kernel was specialized for
        args = (ids_offset, num_ids)
        if not self._launch_compiled(ids_key, num_ids, (ids_key[0], *args)):
            kernel = _pool_to_pool_kernel[(num_ids, *self._grid_yz)](
                self._src, self._dst, ids, *args, *self._shape_args, **self._meta,
            )  # fmt: skip
            self._remember(ids_key, kernel, ids.device == self.device)

    def copy_few(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """dst[:, :, dst_ids] = src[:, :, src_ids] for at most FEW_PAGES pages (same checks)."""
        num_ids = len(src_ids)
        if num_ids == 0:
            return
        if num_ids > FEW_PAGES or len(dst_ids) != num_ids:
            raise ValueError(f"copy_few takes 1..{FEW_PAGES} src and dst ids alike")
        pad = [0] * (FEW_PAGES - num_ids)
        args = (*src_ids, *pad, *dst_ids, *pad)
        if not self._launch_compiled("few", num_ids, args):
            kernel = _few_pages_kernel[(num_ids, *self._grid_yz)](
                self._src, self._dst, *args, *self._shape_args, **self._meta
            )
            self._remember("few", kernel, True)

    def _remember(self, key: Any, kernel: Any, usable: bool) -> None:
        if self.direct and usable:
            self._compiled[key] = kernel

    def _launch_compiled(self, key: Any, num_ids: int, args: tuple) -> bool:
        """Launch the kernel compiled for `key` as JITFunction.run launches it (every argument,
        constexprs included, pointers as device addresses; no launch hooks). False when there is
        none yet, or when this Triton refuses the call (before launching): the usual path."""
        kernel = self._compiled.get(key)
        if kernel is None:
            return False
        stream = torch._C._cuda_getCurrentRawStream(self.device.index)
        try:
            kernel.run(
                num_ids, *self._grid_yz, stream, kernel.function, kernel.packed_metadata,
                None, None, None, *self._pool_ptrs, *args, *self._shape_args,
                self.page_words, self.block,
            )  # fmt: skip
        except (TypeError, ValueError, AttributeError):
            self.direct = False
            self._compiled.clear()
            return False
        return True


def copy_pages(
    src: torch.Tensor,  # [L, 2, num_src_pages, page_size, Hkv, D]
    src_ids: torch.Tensor,  # [n] int32/int64, on src's device
    dst: torch.Tensor,  # [L, 2, num_dst_pages, page_size, Hkv, D], same device, written in place
    dst_ids: torch.Tensor,  # [n] int32/int64, distinct, on dst's device
) -> None:
    """dst[:, :, dst_ids] = src[:, :, src_ids] in one pass (no staging buffer)."""
    if src_ids.shape != dst_ids.shape or src_ids.dim() != 1:
        raise ValueError(
            f"src_ids {tuple(src_ids.shape)} and dst_ids {tuple(dst_ids.shape)} must be [n] alike"
        )
    for name, t in (("src_ids", src_ids), ("dst_ids", dst_ids)):
        if t.device != src.device or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"{name} is {t.dtype} on {t.device}: expected int32/int64 on {src.device}"
            )
    copy = PoolCopy(src, dst)
    ids = torch.cat([src_ids.long(), dst_ids.long()])  # [2n] int64: src ids, then dst ids
    copy(ids, 0, src_ids.numel())
