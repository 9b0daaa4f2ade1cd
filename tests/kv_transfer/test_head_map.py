"""The head mapping between TP degrees (kv_transfer/head_map.py), and the tcp backend moving pages
rank to rank by it: every rank of both workers in this process, each with its own share of the
pool and its own sockets, as the ranks of a prefill and a decode worker would be."""

from __future__ import annotations

import itertools
import time

import pytest
import torch

from pdserve.kv_transfer.head_map import (
    HeadRoute,
    RankKVShare,
    head_routes,
    kv_heads_of,
    routes_from,
)
from pdserve.kv_transfer.tcp import TcpReceiver, TcpSender
from pdserve.worker.parallel.tp_group import TPGroup

L, PS, D = 2, 4, 8
DEGREES = (1, 2, 4, 8)


def _valid(tp: int, heads: int) -> bool:
    return heads % tp == 0 or tp % heads == 0


CASES = [
    (a, b, h)
    for a, b, h in itertools.product(DEGREES, DEGREES, (1, 2, 4, 8))
    if _valid(a, h) and _valid(b, h)
]


@pytest.mark.parametrize(("tp", "heads"), [(t, h) for t in DEGREES for h in (1, 2, 4, 8)])
def test_kv_heads_of_is_tp_groups_rule(tp: int, heads: int) -> None:
    for rank in range(tp):
        if not _valid(tp, heads):
            with pytest.raises(ValueError, match="num_key_value_heads"):
                kv_heads_of(rank, tp, heads)
            continue
        want = tuple(TPGroup(rank, tp, None if tp == 1 else object()).kv_heads(heads))  # type: ignore[arg-type]
        assert kv_heads_of(rank, tp, heads) == want


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "heads"), CASES)
def test_each_decode_rank_gets_exactly_its_heads_from_holders(
    prefill_tp: int, decode_tp: int, heads: int
) -> None:
    routes = head_routes(prefill_tp, decode_tp, heads)
    assert len(routes) == decode_tp
    for d, runs in enumerate(routes):
        d_start, d_count = kv_heads_of(d, decode_tp, heads)
        got = []
        for r in runs:
            assert r.decode_rank == d and r.num_heads >= 1
            p_start, p_count = kv_heads_of(r.prefill_rank, prefill_tp, heads)
            # the prefill rank holds every head of the run, at src_offset..
            assert p_start <= r.head_start and r.head_start + r.num_heads <= p_start + p_count
            assert r.src_offset == r.head_start - p_start
            assert r.dst_offset == r.head_start - d_start
            got += range(r.head_start, r.head_start + r.num_heads)
        assert got == list(range(d_start, d_start + d_count))  # all its heads, once, in order


def test_known_mappings() -> None:
    # prefill tp 2 -> decode tp 1 over 2 heads: head 0 from rank 0, head 1 from rank 1
    assert head_routes(2, 1, 2) == [[HeadRoute(0, 0, 0, 1, 0, 0), HeadRoute(1, 0, 1, 1, 0, 1)]]
    # tp 1 -> tp 2: rank 0 sends each decode rank its head
    assert head_routes(1, 2, 2) == [[HeadRoute(0, 0, 0, 1, 0, 0)], [HeadRoute(0, 1, 1, 1, 1, 0)]]
    # tp 2 -> tp 4 over 2 heads (decode replicates): each head goes to both its decode ranks
    assert head_routes(2, 4, 2) == [
        [HeadRoute(0, 0, 0, 1, 0, 0)],
        [HeadRoute(0, 1, 0, 1, 0, 0)],
        [HeadRoute(1, 2, 1, 1, 0, 0)],
        [HeadRoute(1, 3, 1, 1, 0, 0)],
    ]
    # tp 4 -> tp 1 over 2 heads (prefill replicates): one holder of each head sends it
    assert head_routes(4, 1, 2) == [[HeadRoute(0, 0, 0, 1, 0, 0), HeadRoute(2, 0, 1, 1, 0, 1)]]
    # tp 4 -> tp 2 over 2 heads: decode rank d takes head d from its holders' (d % 2)th: the
    # sending is shared (head 0 from rank 0, head 1 from rank 3)
    assert head_routes(4, 2, 2) == [[HeadRoute(0, 0, 0, 1, 0, 0)], [HeadRoute(3, 1, 1, 1, 0, 0)]]
    # tp 1 -> tp 1: the whole pool, one run
    assert head_routes(1, 1, 4) == [[HeadRoute(0, 0, 0, 4, 0, 0)]]
    assert routes_from(1, 2, 1, 2) == [HeadRoute(1, 0, 1, 1, 0, 1)]


