"""KV pages of a tensor-parallel worker, whole, for the KV transfer (tcp backend).

Each rank's pool holds only its KV heads; a transfer moves pages with every head. Rank 0 relays:
to send, every rank gathers its heads of the pages and rank 0 assembles the whole pages; to
receive, rank 0 broadcasts the whole pages and every rank keeps its heads. So a prefill worker
and a decode worker of any two TP degrees exchange the same whole pages (tp 2 -> tp 1, 1 -> 2,
...), and a decode rank ends up holding exactly the heads it owns. Everything passes through rank
0's host: simple and correct, not the fastest (a rank-to-rank transfer by heads is future work).
"""

from __future__ import annotations

import torch

from pdserve.kernels.page_copy_ref import gather_pages_ref, scatter_pages_ref
from pdserve.worker.kv_pool import KVPool
from pdserve.worker.parallel.batch_broadcast import (
    Command,
    Header,
    receive_tensor,
    send_header,
)
from pdserve.worker.parallel.tp_group import TPGroup


class TPKVPoolView:
    """Rank 0's stand-in for its KVPool in the KV transfer backends (kv_transfer.base.PageIO):
    `buffer` describes the whole pool (a meta tensor: layout only), `page_io` moves the pages."""

    def __init__(self, pool: KVPool, tp: TPGroup, num_kv_heads: int) -> None:
        self.pool = pool
        self.tp = tp
        self.num_kv_heads = num_kv_heads
        shape = list(pool.buffer.shape)
        shape[4] = num_kv_heads
        self.buffer = torch.empty(shape, dtype=pool.buffer.dtype, device="meta")
        self.page_io = self

    def gather(self, pages: list[int]) -> torch.Tensor:  # [L, 2, n, page_size, Hkv, D]
        device = self.pool.buffer.device
        send_header(self.tp, Header(Command.GATHER_KV, num_tokens=len(pages)), device)
        ids = torch.tensor(pages, dtype=torch.int64, device=device)
        return gather_heads(
            self.tp, self.pool, self.tp.broadcast_from_first(ids), self.num_kv_heads
        )

    def scatter(self, pages: list[int], data: torch.Tensor) -> None:
        device = self.pool.buffer.device
        send_header(self.tp, Header(Command.SCATTER_KV, num_tokens=len(pages)), device)
        ids = self.tp.broadcast_from_first(torch.tensor(pages, dtype=torch.int64, device=device))
        data = self.tp.broadcast_from_first(data.to(device=device, dtype=self.buffer.dtype))
        scatter_heads(self.tp, self.pool, ids, data, self.num_kv_heads)


def gather_heads(tp: TPGroup, pool: KVPool, pages: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Every rank: its heads of `pages`, gathered; returns the whole pages [L, 2, n, ps, Hkv, D]
    (each head taken from the first rank that holds it)."""
    by_rank = tp.all_gather(gather_pages_ref(pool.buffer, pages))  # tp x [L, 2, n, ps, h, D]
    owners = [_first_owner(tp, num_kv_heads, k) for k in range(num_kv_heads)]
    heads = [by_rank[rank][:, :, :, :, k - start] for k, (rank, start) in enumerate(owners)]
    return torch.stack(heads, dim=4)  # [L, 2, n, ps, Hkv, D]


def scatter_heads(
    tp: TPGroup, pool: KVPool, pages: torch.Tensor, data: torch.Tensor, num_kv_heads: int
) -> None:
    """Every rank: write its heads of the whole pages `data` [L, 2, n, ps, Hkv, D] into `pages`."""
    shard = tp.kv_heads(num_kv_heads)
    mine = data.narrow(4, shard.start, shard.size).contiguous()
    scatter_pages_ref(pool.buffer, pages, mine)


def follow_kv_command(tp: TPGroup, pool: KVPool, header: Header, num_kv_heads: int) -> None:
    """A follower's part of GATHER_KV / SCATTER_KV (rank 0's is TPKVPoolView)."""
    device = pool.buffer.device
    pages = receive_tensor(tp, (header.num_tokens,), torch.int64, device)
    if header.command == Command.GATHER_KV:
        gather_heads(tp, pool, pages, num_kv_heads)
        return
    shape = list(pool.buffer.shape)  # [L, 2, num_pages, ps, h, D] -> [L, 2, n, ps, Hkv, D]
    shape[2], shape[4] = header.num_tokens, num_kv_heads
    data = receive_tensor(tp, tuple(shape), pool.buffer.dtype, device)
    scatter_heads(tp, pool, pages, data, num_kv_heads)


def _first_owner(tp: TPGroup, num_kv_heads: int, head: int) -> tuple[int, int]:
    """(the first rank holding KV head `head`, that rank's first head)."""
    for rank in range(tp.size):
        shard = TPGroup(rank, tp.size, tp.comm).kv_heads(num_kv_heads)
        if shard.start <= head < shard.start + shard.size:
            return rank, shard.start
    raise ValueError(f"KV head {head} has no rank")
