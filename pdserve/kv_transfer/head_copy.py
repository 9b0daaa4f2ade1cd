"""Head-sliced page copies from one prefill rank's pool into decode ranks' pools: what cuda_ipc
does between tensor-parallel workers of different degrees (kv_transfer/cuda_ipc.py).

The plan is pure (page ids and head offsets from `head_map.routes_from`, no tensors); the copy is
plain torch, the same function whether the destination pools are CUDA pools opened through IPC
handles or CPU tensors standing in for them (the CPU tests). A route that moves whole pages
(every head of the source rank into every head of the destination rank) is left to the one-kernel
page copy instead (`is_whole_pages`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from pdserve.kv_transfer.head_map import HeadRoute, kv_heads_of


class HeadCopy(NamedTuple):
    """Pages of one run of heads to copy into one decode rank's pool (`+n`: num_heads):
    dst[:, :, dst_pages, :, dst_offset : +n] = src[:, :, src_pages, :, src_offset : +n]"""

    decode_rank: int
    src_offset: int  # the run's first head in the prefill rank's pool
    dst_offset: int  # the run's first head in the decode rank's pool
    num_heads: int
    src_pages: list[int]  # [n] page ids of the prefill rank's pool
    dst_pages: list[int]  # [n] page ids of the decode rank's pool, distinct


def plan_head_copies(
    routes: Sequence[HeadRoute], src_pages: Sequence[int], dst_pages: Sequence[int]
) -> list[HeadCopy]:
    """One HeadCopy per route of this prefill rank (`routes_from`): every page of the transfer,
    narrowed to the route's heads. No routes (a replicated head another rank sends): no copies."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} src pages but {len(dst_pages)} dst pages")
    src, dst = list(src_pages), list(dst_pages)
    return [
        HeadCopy(r.decode_rank, r.src_offset, r.dst_offset, r.num_heads, src, dst) for r in routes
    ]


def is_whole_pages(route: HeadRoute, src_heads: int, dst_heads: int) -> bool:
    """True when the route moves every head of the source rank's pages into every head of the
    destination rank's pages: a plain page copy, no head slicing."""
    return route.num_heads == src_heads == dst_heads and route.src_offset == route.dst_offset == 0


def check_rank_pool(
    local: torch.Tensor,  # [L, 2, P, page_size, h, D]: this prefill rank's pool
    pool: torch.Tensor,  # [L, 2, P', page_size, h', D]: a decode rank's pool (opened)
    decode_rank: int,
    decode_tp: int,
    num_kv_heads: int,
) -> None:
    """ValueError unless `pool` is decode rank `decode_rank`'s share as this rank expects it."""
    _, want_heads = kv_heads_of(decode_rank, decode_tp, num_kv_heads)
    want = [*local.shape[:2], pool.shape[2], local.shape[3], want_heads, local.shape[5]]
    if list(pool.shape) != want or pool.dtype != local.dtype:
        raise ValueError(
            f"decode rank {decode_rank}'s KV pool is {list(pool.shape)} {pool.dtype}: expected "
            f"{want} {local.dtype} (rank {decode_rank} of tp {decode_tp} over "
            f"{num_kv_heads} KV heads)"
        )


def copy_heads(
    src: torch.Tensor,  # [L, 2, P, page_size, h, D]: this prefill rank's pool
    dst_pools: Mapping[int, torch.Tensor],  # decode rank -> its pool [L, 2, P', page_size, h', D]
    copies: Sequence[HeadCopy],
) -> int:
    """Do every copy (enqueued on the current streams: the caller waits); returns payload bytes.
    A gather of the source heads then an indexed copy into the destination's head slice: two
    kernels per copy, on any device (a pool on another GPU gets a peer copy between them)."""
    num_bytes = 0
    for c in copies:
        dst = dst_pools[c.decode_rank]
        src_index = torch.tensor(c.src_pages, dtype=torch.long, device=src.device)  # [n]
        data = src.narrow(4, c.src_offset, c.num_heads).index_select(2, src_index)
        # data: [L, 2, n, page_size, num_heads, D] contiguous
        dst_index = torch.tensor(c.dst_pages, dtype=torch.long, device=dst.device)  # [n]
        heads = dst.narrow(4, c.dst_offset, c.num_heads)  # a view: written through
        heads.index_copy_(2, dst_index, data.to(dst.device, non_blocking=True))
        num_bytes += data.numel() * data.element_size()
    return num_bytes