def test_invalid_degrees_are_refused() -> None:
    with pytest.raises(ValueError, match="num_key_value_heads=4 is invalid for tp=3"):
        head_routes(3, 1, 4)
    with pytest.raises(ValueError, match="tp_rank=2 is invalid for tp=2"):
        kv_heads_of(2, 2, 4)
    with pytest.raises(ValueError, match="expected \\[L, 2, num_pages, page_size, 1, head_dim\\]"):
        RankKVShare(torch.zeros(L, 2, 4, PS, 2, D), 0, 2, 2)


def _whole(heads: int, num_pages: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(heads * 100 + num_pages)
    return torch.randn((L, 2, num_pages, PS, heads, D), generator=gen)


def _local(whole: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    start, count = kv_heads_of(rank, tp, whole.shape[4])
    return whole[:, :, :, :, start : start + count].clone()


def _share_or_pool(local: torch.Tensor, rank: int, tp: int, heads: int):
    return local if tp == 1 else RankKVShare(local, rank, tp, heads)  # tp 1: a plain pool


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp", "heads"),
    [(2, 1, 2), (1, 2, 2), (2, 4, 2), (4, 2, 2), (4, 1, 2), (2, 2, 4), (1, 4, 4), (4, 1, 4)],
)
def test_tcp_moves_each_decode_ranks_heads_rank_to_rank(
    prefill_tp: int, decode_tp: int, heads: int
) -> None:
    num_pages = 8
    src_whole = _whole(heads, num_pages)
    receivers = [
        TcpReceiver(
            _share_or_pool(torch.zeros_like(_local(src_whole, d, decode_tp)), d, decode_tp, heads)
        )
        for d in range(decode_tp)
    ]
    handshake = {**receivers[0].handshake(), "ranks": [r.handshake() for r in receivers]}
    senders = [
        TcpSender(
            _share_or_pool(_local(src_whole, p, prefill_tp), p, prefill_tp, heads), [handshake]
        )
        for p in range(prefill_tp)
    ]
    src_pages, dst_pages = [1, 5, 2], [6, 3, 7]
    for receiver in receivers:
        receiver.expect("r", dst_pages)
    sent = [s.send("r", 0, src_pages, dst_pages, timeout_s=5).num_bytes for s in senders]
    arrived = [False] * decode_tp
    deadline = time.monotonic() + 5
    while not all(arrived) and time.monotonic() < deadline:
        for d, receiver in enumerate(receivers):
            arrived[d] = arrived[d] or "r" in receiver.poll()
    assert all(arrived)
    elem = src_whole.element_size()
    for d, receiver in enumerate(receivers):
        want = torch.zeros_like(receiver.local)
        want[:, :, dst_pages] = _local(src_whole, d, decode_tp)[:, :, src_pages]
        assert torch.equal(receiver.local, want)
        # exactly its own heads of the pages reached this rank, once
        num_local = kv_heads_of(d, decode_tp, heads)[1]
        assert receiver.bytes_received == len(src_pages) * L * 2 * PS * num_local * D * elem
    # each prefill rank sent exactly its routes' heads
    for p, num_bytes in enumerate(sent):
        num_heads = sum(r.num_heads for r in routes_from(p, prefill_tp, decode_tp, heads))
        assert num_bytes == len(src_pages) * L * 2 * PS * num_heads * D * elem
    for part in senders + receivers:
        part.close()


def test_a_page_lands_only_when_all_its_heads_have() -> None:
    """Decode tp 1 from prefill tp 2: after rank 0's half the request has not arrived."""
    heads = 2
    src_whole = _whole(heads, 4)
    receiver = TcpReceiver(torch.zeros(L, 2, 4, PS, heads, D))
    senders = [
        TcpSender(RankKVShare(_local(src_whole, p, 2), p, 2, heads), [receiver.handshake()])
        for p in range(2)
    ]
    receiver.expect("r", [2])
    senders[0].send("r", 0, [1], [2], timeout_s=5)
    time.sleep(0.05)
    assert receiver.poll() == []
    senders[0].send("r", 0, [1], [2], timeout_s=5)  # the same heads again: dropped
    time.sleep(0.05)
    assert receiver.poll() == []
    senders[1].send("r", 0, [1], [2], timeout_s=5)
    deadline = time.monotonic() + 5
    got: list[str] = []
    while not got and time.monotonic() < deadline:
        got = receiver.poll()
    assert got == ["r"]
    assert torch.equal(receiver.local[:, :, 2], src_whole[:, :, 1])
    for part in [*senders, receiver]:
        part.close()
