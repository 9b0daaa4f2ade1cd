"""cuda_ipc between tensor-parallel workers of different degrees, on CPU: the head-sliced copy plan
and copy (kv_transfer/head_copy.py) against a float64 reference that builds both workers' whole
pools and slices them; then the real CudaIpcSender and the tensor-parallel wiring
(worker/parallel/kv_direct.py) with CPU tensors standing in for the decode ranks' pools that CUDA
IPC would open (`_open_rank` patched). Every decode rank must hold exactly its heads of the
transferred pages and nothing else may change. The same paths on a GPU:
tests/e2e/test_gpu_tp_cuda_ipc.py.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import pytest
import torch

from pdserve.kv_transfer.base import KVTransferError, Transfer, layout_of
from pdserve.kv_transfer.cuda_ipc import CudaIpcSender
from pdserve.kv_transfer.head_copy import copy_heads, plan_head_copies
from pdserve.kv_transfer.head_map import RankKVShare, kv_heads_of, routes_from
from pdserve.worker.parallel.batch_broadcast import Command, Header, receive_header, send_header
from pdserve.worker.parallel.kv_direct import FollowerKV, TPCudaIpcSender
from pdserve.worker.parallel.tp_group import init_tp_group

L, PS, D = 2, 4, 3
SRC_PAGES, DST_PAGES = 10, 12  # pages of the prefill pool, of the decode pool
A_SRC, A_DST = [1, 7, 2, 9], [11, 0, 5, 3]  # request "a"
B_SRC, B_DST = [4], [8]  # request "b", sent in the same batch
CPU = torch.device("cpu")
CASES = [  # (prefill tp, decode tp, KV heads): split, and replicated when tp exceeds the heads
    (a, b, h) for a, b, h in itertools.product((1, 2, 4), (1, 2, 4), (2, 4))
]
IDS = [f"p{a}-d{b}-h{h}" for a, b, h in CASES]


def _whole(num_pages: int, heads: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (L, 2, num_pages, PS, heads, D)
    return torch.randn(shape, generator=gen, dtype=torch.float64)  # [L, 2, P, PS, H, D]


def _local(whole: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    start, count = kv_heads_of(rank, tp, whole.shape[4])
    return whole[:, :, :, :, start : start + count].clone()  # this rank's own pool


def _want(
    src: torch.Tensor, dst: torch.Tensor, transfers: list[tuple[list[int], list[int]]]
) -> torch.Tensor:
    """The decode worker's whole pool after the transfers: fresh pages where they land."""
    want = dst.clone()
    for src_pages, dst_pages in transfers:
        want[:, :, dst_pages] = src[:, :, src_pages]
    return want


def _check_decode_ranks(want: torch.Tensor, pools: list[torch.Tensor]) -> None:
    for d, pool in enumerate(pools):
        expected = _local(want, d, len(pools))
        assert torch.equal(pool, expected), f"decode rank {d} of {len(pools)}: wrong heads/pages"


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "heads"), CASES, ids=IDS)
def test_head_copy_plan_lands_each_decode_ranks_heads(
    prefill_tp: int, decode_tp: int, heads: int
) -> None:
    src, dst = _whole(SRC_PAGES, heads, 1), _whole(DST_PAGES, heads, 2)
    decode = [_local(dst, d, decode_tp) for d in range(decode_tp)]
    for p in range(prefill_tp):
        routes = routes_from(p, prefill_tp, decode_tp, heads)
        copies = plan_head_copies(routes, A_SRC, A_DST)
        assert [c.decode_rank for c in copies] == [r.decode_rank for r in routes]
        num_bytes = copy_heads(_local(src, p, prefill_tp), dict(enumerate(decode)), copies)
        assert num_bytes == sum(r.num_heads for r in routes) * len(A_SRC) * L * 2 * PS * D * 8
    _check_decode_ranks(_want(src, dst, [(A_SRC, A_DST)]), decode)


def test_head_copy_plan_refuses_unequal_page_lists() -> None:
    with pytest.raises(ValueError, match="2 src pages but 1 dst pages"):
        plan_head_copies(routes_from(0, 2, 1, 2), [1, 2], [3])


# ---------------------------------------------------------------- the sender, pools stood in for

_POOLS: dict[int, torch.Tensor] = {}  # pool id -> the CPU tensor a handshake "opens"
_FAIL_OPEN_ON: set[int] = set()  # prefill ranks whose opening of a decode pool fails


def _open_rank(self: CudaIpcSender, handshake: dict[str, Any]) -> torch.Tensor:
    if self.tp_rank in _FAIL_OPEN_ON:
        raise ValueError(f"cuda_ipc: the decode pool's GPU is not visible (rank {self.tp_rank})")
    return _POOLS[handshake["pool_id"]]


@pytest.fixture(autouse=True)
def cpu_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CudaIpcSender, "needs_cuda_pool", False)
    monkeypatch.setattr(CudaIpcSender, "_open_rank", _open_rank)
    _POOLS.clear()
    _FAIL_OPEN_ON.clear()


