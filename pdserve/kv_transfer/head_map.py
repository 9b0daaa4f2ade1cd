"""Which KV heads go from which prefill rank to which decode rank when the two workers' tensor-
parallel degrees differ: the one mapping every backend follows (tcp moves pages by it today).

A worker of tp `t` over `H` KV heads gives rank r the heads [r * H/t, (r+1) * H/t) when t divides
H, or the one head r // (t/H), replicated on t/H ranks, when H divides t (as vLLM does;
`kv_heads_of` is TPGroup.kv_heads' rule). Each decode rank must end up with exactly the heads it
holds; each of them comes from one prefill rank that holds it (a replicated prefill head is taken
from the holders in turn, so the ranks share the sending). The routes are computed, never sent:
both sides derive them from (prefill tp, decode tp, H).

Pages move page by page as before; a route only narrows each page to a run of heads:
`src[..., src_offset : src_offset + num_heads, :]` of the prefill rank's pool lands in
`dst[..., dst_offset : dst_offset + num_heads, :]` of the decode rank's pool.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class HeadRoute(NamedTuple):
    """A run of KV heads one prefill rank sends one decode rank."""

    prefill_rank: int
    decode_rank: int
    head_start: int  # the first global KV head
    num_heads: int
    src_offset: int  # head_start's index in the prefill rank's pool
    dst_offset: int  # head_start's index in the decode rank's pool


def kv_heads_of(rank: int, tp_size: int, num_kv_heads: int) -> tuple[int, int]:
    """(first KV head, number of KV heads) rank `rank` of a tp `tp_size` worker holds."""
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"tp_rank={rank} is invalid for tp={tp_size}: expected 0..{tp_size - 1}")
    if num_kv_heads < 1:
        raise ValueError(f"num_key_value_heads={num_kv_heads} is invalid: expected at least 1")
    if num_kv_heads % tp_size == 0:
        per_rank = num_kv_heads // tp_size
        return rank * per_rank, per_rank
    if tp_size % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads={num_kv_heads} is invalid for tp={tp_size}: expected a "
            "multiple or a divisor of tp"
        )
    return rank // (tp_size // num_kv_heads), 1


def head_routes(prefill_tp: int, decode_tp: int, num_kv_heads: int) -> list[list[HeadRoute]]:
    """For each decode rank, the runs of heads it receives and from which prefill rank, in head
    order; together they cover exactly that rank's heads, once each."""
    holders: list[list[int]] = [[] for _ in range(num_kv_heads)]  # head -> prefill ranks
    for p in range(prefill_tp):
        start, count = kv_heads_of(p, prefill_tp, num_kv_heads)
        for head in range(start, start + count):
            holders[head].append(p)
    out = []
    for d in range(decode_tp):
        d_start, d_count = kv_heads_of(d, decode_tp, num_kv_heads)
        routes: list[HeadRoute] = []
        for head in range(d_start, d_start + d_count):
            p = holders[head][d % len(holders[head])]  # replicated: the holders take turns
            last = routes[-1] if routes else None
            if last is not None and last.prefill_rank == p:  # extend the run
                routes[-1] = last._replace(num_heads=last.num_heads + 1)
                continue
            p_start, _ = kv_heads_of(p, prefill_tp, num_kv_heads)
            routes.append(HeadRoute(p, d, head, 1, head - p_start, head - d_start))
        out.append(routes)
    return out


def routes_from(
    prefill_rank: int, prefill_tp: int, decode_tp: int, num_kv_heads: int
) -> list[HeadRoute]:
    """What one prefill rank sends: its routes to every decode rank (none: it sends nothing)."""
    return [
        r
        for routes in head_routes(prefill_tp, decode_tp, num_kv_heads)
        for r in routes
        if r.prefill_rank == prefill_rank
    ]


def rank_handshakes(handshake: dict[str, Any]) -> list[dict[str, Any]]:
    """Each rank's part of a decode worker's handshake (tcp: its socket; nccl: its socket and
    store), in rank order: `ranks` for a tensor-parallel worker, else the handshake itself."""
    ranks = handshake.get("ranks")
    return [handshake] if not ranks else list(ranks)


class RankKVShare:
    """One rank's share of a tensor-parallel worker's KV pool, as a transfer backend takes it:
    `buffer` describes the whole pool (a meta tensor: the layout two workers agree on, every KV
    head), `local` is this rank's pool (its heads only)."""

    def __init__(self, local: torch.Tensor, tp_rank: int, tp_size: int, num_kv_heads: int) -> None:
        start, count = kv_heads_of(tp_rank, tp_size, num_kv_heads)
        if local.dim() != 6 or local.shape[4] != count:
            raise ValueError(
                f"KV pool shape {list(local.shape)}: expected [L, 2, num_pages, page_size, "
                f"{count}, head_dim] for rank {tp_rank} of tp {tp_size} over {num_kv_heads} KV heads"
            )
        self.local = local
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.num_kv_heads = num_kv_heads
        shape = list(local.shape)
        shape[4] = num_kv_heads
        self.buffer = torch.empty(shape, dtype=local.dtype, device="meta")
