"""Torch reference for moving whole KV pages between the pool and a contiguous staging buffer.

KV transfer sends pages, not tokens: the sender gathers a request's pages of every layer into one
contiguous staging tensor, the receiver scatters it into the pages it allocated. Pool layout (see
`worker/kv_pool.py`): [L, 2, num_pages, page_size, Hkv, D]; staging: [L, 2, n, page_size, Hkv, D].
A pool slice over layers (`buffer[l0:l1]`) works the same way, for layer-by-layer transfers.
"""

from __future__ import annotations

import torch


def gather_pages_ref(
    buffer: torch.Tensor,  # [L, 2, num_pages, page_size, Hkv, D]
    page_ids: torch.Tensor,  # [n] int32/int64, on buffer's device
    out: torch.Tensor | None = None,  # [L, 2, n, page_size, Hkv, D], buffer's dtype, contiguous
) -> torch.Tensor:  # [L, 2, n, page_size, Hkv, D] contiguous
    gathered = buffer[:, :, page_ids.long()]
    if out is None:
        return gathered.contiguous()
    out.copy_(gathered)
    return out


def scatter_pages_ref(
    buffer: torch.Tensor,  # [L, 2, num_pages, page_size, Hkv, D], written in place
    page_ids: torch.Tensor,  # [n] int32/int64, distinct (a repeated id gets either of its pages)
    staging: torch.Tensor,  # [L, 2, n, page_size, Hkv, D]
) -> None:
    buffer[:, :, page_ids.long()] = staging


def copy_pages_ref(
    src: torch.Tensor,  # [L, 2, num_src_pages, page_size, Hkv, D]
    src_ids: torch.Tensor,  # [n] int32/int64, on src's device
    dst: torch.Tensor,  # [L, 2, num_dst_pages, page_size, Hkv, D], written in place
    dst_ids: torch.Tensor,  # [n] int32/int64, distinct, on dst's device
) -> None:
    """dst[:, :, dst_ids] = src[:, :, src_ids]: pool to pool, as cuda_ipc moves a request."""
    dst[:, :, dst_ids.long()] = src[:, :, src_ids.long()]