def _decode_handshake(pools: list[torch.Tensor], heads: int) -> dict[str, Any]:
    """What a decode worker of tp len(pools) hands out: each rank's pool (here an id into
    _POOLS), and the whole pool's layout; `ranks` only when it is tensor-parallel."""
    layout = layout_of(torch.empty((L, 2, DST_PAGES, PS, heads, D), dtype=torch.float64))
    ranks = []
    for pool in pools:
        _POOLS[id(pool)] = pool
        ranks.append({"backend": "cuda_ipc", "pool_id": id(pool), **layout})
    return ranks[0] if len(ranks) == 1 else {**ranks[0], "ranks": ranks}


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "heads"), CASES, ids=IDS)
def test_sender_of_each_prefill_rank_writes_its_heads_into_decode_ranks(
    prefill_tp: int, decode_tp: int, heads: int
) -> None:
    src, dst = _whole(SRC_PAGES, heads, 3), _whole(DST_PAGES, heads, 4)
    decode = [_local(dst, d, decode_tp) for d in range(decode_tp)]
    handshake = _decode_handshake(decode, heads)
    head_page_bytes = L * 2 * PS * D * 8
    for p in range(prefill_tp):
        share = RankKVShare(_local(src, p, prefill_tp), p, prefill_tp, heads)
        sender = CudaIpcSender(share, [handshake])
        bad = Transfer("bad", 0, [0], [DST_PAGES])  # no such dst page: refused alone
        transfers = [Transfer("a", 0, A_SRC, A_DST), bad, Transfer("b", 0, B_SRC, B_DST)]
        outcomes = sender.send_many(transfers, timeout_s=10)
        num_heads = sum(r.num_heads for r in routes_from(p, prefill_tp, decode_tp, heads))
        assert outcomes[0].num_bytes == len(A_SRC) * num_heads * head_page_bytes
        assert isinstance(outcomes[1], ValueError)
        assert outcomes[2].num_bytes == len(B_SRC) * num_heads * head_page_bytes
        sender.close()
    _check_decode_ranks(_want(src, dst, [(A_SRC, A_DST), (B_SRC, B_DST)]), decode)


# ---------------------------------------------------------------- the ranks of a prefill worker


def _prefill_rank(
    rank: int, tp_size: int, port: int, src: torch.Tensor, handshake: dict, out: dict
) -> None:
    heads = src.shape[4]
    tp = init_tp_group(rank, tp_size, f"tcp://127.0.0.1:{port}", "cpu")
    local = _local(src, rank, tp_size)
    try:
        if rank > 0:  # a follower: runs rank 0's KV ops until STOP
            kv = FollowerKV(tp, local, heads, CPU)
            while (header := receive_header(tp, CPU)).command != Command.STOP:
                kv.run(header)
            kv.close()
            return
        sender = TPCudaIpcSender(RankKVShare(local, 0, tp_size, heads), tp, CPU)
        sender.connect(0, handshake)  # the followers connect on the next send's broadcast
        transfers = [Transfer("a", 0, A_SRC, A_DST), Transfer("b", 0, B_SRC, B_DST)]
        out["outcomes"] = sender.send_many(transfers, timeout_s=10)
        sender.close()
        send_header(tp, Header(Command.STOP), CPU)
    finally:
        tp.comm.close()


def _run_prefill_worker(prefill_tp: int, src: torch.Tensor, handshake: dict) -> list:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out: dict = {}
    threads = [
        threading.Thread(
            target=_prefill_rank, args=(r, prefill_tp, port, src, handshake, out), daemon=True
        )
        for r in range(prefill_tp)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out["outcomes"]


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp", "heads"),
    [(2, 1, 2), (2, 4, 2), (4, 2, 2), (2, 2, 4)],
    ids=["p2-d1", "p2-d4-replicated", "p4-replicated-d2", "p2-d2-whole-pages"],
)
def test_prefill_ranks_driven_by_rank0_fill_every_decode_rank(
    prefill_tp: int, decode_tp: int, heads: int
) -> None:
    src, dst = _whole(SRC_PAGES, heads, 5), _whole(DST_PAGES, heads, 6)
    decode = [_local(dst, d, decode_tp) for d in range(decode_tp)]
    outcomes = _run_prefill_worker(prefill_tp, src, _decode_handshake(decode, heads))
    # rank 0 reports, per request, what every rank copied: each decode rank's heads once
    total_heads = sum(kv_heads_of(d, decode_tp, heads)[1] for d in range(decode_tp))
    page_bytes = total_heads * L * 2 * PS * D * 8
    assert [o.num_bytes for o in outcomes] == [len(A_SRC) * page_bytes, len(B_SRC) * page_bytes]
    _check_decode_ranks(_want(src, dst, [(A_SRC, A_DST), (B_SRC, B_DST)]), decode)


def test_a_rank_that_cannot_open_the_decode_pool_fails_the_transfer_on_rank0() -> None:
    src, dst = _whole(SRC_PAGES, 2, 7), _whole(DST_PAGES, 2, 8)
    _FAIL_OPEN_ON.add(1)
    outcomes = _run_prefill_worker(2, src, _decode_handshake([dst.clone()], 2))
    for outcome in outcomes:
        assert isinstance(outcome, KVTransferError)
        assert "failed on tensor-parallel rank(s) [1]" in str(outcome)
