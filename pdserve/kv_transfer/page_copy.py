"""A KV pool's pages by id: ids checked before any index kernel sees them, and pages gathered
into, scattered from or copied between contiguous [L, 2, n, page_size, Hkv, D] tensors (the Triton
page-copy kernels on CUDA, their torch references elsewhere)."""

from __future__ import annotations

import array

import numpy as np
import torch

from pdserve.kernels.page_copy_ref import copy_pages_ref, gather_pages_ref, scatter_pages_ref


def check_pages(pages: list[int], num_pages: int, what: str) -> None:
    """Page ids must be distinct ints in [0, num_pages): an index kernel given a bad id corrupts
    other pages or kills the CUDA context, so it is refused before any launch."""
    seen: set[int] = set()
    for p in pages:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < num_pages:
            raise ValueError(
                f"{what}: page id {p!r} is invalid: expected an int in [0, {num_pages})"
            )
        if p in seen:
            raise ValueError(f"{what}: page id {p} appears twice")
        seen.add(p)


def page_array(pages: list[int], num_pages: int, what: str) -> array.array:
    """pages as an int32 array, with check_pages' checks made at C speed: a transfer of hundreds
    of pages must not pay a Python loop per page (one page's copy takes about 0.25 us).

    Integer-likes (numpy ints, bools) pass as their int value; anything else, and any id
    check_pages refuses, raises its ValueError."""
    try:
        ids = array.array("i", pages)  # [n] int32; refuses floats, strings, ids beyond int32
    except (TypeError, OverflowError):
        check_pages(list(pages), num_pages, what)  # raises, naming the bad id
        raise
    n = len(ids)
    if n == 0:
        return ids
    if n <= 64:
        lo, hi, distinct = min(ids), max(ids), len(set(ids)) == n
    else:
        ordered = np.sort(np.frombuffer(ids, dtype=np.int32))
        lo, hi = int(ordered[0]), int(ordered[-1])
        distinct = not bool((ordered[1:] == ordered[:-1]).any())
    if lo < 0 or hi >= num_pages or not distinct:
        check_pages(list(pages), num_pages, what)  # raises, naming the bad id
    return ids


def page_index(pages: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(pages, dtype=torch.long, device=device)  # [n] int64


def gather_pages(buffer: torch.Tensor, pages: list[int]) -> torch.Tensor:
    """buffer[:, :, pages] as one contiguous [L, 2, n, page_size, Hkv, D] tensor."""
    index = page_index(pages, buffer.device)
    if buffer.is_cuda:  # the Triton copy moves about 2x what index_select does (BENCHMARKS.md)
        from pdserve.kernels.triton_page_copy import gather_pages as gather_pages_triton

        return gather_pages_triton(buffer, index)
    return gather_pages_ref(buffer, index)


def copy_pages(
    src: torch.Tensor, src_pages: list[int], dst: torch.Tensor, dst_pages: list[int]
) -> None:
    """dst[:, :, dst_pages] = src[:, :, src_pages], both pools on one device, in one pass."""
    src_index = page_index(src_pages, src.device)
    dst_index = page_index(dst_pages, dst.device)
    if src.is_cuda:
        from pdserve.kernels.triton_page_copy import copy_pages as copy_pages_triton

        copy_pages_triton(src, src_index, dst, dst_index)
        return
    copy_pages_ref(src, src_index, dst, dst_index)


def scatter_pages(buffer: torch.Tensor, pages: list[int], data: torch.Tensor) -> None:
    """buffer[:, :, pages] = data  (data: [L, 2, n, page_size, Hkv, D], any device)."""
    data = data.to(buffer.device, non_blocking=False)
    index = page_index(pages, buffer.device)
    if buffer.is_cuda:
        from pdserve.kernels.triton_page_copy import scatter_pages as scatter_pages_triton

        scatter_pages_triton(buffer, index, data)
        return
    scatter_pages_ref(buffer, index, data)
